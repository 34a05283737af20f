"""Tests for jaxembed.data: sources, bad files, splits, and the grain pipelines (CPU, small images)."""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import io
import json
import logging
import os
import signal
import subprocess
import sys
import zipfile

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from jaxembed.data import (
    Augmentation,
    DataWorkerDied,
    LabelledImages,
    batches_per_pass,
    decode_image,
    eval_batches,
    load_label_map,
    load_source,
    parse_tfds_spec,
    preprocess_for_eval,
    save_label_map,
    split_by_concepts,
    split_by_images,
    train_batches,
)
from jaxembed.data import pipeline

# The shared datasets folder sits next to the repository; the images are never copied into it.
OMNIGLOT_ZIP = os.path.join(
    os.path.dirname(__file__), "..", "..", "..", "shared", "datasets", "omniglot", "images_background_small1.zip"
)
OMNIGLOT_ALPHABETS = ("Greek", "Latin")
OMNIGLOT_CHARACTERS = ("character01", "character02", "character03")  # 20 drawings each


# --- fixtures ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def omniglot_root(tmp_path_factory) -> str:
    """A few real Omniglot characters extracted to a temporary folder: root/<Alphabet>/<characterNN>/*.png."""
    if not os.path.exists(OMNIGLOT_ZIP):
        pytest.skip(f"Omniglot zip not found at {OMNIGLOT_ZIP}")
    root = tmp_path_factory.mktemp("omniglot")
    with zipfile.ZipFile(OMNIGLOT_ZIP) as archive:
        for name in archive.namelist():
            parts = name.split("/")
            if len(parts) == 4 and parts[1] in OMNIGLOT_ALPHABETS and parts[2] in OMNIGLOT_CHARACTERS and parts[3]:
                target = root.joinpath(*parts[1:])
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(archive.read(name))
    return str(root)


@pytest.fixture(scope="module")
def omniglot(omniglot_root) -> LabelledImages:
    return load_source(omniglot_root)


def _encode(image: Image.Image, format: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=format, **options)
    return buffer.getvalue()


def _noise(height: int, width: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), np.uint8))


def _exif_rotated_jpeg() -> bytes:
    """A 60 wide x 30 tall JPEG, red in its top-left quarter, tagged "rotate 90 degrees clockwise to view"."""
    pixels = np.full((30, 60, 3), 255, np.uint8)
    pixels[:15, :30] = (255, 0, 0)
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: the viewer rotates 90 degrees clockwise
    return _encode(Image.fromarray(pixels), "JPEG", quality=95, exif=exif.tobytes())


def _two_frame_gif() -> bytes:
    frames = [Image.new("RGB", (16, 12), color) for color in ((0, 0, 255), (255, 255, 0))]
    return _encode(frames[0], "GIF", save_all=True, append_images=frames[1:])


def _good_images() -> dict[str, bytes]:
    palette = Image.new("P", (20, 10))
    palette.putpalette([0, 0, 0, 0, 200, 0] + [0] * 762)
    palette.paste(1, (0, 0, 10, 10))
    rgba = np.zeros((10, 10, 4), np.uint8)
    rgba[:, :5] = (0, 0, 255, 255)  # opaque blue left half, fully transparent (black) right half
    sixteen_bit = np.full((10, 12), 0x8000, np.uint16)
    sixteen_bit[0, 0] = 65535
    return {
        "rgb.jpg": _encode(_noise(32, 48), "JPEG"),
        "gray.png": _encode(Image.fromarray(np.full((12, 12), 77, np.uint8)), "PNG"),
        "rgba.png": _encode(Image.fromarray(rgba, "RGBA"), "PNG"),
        "palette.png": _encode(palette, "PNG"),
        "cmyk.jpg": _encode(Image.new("CMYK", (16, 16), (0, 255, 255, 0)), "JPEG", quality=95),
        "sixteen_bit.png": _encode(Image.fromarray(sixteen_bit), "PNG"),
        "rotated.jpg": _exif_rotated_jpeg(),
        "animated.gif": _two_frame_gif(),
        "bitmap.bmp": _encode(_noise(9, 7, seed=1), "BMP"),
        "photo.webp": _encode(_noise(20, 30, seed=2), "WEBP"),
        "tiny.png": _encode(Image.new("RGB", (1, 1), (10, 20, 30)), "PNG"),
    }


