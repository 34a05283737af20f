"""Where labelled images come from: a folder, a manifest, a TFDS dataset, or the embedded default.

`load_source(spec)` picks the source from one string (the trainer's `--data` flag):

- `None` or `"default"`: scikit-learn's bundled handwritten digits, 1,797 real 8x8 images of 10
  concepts; installed with the dependencies, so it works offline.
- a folder `root/<concept>/<image>`: the concept is the image's parent folder relative to `root`, so
  nested concepts such as `Alphabet/character01` work; `depth` keeps only its first components. Images
  directly in `root` take the root folder's name, so a flat folder is a one-concept source (enough to
  embed; the trainer rejects it for softmax).
- `*.csv`: a manifest with header `path,concepts`, concepts separated by `;`.
- `*.jsonl` / `*.ndjson`: a manifest of objects `{"path": ..., "concepts": [...]}`.
- `tfds:NAME[:SPLIT]`: a TFDS dataset already prepared in `data_dir` (split defaults to `train`).

Every image is fully decoded once at load time (in parallel threads) unless `verify=False`: files that
cannot be decoded are left out and listed in `LabelledImages.bad_files` with the reason, along with
missing manifest paths, non-image files and empty concept folders, and each is logged with its path.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import logging
import os
import re
from collections.abc import Iterator
from typing import NamedTuple

import numpy as np
from PIL import Image

from jaxembed.data.dataset import BadFile, LabelledImages
from jaxembed.data.decode import ImageRef, find_undecodable

logger = logging.getLogger(__name__)

DEFAULT_SPEC = "default"
MANIFEST_EXTENSIONS = (".csv", ".jsonl", ".ndjson")

# How many skipped files are logged one by one before the rest are only counted in the log (they are
# all in `bad_files` regardless).
_MAX_LOGGED_BAD_FILES = 20

# "tfds:" NAME[/CONFIG][:VERSION] [":" SPLIT]. A version is digits-dot-digits-dot-digits, which is how
# "mnist:3.0.1" (a version) is told apart from "mnist:test" or "mnist:train[:80%]" (splits).
_TFDS_SPEC = re.compile(r"^tfds:(?P<name>[^:]+(?::\d+\.\d+\.\d+)?)(?::(?P<split>.+))?$")


@dataclasses.dataclass(frozen=True)
class _Candidate:
    """An image a source lists, before it is checked."""

    item: ImageRef
    name: str
    concepts: tuple[str, ...]


def load_source(
    spec: str | os.PathLike | None,
    *,
    data_dir: str | None = None,
    depth: int | None = None,
    verify: bool = True,
    download: bool = False,
) -> LabelledImages:
    """Loads labelled images from the source `spec` names (see the module docstring for the forms).

    Args:
      spec: the source; `None` means the embedded default.
      data_dir: TFDS data directory (TFDS sources only; `None` = TFDS's default, ~/tensorflow_datasets).
      depth: folder sources only: the concept is the first `depth` components of the image's folder
        path relative to the root (e.g. 1 = the alphabet for Omniglot); `None` = the whole path.
      verify: decode every image once now and leave out (and report) those that fail. Without it,
        a file that fails later is logged and replaced by a gray image in training.
      download: TFDS sources only: download and prepare the dataset if `data_dir` lacks it.

    Returns:
      The images with their labels; `bad_files` lists what was skipped and why.

    Raises:
      FileNotFoundError: the folder/manifest does not exist, or the TFDS dataset is not prepared.
      ValueError: a malformed spec or manifest header, an option that does not apply, or no usable image.
    """
    spec = None if spec is None else os.fspath(spec)
    if depth is not None and (not isinstance(depth, int) or depth < 1):
        raise ValueError(f"depth must be a positive integer or None, got depth={depth!r}")
    if spec is None or spec == DEFAULT_SPEC:
        _reject_depth(spec, depth)
        return load_default(verify=verify)
    if spec.startswith("tfds:"):
        _reject_depth(spec, depth)
        name, split = parse_tfds_spec(spec)
        return load_tfds(name, split, data_dir=data_dir, download=download, verify=verify)
    path = os.path.expanduser(spec)
    if os.path.isdir(path):
        return load_folder(path, depth=depth, verify=verify)
    if os.path.isfile(path):
        _reject_depth(spec, depth)
        if not path.lower().endswith(MANIFEST_EXTENSIONS):
            raise ValueError(f"data source {spec!r} is a file but not a manifest ({', '.join(MANIFEST_EXTENSIONS)})")
        return load_manifest(path, verify=verify)
    raise FileNotFoundError(
        f"data source {spec!r} is not an existing folder or manifest file, nor 'tfds:NAME[:SPLIT]' or 'default'"
    )


def _reject_depth(spec: str | None, depth: int | None) -> None:
    if depth is not None:
        raise ValueError(f"depth={depth} applies to folder sources only, not to {spec!r}")


def parse_tfds_spec(spec: str) -> tuple[str, str]:
    """`"tfds:NAME[:SPLIT]"` -> `(NAME, SPLIT)`, SPLIT defaulting to "train"."""
    match = _TFDS_SPEC.match(spec)
    if not match:
        raise ValueError(f"expected 'tfds:NAME[:SPLIT]' (e.g. 'tfds:mnist:test'), got {spec!r}")
    return match["name"], match["split"] or "train"


# --- folder ------------------------------------------------------------------------------------------


def load_folder(root: str, *, depth: int | None = None, verify: bool = True) -> LabelledImages:
    """Images under `root/<concept path>/`, labelled by their folder path relative to `root`.

    Images directly in `root` are labelled with the name of `root` itself. Hidden files and folders
    (".DS_Store", ".git") are ignored. Files whose extension is not an image format Pillow knows and
    empty folders are reported in `bad_files`.
    """
    root = os.path.abspath(root)
    if not os.path.isdir(root):
        raise FileNotFoundError(f"image folder {root} does not exist")
    image_extensions = _image_extensions()
    candidates, bad_files, visited = [], [], set()
    for folder, subfolders, files in os.walk(root, followlinks=True):
        if os.path.realpath(folder) in visited:  # a symlink back up the tree would loop forever
            subfolders[:] = []
            continue
        visited.add(os.path.realpath(folder))
        subfolders[:] = sorted(name for name in subfolders if not name.startswith("."))
        files = sorted(name for name in files if not name.startswith("."))
        if folder == root:
            concept = os.path.basename(root)
        elif not files and not subfolders:
            bad_files.append(BadFile(folder, "empty concept folder"))
            continue
        else:
            concept = "/".join(os.path.relpath(folder, root).split(os.sep)[:depth])
        for name in files:
            path = os.path.join(folder, name)
            extension = os.path.splitext(name)[1].lower()
            if extension in image_extensions:
                candidates.append(_Candidate(path, path, (concept,)))
            else:
                bad_files.append(BadFile(path, f"not an image file extension ({extension or 'none'})"))
    return _assemble(candidates, bad_files, source=root, verify=verify)


def _image_extensions() -> frozenset[str]:
    Image.init()  # registers every format plugin, so the list is complete
    return frozenset(Image.registered_extensions())


# --- manifest ----------------------------------------------------------------------------------------


def load_manifest(path: str, *, verify: bool = True) -> LabelledImages:
    """Images listed in a CSV (`path,concepts`, concepts `;`-separated) or JSONL manifest.

    Relative image paths are relative to the manifest's folder; absolute ones are kept. Rows that are
    malformed, list no concept, or point to no file are skipped and reported by line.
    """
    path = os.path.abspath(path)
    base = os.path.dirname(path)
    rows = _read_csv_rows(path) if path.lower().endswith(".csv") else _read_jsonl_rows(path)
    candidates, bad_files = [], []
    for row in rows:
        where = f"{os.path.basename(path)}:{row.line}"
        if row.error:
            bad_files.append(BadFile(f"{path}:{row.line}", row.error))
            continue
        resolved = os.path.normpath(os.path.join(base, os.path.expanduser(row.image_path)))
        if not row.concepts:
            bad_files.append(BadFile(resolved, f"{where}: no concepts listed"))
        elif not os.path.isfile(resolved):
            bad_files.append(BadFile(resolved, f"{where}: no such file"))
        else:
            candidates.append(_Candidate(resolved, resolved, row.concepts))
    return _assemble(candidates, bad_files, source=path, verify=verify)


class _ManifestRow(NamedTuple):
    line: int
    image_path: str = ""
    concepts: tuple[str, ...] = ()
    error: str = ""  # why the row could not be read; the other fields are then empty


def _read_csv_rows(path: str) -> Iterator[_ManifestRow]:
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        if not {"path", "concepts"} <= set(reader.fieldnames or ()):
            raise ValueError(
                f"{path}: a CSV manifest needs a header with columns 'path' and 'concepts', got {reader.fieldnames}"
            )
        for row in reader:
            image_path, concepts = row["path"], row["concepts"]
            if not image_path or concepts is None:
                yield _ManifestRow(reader.line_num, error="row lacks a path or concepts")
            else:
                yield _ManifestRow(reader.line_num, image_path.strip(), _unique(concepts.split(";")))


def _read_jsonl_rows(path: str) -> Iterator[_ManifestRow]:
    with open(path, encoding="utf-8") as f:
        for line, text in enumerate(f, start=1):
            if not text.strip():
                continue
            try:
                row = json.loads(text)
            except json.JSONDecodeError as error:
                yield _ManifestRow(line, error=f"not valid JSON ({error.msg})")
                continue
            concepts = row.get("concepts") if isinstance(row, dict) else None
            if isinstance(concepts, str):
                concepts = [concepts]
            if not (isinstance(row, dict) and isinstance(row.get("path"), str) and isinstance(concepts, list)):
                yield _ManifestRow(line, error='expected {"path": "...", "concepts": ["...", ...]}')
                continue
            yield _ManifestRow(line, row["path"], _unique(str(concept) for concept in concepts))


def _unique(concepts) -> tuple[str, ...]:
    """Stripped, non-empty concept names in first-seen order (the first is the primary label)."""
    return tuple(dict.fromkeys(name.strip() for name in concepts if name.strip()))


# --- TFDS --------------------------------------------------------------------------------------------


def load_tfds(
    name: str,
    split: str = "train",
    *,
    data_dir: str | None = None,
    download: bool = False,
    verify: bool = True,
) -> LabelledImages:
    """A TFDS dataset's images and class labels, held in memory as the encoded image files.

    The image is the feature named "image" (else the first Image feature); the label is "label" /
    "labels" (else the first ClassLabel, or sequence of ClassLabel for multi-label data). A dataset
    stored in a random-access format (ArrayRecord, TFDS's default for new datasets) is read through
    `tfds.data_source`, without tf.data; one stored as TFRecord needs tf.data, so TensorFlow.

    Raises:
      ValueError: tensorflow-datasets is not installed (the message names the `[tfds]` extra).
      FileNotFoundError: the dataset is not registered or not prepared in `data_dir`.
    """
    spec = f"tfds:{name}:{split}"
    try:
        import tensorflow_datasets as tfds  # slow to import; only TFDS sources need it
    except ImportError as error:
        raise ValueError(f"{spec}: TFDS sources need tensorflow-datasets, which this installation lacks "
                         f"({error}); install the extra: pip install 'jaxembed[tfds]'") from None

    try:
        builder = tfds.builder(name, data_dir=data_dir)
    except tfds.core.registered.DatasetNotFoundError as error:
        raise FileNotFoundError(
            f"{spec}: no TFDS dataset {name!r} is registered or prepared in data_dir={data_dir}"
        ) from error
    if not builder.is_prepared():
        if not download:
            raise FileNotFoundError(
                f"{spec}: the dataset is not prepared in {builder.data_dir}. Prepare it first "
                f"(`tfds build {name} --data_dir DIR`) and pass data_dir, or pass download=True."
            )
        builder.download_and_prepare()
    features = builder.info.features
    image_key = _pick_feature(features, "image", lambda f: isinstance(f, tfds.features.Image))
    label_key = _pick_feature(features, "label", lambda f: isinstance(f, tfds.features.ClassLabel)) or (
        _pick_feature(features, "labels", lambda f: isinstance(getattr(f, "feature", None), tfds.features.ClassLabel))
    )
    if image_key is None or label_key is None:
        raise ValueError(f"{spec}: needs an Image feature and a ClassLabel feature, found {dict(features)}")
    label_feature = features[label_key]
    class_names = getattr(label_feature, "feature", label_feature).names
    candidates = []
    for position, (encoded, label) in enumerate(_tfds_examples(tfds, builder, split, image_key, label_key)):
        concepts = _unique(class_names[int(index)] for index in np.atleast_1d(label))
        candidates.append(_Candidate(bytes(encoded), f"{spec}[{position}]", concepts))
    bad_files = [BadFile(c.name, "no class label") for c in candidates if not c.concepts]
    candidates = [c for c in candidates if c.concepts]
    return _assemble(candidates, bad_files, source=spec, verify=verify)


def _tfds_examples(tfds, builder, split: str, image_key: str, label_key: str) -> Iterator[tuple[bytes, object]]:
    """`(encoded image, label)` of each example of `split`, in order, the image left undecoded."""
    skip_decoding = {image_key: tfds.decode.SkipDecoding()}
    random_access = {file_format.value for file_format in tfds.core.file_adapters.FileFormat.with_random_access()}
    stored = [str(getattr(builder.info.file_format, "value", builder.info.file_format))]
    stored += [str(getattr(f, "value", f)) for f in getattr(builder.info, "alternative_file_formats", ())]
    usable = [file_format for file_format in stored if file_format in random_access]
    if usable:  # no tf.data, no TensorFlow
        for example in builder.as_data_source(split, decoders=skip_decoding, file_format=usable[0]):
            yield example[image_key], example[label_key]
        return
    logger.info("%s is stored as %s, which only tf.data reads (TensorFlow); `tfds build --file_format "
                "array_record` stores it for random access", builder.name, stored[0])
    examples = builder.as_dataset(split=split, shuffle_files=False, decoders=skip_decoding)
    for example in examples.as_numpy_iterator():
        yield example[image_key], example[label_key]


def _pick_feature(features, preferred: str, accepts) -> str | None:
    if preferred in features and accepts(features[preferred]):
        return preferred
    return next((key for key, feature in features.items() if accepts(feature)), None)


# --- embedded default --------------------------------------------------------------------------------


def load_default(*, verify: bool = True) -> LabelledImages:
    """scikit-learn's bundled handwritten digits (UCI optdigits test set): 1,797 real 8x8 gray images
    of the digits 0-9, stored as PNG bytes. Installs with the dependencies; needs no download."""
    from sklearn.datasets import load_digits  # only this source needs scikit-learn

    digits = load_digits()
    # Pixel values are ink counts 0..16 per 4x4 block of the original 32x32 bitmaps.
    pixels = np.round(digits.images * (255 / 16)).astype(np.uint8)
    candidates = [
        _Candidate(_encode_png(image), f"default:digits[{position}]", (str(int(digit)),))
        for position, (image, digit) in enumerate(zip(pixels, digits.target))
    ]
    return _assemble(candidates, [], source=DEFAULT_SPEC, verify=verify)


def _encode_png(gray: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(gray).save(buffer, format="PNG")
    return buffer.getvalue()


# --- shared ------------------------------------------------------------------------------------------


def _assemble(
    candidates: list[_Candidate], bad_files: list[BadFile], *, source: str, verify: bool
) -> LabelledImages:
    """Checks the candidates, names the failures, and indexes the concepts of the rest."""
    if verify and candidates:
        reasons = find_undecodable([candidate.item for candidate in candidates])
        bad_files = bad_files + [BadFile(candidates[i].name, reason) for i, reason in sorted(reasons.items())]
        candidates = [candidate for i, candidate in enumerate(candidates) if i not in reasons]
    _log_bad_files(bad_files, source)
    if not candidates:
        raise ValueError(f"{source}: no usable images ({len(bad_files)} skipped: {bad_files[:3]})")
    concepts = tuple(sorted({concept for candidate in candidates for concept in candidate.concepts}))
    concept_index = {concept: index for index, concept in enumerate(concepts)}
    data = LabelledImages(
        items=tuple(candidate.item for candidate in candidates),
        labels=tuple(tuple(concept_index[c] for c in candidate.concepts) for candidate in candidates),
        concepts=concepts,
        item_names=tuple(candidate.name for candidate in candidates),
        bad_files=tuple(bad_files),
        source=source,
    )
    logger.info("%s: %d images of %d concepts, %d skipped", source, len(data), data.num_concepts, len(bad_files))
    if data.num_concepts == 1:
        logger.warning("%s: all images show one concept (%r); softmax cannot learn from it", source, concepts[0])
    return data


def _log_bad_files(bad_files: list[BadFile], source: str) -> None:
    for bad in bad_files[:_MAX_LOGGED_BAD_FILES]:
        logger.warning("skipped %s: %s", bad.path, bad.reason)
    if len(bad_files) > _MAX_LOGGED_BAD_FILES:
        logger.warning(
            "%s: %d more skipped files not logged; all are in LabelledImages.bad_files",
            source,
            len(bad_files) - _MAX_LOGGED_BAD_FILES,
        )