def _bad_images() -> dict[str, tuple[bytes, str]]:
    """File name -> (contents, a phrase the reported reason must contain)."""
    jpeg, png = _encode(_noise(40, 40), "JPEG"), _encode(_noise(40, 40), "PNG")
    return {
        "corrupt.jpg": (jpeg[:2] + b"\x00" * 64 + jpeg[66:], "not a recognised image format"),
        "truncated.png": (png[: len(png) // 2], "truncated"),
        "truncated.jpg": (jpeg[: len(jpeg) // 2], "truncated"),  # found by the check's 1/8-scale decode
        "zero_bytes.png": (b"", "empty file"),
        "text.jpg": (b"this is a text file, not a JPEG\n", "not a recognised image format"),
    }


@pytest.fixture
def mixed_corpus(tmp_path):
    """root/good/* decodable in every common format, root/bad/* undecodable, plus oddities.

    Returns (root, good paths, {bad path: reason phrase}).
    """
    root = tmp_path / "corpus"
    (root / "good").mkdir(parents=True)
    (root / "bad").mkdir()
    (root / "empty_concept").mkdir()
    good = {}
    for name, contents in _good_images().items():
        good[name] = root / "good" / name
        good[name].write_bytes(contents)
    bad = {}
    for name, (contents, reason) in _bad_images().items():
        (root / "bad" / name).write_bytes(contents)
        bad[str(root / "bad" / name)] = reason
    (root / "bad" / "notes.txt").write_text("not an image")
    bad[str(root / "bad" / "notes.txt")] = "not an image file extension"
    bad[str(root / "empty_concept")] = "empty concept folder"
    (root / "README.md").write_text("not an image")
    bad[str(root / "README.md")] = "not an image file extension (.md)"
    (root / "good" / ".DS_Store").write_bytes(b"\x00junk")  # hidden: ignored, not reported
    os.symlink(root, root / "good" / "loop")  # a folder symlink cycle must not hang the walk
    return str(root), {name: str(path) for name, path in good.items()}, bad


# --- folder sources on real images -------------------------------------------------------------------


def test_folder_source_nested_concepts(omniglot):
    expected = tuple(sorted(f"{a}/{c}" for a in OMNIGLOT_ALPHABETS for c in OMNIGLOT_CHARACTERS))
    assert omniglot.concepts == expected
    assert len(omniglot) == 20 * len(expected)
    assert omniglot.num_concepts == len(expected)
    assert omniglot.bad_files == ()
    assert list(omniglot.concept_counts()) == [20] * len(expected)
    for path, label in zip(omniglot.items, omniglot.labels):
        folder = os.path.relpath(os.path.dirname(path), omniglot.source).replace(os.sep, "/")
        assert folder == omniglot.concepts[label[0]]


def test_folder_source_depth(omniglot_root):
    alphabets = load_source(omniglot_root, depth=1)
    assert alphabets.concepts == OMNIGLOT_ALPHABETS
    assert list(alphabets.concept_counts()) == [60, 60]


def test_train_batches_shapes_and_dtypes(omniglot):
    batch = next(train_batches(omniglot, image_size=32, batch_size=8, seed=0))
    assert batch["image"].shape == (8, 32, 32, 3) and batch["image"].dtype == np.uint8
    assert batch["label"].shape == (8,) and batch["label"].dtype == np.int32
    assert batch["labels"].shape == (8, omniglot.num_concepts) and batch["labels"].dtype == np.float32
    np.testing.assert_array_equal(batch["labels"].argmax(axis=1), batch["label"])
    np.testing.assert_array_equal(batch["labels"].sum(axis=1), 1.0)
    np.testing.assert_array_equal(batch["label"], omniglot.primary_labels[batch["index"]])
    assert batch["image"].min() == 0 and batch["image"].max() == 255  # black ink on white survives


def test_train_batches_deterministic_and_reshuffled(omniglot):
    def first_batches(seed, count):
        iterator = train_batches(omniglot, image_size=24, batch_size=30, seed=seed)
        return [next(iterator) for _ in range(count)]

    steps = batches_per_pass(len(omniglot), 30)
    run, rerun, other_seed = first_batches(0, steps + 1), first_batches(0, steps + 1), first_batches(1, 1)
    for a, b in zip(run, rerun):
        np.testing.assert_array_equal(a["image"], b["image"])
        np.testing.assert_array_equal(a["index"], b["index"])
    assert not np.array_equal(run[0]["index"], other_seed[0]["index"])
    epoch0 = np.concatenate([batch["index"] for batch in run[:steps]])
    assert sorted(epoch0) == list(range(len(omniglot)))  # 120 = 4 x 30: one epoch sees every image once
    assert not np.array_equal(run[steps]["index"], run[0]["index"])  # epoch 1 is reshuffled


def test_train_batches_resume_matches_uninterrupted_run(omniglot):
    steps = batches_per_pass(len(omniglot), 16)
    uninterrupted = train_batches(omniglot, image_size=16, batch_size=16, seed=3)
    expected = [next(uninterrupted) for _ in range(steps + 2)][-2:]
    resumed = train_batches(omniglot, image_size=16, batch_size=16, seed=3, skip_batches=steps)
    by_epoch = train_batches(omniglot, image_size=16, batch_size=16, seed=3, start_epoch=1, skip_batches=1)
    np.testing.assert_array_equal(next(resumed)["image"], expected[0]["image"])
    np.testing.assert_array_equal(next(by_epoch)["image"], expected[1]["image"])


def test_process_shards_are_disjoint_and_cover_the_data(omniglot):
    batch_size = 20  # 120 images / 2 processes = 60 each = 3 full batches: nothing dropped
    seen = []
    for process_index in range(2):
        iterator = train_batches(
            omniglot, image_size=16, batch_size=batch_size, seed=0, process_index=process_index, process_count=2
        )
        epoch = [next(iterator) for _ in range(batches_per_pass(len(omniglot), batch_size, process_count=2))]
        seen.append({int(i) for batch in epoch for i in batch["index"]})
    assert not seen[0] & seen[1]
    assert seen[0] | seen[1] == set(range(len(omniglot)))

    evaluated = []
    for process_index in range(2):
        batches = list(
            eval_batches(omniglot, image_size=16, batch_size=16, process_index=process_index, process_count=2)
        )
        assert len(batches) == 4  # ceil(60 / 16), the same on both processes
        evaluated.append({int(i) for b in batches for i in b["index"][b["mask"]]})
    assert not evaluated[0] & evaluated[1]
    assert evaluated[0] | evaluated[1] == set(range(len(omniglot)))


def test_eval_batches_padding_and_order(omniglot):
    batches = list(eval_batches(omniglot, image_size=16, batch_size=50))
    assert [len(b["mask"]) for b in batches] == [50, 50, 50]
    indices = np.concatenate([b["index"] for b in batches])
    mask = np.concatenate([b["mask"] for b in batches])
    np.testing.assert_array_equal(indices[mask], np.arange(len(omniglot)))
    assert mask.sum() == len(omniglot) and not mask[len(omniglot):].any()
    assert (indices[~mask] == -1).all() and (batches[-1]["image"][~batches[-1]["mask"]] == 0).all()


def test_preprocess_for_eval_equals_eval_pipeline(omniglot, mixed_corpus):
    non_square = load_source(mixed_corpus[0])  # the decodable ones: 1x1, 60x30 rotated, 9x7, ...
    for data, image_size in ((omniglot.subset(range(0, 120, 7)), 48), (omniglot.subset([0, 1]), 224), (non_square, 33)):
        batch = next(eval_batches(data, image_size=image_size, batch_size=len(data)))
        for row, item in enumerate(data.items):
            np.testing.assert_array_equal(preprocess_for_eval(decode_image(item), image_size), batch["image"][row])


def test_preprocess_for_eval_resizes_shorter_side_and_centre_crops():
    image = np.zeros((40, 80, 3), np.uint8)
    image[:, 20:60] = 255  # the centre square is white, the sides black
    out = preprocess_for_eval(image, 20)
    assert out.shape == (20, 20, 3) and out.dtype == np.uint8
    # Only the centre square remains; the outermost columns are slightly darkened, exactly as when
    # resizing the whole image and then cropping, by the black pixels just outside the crop.
    assert (out[:, 1:-1] == 255).all() and (out[:, [0, -1]] > 200).all()
    gray = preprocess_for_eval(np.full((5, 7), 9, np.uint8), 8)
    assert gray.shape == (8, 8, 3) and (gray == 9).all()
    with pytest.raises(ValueError, match="dtype"):
        preprocess_for_eval(np.zeros((4, 4, 3), np.float32), 8)


# --- bad files and formats ---------------------------------------------------------------------------


def test_bad_files_named_with_reasons_and_good_files_all_used(mixed_corpus, caplog):
    root, good, bad = mixed_corpus
    with caplog.at_level(logging.WARNING, logger="jaxembed.data"):
        data = load_source(root)
    reported = {bad_file.path: bad_file.reason for bad_file in data.bad_files}
    assert set(reported) == set(bad)
    for path, phrase in bad.items():
        assert phrase in reported[path], (path, reported[path])
        assert path in caplog.text  # every skipped file is logged by path
    assert sorted(data.items) == sorted(good.values())
    assert data.concepts == ("good",)
    assert json.loads(json.dumps(data.summary()))["num_bad_files"] == len(bad)
    batches = list(eval_batches(data, image_size=16, batch_size=4))
    assert sum(int(b["mask"].sum()) for b in batches) == len(good)


def test_flat_folder_is_one_concept_exposed_and_warned(omniglot_root, tmp_path, caplog):
    flat = tmp_path / "my_photos"
    flat.mkdir()
    character = os.path.join(omniglot_root, "Greek", "character01")
    for name in sorted(os.listdir(character))[:2]:
        with open(os.path.join(character, name), "rb") as f:
            (flat / name).write_bytes(f.read())
    with caplog.at_level(logging.WARNING, logger="jaxembed.data"):
        data = load_source(str(flat))
    assert data.concepts == ("my_photos",) and data.num_concepts == 1 and len(data) == 2
    assert "one concept" in caplog.text


def test_decoding_converts_every_mode_to_upright_rgb(mixed_corpus):
    _, good, _ = mixed_corpus
    decoded = {name: decode_image(path) for name, path in good.items()}
    for name, image in decoded.items():
        assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3, name
    assert (decoded["gray.png"] == 77).all()
    np.testing.assert_array_equal(decoded["rgba.png"][0, 0], (0, 0, 255))
    np.testing.assert_array_equal(decoded["rgba.png"][0, 9], (255, 255, 255))  # transparent -> white
    np.testing.assert_array_equal(decoded["palette.png"][0, 0], (0, 200, 0))
    np.testing.assert_array_equal(decoded["palette.png"][0, 15], (0, 0, 0))
    assert np.abs(decoded["cmyk.jpg"][8, 8].astype(int) - (255, 0, 0)).max() < 10
    np.testing.assert_array_equal(decoded["sixteen_bit.png"][0, 0], (255, 255, 255))
    np.testing.assert_array_equal(decoded["sixteen_bit.png"][1, 1], (128, 128, 128))
    # Stored 60 wide x 30 tall with the red quarter top-left; shown rotated clockwise: 30 x 60, red top-right.
    rotated = decoded["rotated.jpg"]
    assert rotated.shape == (60, 30, 3)
    assert rotated[5, 25, 0] > 200 and rotated[5, 25, 1] < 60
    assert rotated[5, 5].min() > 200 and rotated[55, 25].min() > 200
    assert (np.abs(decoded["animated.gif"].astype(int) - (0, 0, 255)) < 5).all()  # first frame
    assert decoded["bitmap.bmp"].shape == (9, 7, 3)
    assert decoded["photo.webp"].shape == (20, 30, 3)
    np.testing.assert_array_equal(decoded["tiny.png"], [[[10, 20, 30]]])


def test_large_jpeg_decoded_at_reduced_scale_for_training(tmp_path):
    from jaxembed.data.decode import open_image

    photo = _encode(_noise(1200, 1600), "JPEG")
    assert open_image(photo).size == (1600, 1200)
    assert open_image(photo, draft_size=250).size == (400, 300)  # 1/4 scale; 1/8 would be under 250
    (tmp_path / "photos" / "big").mkdir(parents=True)
    (tmp_path / "photos" / "big" / "photo.jpg").write_bytes(photo)
    (tmp_path / "photos" / "big" / "small.png").write_bytes(_encode(_noise(20, 20), "PNG"))
    batch = next(train_batches(load_source(str(tmp_path / "photos")), image_size=64, batch_size=2, seed=0))
    assert batch["image"].shape == (2, 64, 64, 3)


@pytest.mark.parametrize("workers", [0, 1])  # a worker's failures are logged by the training process
def test_unverified_bad_files_do_not_stop_the_pipeline(mixed_corpus, caplog, workers):
    root, good, bad = mixed_corpus
    data = load_source(root, verify=False)  # undecodable files stay in: they fail inside the pipeline
    bad_images = [i for i, name in enumerate(data.item_names) if name in bad]
    assert len(bad_images) == len(_bad_images())
    with caplog.at_level(logging.WARNING, logger="jaxembed.data"):
        batches = list(eval_batches(data, image_size=16, batch_size=4, workers=workers))
        assert all(f"{data.item_names[i]}: could not decode" in caplog.text for i in bad_images)
        caplog.clear()
        with contextlib.closing(train_batches(data, image_size=16, batch_size=len(data), seed=0,
                                              workers=workers)) as training:
            next(training)
    masked = np.concatenate([b["index"][~b["mask"] & (b["index"] >= 0)] for b in batches])
    assert sorted(masked) == bad_images
    assert all(f"{data.item_names[i]}: could not decode" in caplog.text for i in bad_images)


# --- manifests ---------------------------------------------------------------------------------------


@pytest.fixture
def manifest_images(tmp_path):
    """Three images in tmp_path/images; returns their paths."""
    folder = tmp_path / "images"
    folder.mkdir()
    paths = []
    for i in range(3):
        paths.append(folder / f"{i}.png")
        paths[-1].write_bytes(_encode(_noise(10, 10, seed=i), "PNG"))
    return [str(path) for path in paths]


def _check_manifest_data(data, images, caplog):
    assert data.concepts == ("cat", "dog", "outdoor")
    assert list(data.items) == images  # the relative path resolved against the manifest folder
    named_labels = [[data.concepts[i] for i in label] for label in data.labels]
    assert named_labels == [["dog", "outdoor"], ["cat"], ["outdoor", "cat"]]
    missing = [bad for bad in data.bad_files if "no such file" in bad.reason]
    assert len(missing) == 1 and missing[0].path.endswith("missing.png")
    assert "missing.png" in caplog.text
    batch = next(eval_batches(data, image_size=8, batch_size=3))
    np.testing.assert_array_equal(batch["labels"], [[0, 1, 1], [1, 0, 0], [1, 0, 1]])
    np.testing.assert_array_equal(batch["label"], [1, 0, 2])  # the first listed concept


def test_csv_manifest(tmp_path, manifest_images, caplog):
    manifest = tmp_path / "labels.csv"
    with open(manifest, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "concepts"])
        writer.writerow(["images/0.png", "dog;outdoor"])
        writer.writerow([manifest_images[1], "cat"])  # absolute
        writer.writerow(["images/missing.png", "dog"])
        writer.writerow([manifest_images[2], "outdoor; cat ;outdoor"])
        writer.writerow([manifest_images[0], ""])  # no concepts
    with caplog.at_level(logging.WARNING, logger="jaxembed.data"):
        data = load_source(str(manifest))
    _check_manifest_data(data, manifest_images, caplog)
    assert any("no concepts" in bad.reason for bad in data.bad_files)


def test_jsonl_manifest(tmp_path, manifest_images, caplog):
    manifest = tmp_path / "labels.jsonl"
    rows = [
        {"path": "images/0.png", "concepts": ["dog", "outdoor"]},
        {"path": manifest_images[1], "concepts": "cat"},
        {"path": "images/missing.png", "concepts": ["dog"]},
        {"path": manifest_images[2], "concepts": ["outdoor", "cat"]},
    ]
    manifest.write_text("\n".join(json.dumps(row) for row in rows) + "\n{not json\n\n")
    with caplog.at_level(logging.WARNING, logger="jaxembed.data"):
        data = load_source(str(manifest))
    _check_manifest_data(data, manifest_images, caplog)
    assert any(bad.path.endswith("labels.jsonl:5") and "JSON" in bad.reason for bad in data.bad_files)


def test_csv_manifest_without_header_is_rejected(tmp_path):
    manifest = tmp_path / "labels.csv"
    manifest.write_text("a.png,cat\n")
    with pytest.raises(ValueError, match="'path' and 'concepts'"):
        load_source(str(manifest))


# --- splits ------------------------------------------------------------------------------------------


def _fake_data(concept_sizes, multi_label=False) -> LabelledImages:
    labels = [(concept,) for concept, size in enumerate(concept_sizes) for _ in range(size)]
    if multi_label:
        labels = [(c, (c + 1) % len(concept_sizes)) if i % 3 == 0 else (c,) for i, (c,) in enumerate(labels)]
    return LabelledImages(
        items=tuple(f"image{i}.png" for i in range(len(labels))),
        labels=tuple(labels),
        concepts=tuple(f"c{c:03d}" for c in range(len(concept_sizes))),
        item_names=tuple(f"image{i}.png" for i in range(len(labels))),
    )


@settings(max_examples=40, deadline=None)
@given(
    concept_sizes=st.lists(st.integers(1, 12), min_size=1, max_size=8),
    holdout_fraction=st.floats(0.01, 0.99),
    seed=st.integers(0, 2**32),
)
def test_split_by_images_properties(concept_sizes, holdout_fraction, seed):
    data = _fake_data(concept_sizes)
    if len(data) < 2:
        with pytest.raises(ValueError):
            split_by_images(data, holdout_fraction, seed)
        return
    train, heldout = split_by_images(data, holdout_fraction, seed)
    again = split_by_images(data, holdout_fraction, seed)
    assert (train.items, heldout.items) == (again[0].items, again[1].items)
    assert len(train) and len(heldout)
    assert not set(train.items) & set(heldout.items)
    assert len(train) + len(heldout) == len(data)
    assert train.concepts == heldout.concepts == data.concepts
    if any(size > 1 for size in concept_sizes):  # every concept with 2+ images keeps one in training
        assert set(np.flatnonzero(data.concept_counts())) == set(np.flatnonzero(train.concept_counts()))
        assert abs(len(heldout) - holdout_fraction * len(data)) <= max(1, len(concept_sizes)) or len(heldout) == 1


def test_split_by_images_is_stratified():
    train, heldout = split_by_images(_fake_data([100, 50, 10]), 0.2, seed=0)
    assert list(heldout.concept_counts()) == [20, 10, 2]


def test_split_by_concepts_is_class_disjoint_and_deterministic(omniglot):
    train, heldout = split_by_concepts(omniglot, 0.34, seed=0)
    assert not set(train.concepts) & set(heldout.concepts)
    assert len(heldout.concepts) == 2 and len(train.concepts) == 4
    assert len(train) + len(heldout) == len(omniglot)
    assert heldout.num_concepts == int(heldout.primary_labels.max()) + 1  # re-indexed to its own concepts
    again = split_by_concepts(omniglot, 0.34, seed=0)
    assert (train.items, heldout.items) == (again[0].items, again[1].items)
    assert split_by_concepts(omniglot, 0.34, seed=1)[1].concepts != heldout.concepts


def test_split_by_concepts_multi_label_and_errors(caplog):
    data = _fake_data([6, 6, 6, 6], multi_label=True)
    with caplog.at_level(logging.WARNING, logger="jaxembed.data"):
        train, heldout = split_by_concepts(data, 0.5, seed=0)
    train_concepts = {train.concepts[i] for label in train.labels for i in label}
    held_concepts = {heldout.concepts[i] for label in heldout.labels for i in label}
    assert not train_concepts & held_concepts
    assert "both sides" in caplog.text
    with pytest.raises(ValueError, match="concept"):
        split_by_concepts(_fake_data([5]), 0.5, seed=0)
    with pytest.raises(ValueError, match="holdout_fraction"):
        split_by_images(_fake_data([5, 5]), 1.0, seed=0)


# --- errors, default, label map, TFDS ----------------------------------------------------------------


def test_dataset_smaller_than_a_batch_is_a_clear_error(omniglot):
    with pytest.raises(ValueError, match=r"120 images over 2 process\(es\) leave 60 .* batch_size=64"):
        train_batches(omniglot, image_size=16, batch_size=64, seed=0, process_count=2)  # raises at once


def test_missing_source_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_source(str(tmp_path / "nowhere"))


def test_embedded_default_loads_offline():
    data = load_source(None)
    assert len(data) == 1797 and data.bad_files == ()
    assert data.concepts == tuple(str(digit) for digit in range(10))
    assert data.concept_counts().min() >= 170
    assert load_source("default").items == data.items
    batch = next(train_batches(data, image_size=32, batch_size=16, seed=0))
    assert batch["image"].shape == (16, 32, 32, 3)


def test_label_map_round_trip(tmp_path, omniglot):
    path = tmp_path / "label_map.json"
    save_label_map(omniglot.concepts, path)
    assert load_label_map(path) == omniglot.concepts


def test_parse_tfds_spec():
    assert parse_tfds_spec("tfds:mnist") == ("mnist", "train")
    assert parse_tfds_spec("tfds:mnist:test") == ("mnist", "test")
    assert parse_tfds_spec("tfds:mnist:3.0.1") == ("mnist:3.0.1", "train")
    assert parse_tfds_spec("tfds:imagenet2012/subset:5.1.0:train[:10%]") == ("imagenet2012/subset:5.1.0", "train[:10%]")
    with pytest.raises(ValueError, match="tfds:NAME"):
        parse_tfds_spec("tfds:")


@pytest.mark.parametrize("file_format", ["array_record", "tfrecord"])  # tfds.data_source; tf.data
def test_tfds_source_reads_a_prepared_dataset(tmp_path, file_format):
    tfds = pytest.importorskip("tensorflow_datasets")

    class JaxembedTinyShapes(tfds.core.GeneratorBasedBuilder, skip_registration=True):
        """Six 2-colour images of three classes whose names are not in sorted order."""

        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            features = {
                "image": tfds.features.Image(shape=(None, None, 3)),
                "label": tfds.features.ClassLabel(names=["zeta", "alpha", "mid"]),
            }
            return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(features))

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples(6), "test": self._generate_examples(3)}

        def _generate_examples(self, count):
            for i in range(count):
                yield i, {"image": np.full((8 + i, 10, 3), 40 * (i % 3), np.uint8), "label": i % 3}

    JaxembedTinyShapes(data_dir=str(tmp_path), file_format=file_format).download_and_prepare()
    data = load_source("tfds:jaxembed_tiny_shapes", data_dir=str(tmp_path))
    assert len(data) == 6 and data.concepts == ("alpha", "mid", "zeta")
    # Class i % 3 of the builder ("zeta", "alpha", "mid") was drawn with gray level 40 * (i % 3).
    gray_of_concept = {"zeta": 0, "alpha": 40, "mid": 80}
    for item, label in zip(data.items, data.labels):
        assert (decode_image(item) == gray_of_concept[data.concepts[label[0]]]).all()
    assert len(load_source("tfds:jaxembed_tiny_shapes:test", data_dir=str(tmp_path))) == 3
    with pytest.raises(FileNotFoundError, match="not prepared"):
        load_source("tfds:mnist", data_dir=str(tmp_path / "empty"))


def _same_batches(first: list[dict], second: list[dict]) -> bool:
    return len(first) == len(second) and all(
        a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a) for a, b in zip(first, second))


def test_batches_do_not_depend_on_the_number_of_workers(omniglot):
    """Worker processes change where batches are made, not what they hold: the same training batches
    (across an epoch boundary, resumed mid-epoch) and the same evaluation pass as in-process loading."""
    steps = batches_per_pass(len(omniglot), 16)
    augmentation = Augmentation(flip=True, rotation_degrees=10, erase_probability=0.5)
    taken = steps + 2

    def train(workers):
        batches = train_batches(omniglot, image_size=16, batch_size=16, seed=5, augmentation=augmentation,
                                skip_batches=steps - 2, workers=workers)
        with contextlib.closing(batches):
            return [next(batches) for _ in range(taken)]

    in_process = train(0)
    assert _same_batches(train(2), in_process)
    assert not _same_batches(in_process[:2], in_process[2:4])  # a different epoch: different batches
    evaluation = [list(eval_batches(omniglot, image_size=16, batch_size=40, workers=w)) for w in (0, 3)]
    assert _same_batches(*evaluation) and sum(int(b["mask"].sum()) for b in evaluation[1]) == len(omniglot)


def test_train_batches_are_the_seeded_plan_augmented_image_by_image(omniglot):
    """An independent reference for one batch: the permutation and numbers drawn as documented, each image
    decoded and passed through the `Augmentation` by hand."""
    augmentation = Augmentation(crop_area=(0.5, 1.0), shear_degrees=20)
    steps = batches_per_pass(len(omniglot), 10, process_count=2)
    batch = next(train_batches(omniglot, image_size=24, batch_size=10, seed=7, augmentation=augmentation,
                               process_index=1, process_count=2, skip_batches=2 * steps + 3))  # epoch 2, step 3
    rng = np.random.default_rng([7, 2, 1])  # seed, epoch, process
    shard = np.arange(1, len(omniglot), 2)
    order = shard[rng.permutation(len(shard))[: steps * 10]].reshape(steps, 10)[3]
    numbers = [rng.random((steps, 10, k), dtype=np.float32)[3] for k in (5, 5, 2)]  # crop+flip, erasing, affine
    randoms = np.concatenate(numbers, axis=-1)
    assert np.array_equal(batch["index"], order)
    for row, index in enumerate(order):
        expected = augmentation(Image.fromarray(decode_image(omniglot.items[index])), 24, randoms[row])
        assert np.array_equal(batch["image"][row], expected)
        assert batch["label"][row] == omniglot.labels[index][0]


@dataclasses.dataclass(frozen=True)
class _KillOnBatch(pipeline.LoadBatch):
    """The batch loader, killing its own process (as the kernel's OOM killer would) on the batch that starts
    with image `first_index`."""

    first_index: int = -1

    def __call__(self, plan):
        if plan[0][0] == self.first_index:
            os.kill(os.getpid(), signal.SIGKILL)
        return super().__call__(plan)


def test_a_killed_worker_is_named_not_waited_for(omniglot):
    plan = pipeline.EvalPlan(len(omniglot), 8, 0, 1)
    load = _KillOnBatch(omniglot, 8, pipeline._EvalView(), draft_size=None, mask_key="mask", on_failure="",
                        first_index=5 * 8)  # batch 5
    batches = pipeline._read(plan, load, first=0, workers=2)
    received = []
    with pytest.raises(DataWorkerDied, match=r"data worker 1 of 2 died before handing over batch [135] .*SIGKILL") \
            as died:
        for batch in batches:
            received.append(batch)
    # Worker 1 makes batches 1, 3, 5 and dies making 5; those it had made but not handed over die with it.
    assert died.value.worker == 1 and died.value.batch in (1, 3, 5) and len(received) == died.value.batch


def test_a_worker_that_cannot_start_is_an_error_not_a_hang():
    """A program read from stdin cannot be imported again by a spawned worker, which dies while starting;
    the pipeline must say so rather than wait forever (its images, 1,797 PNGs, outgrow a pipe's buffer)."""
    script = ("from jaxembed import data\n"
              "batches = data.train_batches(data.load_source(None), image_size=8, batch_size=32, seed=0, workers=1)\n"
              "next(batches)\n")
    result = subprocess.run([sys.executable, "-"], input=script, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert "DataWorkerDied: data worker 0 of 1 died before handing over batch 0" in result.stderr


def test_workers_must_be_a_non_negative_integer(omniglot):
    for call in (train_batches, eval_batches):
        with pytest.raises(ValueError, match="workers=-1"):
            call(omniglot, image_size=8, batch_size=4, **({"seed": 0} if call is train_batches else {}), workers=-1)
