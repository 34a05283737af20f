"""Fashion-MNIST: train each template on the 60,000 training images, score it on the official 10,000 test images.

    python experiments/fashion_mnist.py                                  # every row (about 1.5 h on 2 CPU cores)
    python experiments/fashion_mnist.py --settings resnext_softmax       # rerun one row; the others are kept
    python experiments/fashion_mnist.py --settings inception_bn_softmax raw_pixels \\
        --num_items_per_epoch 512 --num_epochs 1                         # a smoke test in a few minutes

The data are the idx files of Debian's dataset-fashion-mnist package (`apt-get install
dataset-fashion-mnist`: /usr/share/datasets/fashion-mnist/{train,t10k}-{images-idx3,labels-idx1}-ubyte.gz),
read with NumPy and written once as PNG files in concept folders (`<cache>/{train,test}/<concept>/`),
the form `python -m jaxembed.train --data FOLDER` reads.

Each row trains with the real command line in a subprocess (the exact command is in the table), then
`jaxembed.load(workdir)` embeds the test split:
- classifier templates (inception_bn, resnext): top-1 accuracy and mAP (one-vs-rest average precision
  of each concept's logits, averaged over the 10 concepts) of the classifier outputs, and Recall@1 and
  MAP@R of the embeddings (leave-one-out retrieval among the 10,000 test images);
- ArcFace (resnet_angular_margin): Recall@1 and MAP@R of the embeddings, and nearest-centre accuracy
  (each test image gets the concept whose learned ArcFace centre is most cosine-similar);
- raw pixels: the 28x28 grey pixels, centred on the training mean and L2-normalised: test-vs-test
  Recall@1 / MAP@R, and 1-nearest-neighbour accuracy of each test image against the 60,000 training images.

Tune on the training split only: every run holds out --holdout_fraction of the training images (the
same images for every row; `--holdout images`) and the trainer's metrics on them are in the JSON under
`holdout`; the test split is never used to choose settings. Writes <results>.json and <results>.md;
rows already there for settings not rerun are kept.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SOURCE = "/usr/share/datasets/fashion-mnist"
INSTALL_HINT = "sudo apt-get install dataset-fashion-mnist"

# Label index -> concept name, as in Xiao, Rasul & Vollgraf, "Fashion-MNIST" (2017).
CONCEPTS = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
SPLITS = {"train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", 60_000),
          "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz", 10_000)}

# idx magic number: two zero bytes, the element type (0x08 = unsigned byte), the number of dimensions.
_UBYTE = 0x08

# The rows: template, flags, and the training budget (num_epochs, num_items_per_epoch). A training image
# at 32 px, batch 32, costs about 15 ms of CPU time for inception_bn, 17 ms for resnext50_32x4d and
# 33 ms for resnet50 (measured on the 2-core development machine, data pipeline included), so on 2 idle
# cores (~100, ~90 and ~50 images/s) each row trains in about 8-9 minutes plus 2-4 minutes of loading,
# compiling and evaluating. The learning rates follow experiments/omniglot.py.
SETTINGS = {
    "inception_bn_softmax": ("inception_bn", ["--logreg", "0", "--per_item_lrate", "0.001"], (5, 10_000)),
    "inception_bn_sigmoid": ("inception_bn", ["--logreg", "1", "--per_item_lrate", "0.001"], (5, 10_000)),
    "resnext_softmax": ("resnext", ["--arch", "resnext50_32x4d", "--logreg", "0", "--per_item_lrate", "0.001"],
                        (5, 9_000)),
    "resnext_sigmoid": ("resnext", ["--arch", "resnext50_32x4d", "--logreg", "1", "--per_item_lrate", "0.001"],
                        (5, 9_000)),
    "resnet_arcface": ("resnet_angular_margin",
                       ["--arch", "resnet50", "--embeddings_size", "128", "--angular_scale", "32",
                        "--angular_margin", "0.3", "--per_item_lrate", "0.0005"], (5, 5_000)),
}


def _with_lrate(setting: str, per_item_lrate: str) -> tuple:
    template, flags, budget = SETTINGS[setting]
    at = flags.index("--per_item_lrate")
    return template, [*flags[:at], "--per_item_lrate", per_item_lrate, *flags[at + 2:]], budget


# The learning-rate probes: one more per_item_lrate per template, chosen between on the holdout metrics.
# The classifiers' loss spikes at 0.001 (lr 0.032 at batch 32), so they probe lower; ArcFace probes higher.
SETTINGS.update({f"{setting}_lr{lrate}": _with_lrate(setting, lrate) for setting, lrate in
                 [("inception_bn_softmax", "0.0003"), ("resnext_softmax", "0.0003"), ("resnet_arcface", "0.001"),
                  ("inception_bn_sigmoid", "0.0003"), ("resnext_sigmoid", "0.0003")]})
BASELINE = "raw_pixels"


# ----------------------------------------------------------------------------- idx files


def read_idx(path: str, *, ndim: int) -> np.ndarray:
    """The uint8 array of a gzipped idx file (LeCun's MNIST format), checked against its header.

    Args:
      path: a `*-ubyte.gz` file.
      ndim: the number of dimensions expected (1 for labels, 3 for images).

    Raises:
      FileNotFoundError: no such file; the message says how to install the dataset.
      ValueError: a wrong magic number, dimension count or data length.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} not found: install Fashion-MNIST with `{INSTALL_HINT}` "
                                "(or pass --source DIR holding the four *-ubyte.gz idx files)")
    with gzip.open(path, "rb") as f:
        raw = f.read()
    magic = raw[:4]
    if magic != bytes([0, 0, _UBYTE, ndim]):
        raise ValueError(f"{path}: idx magic number {magic.hex() or '(empty file)'} is not that of an "
                         f"unsigned-byte array of {ndim} dimensions (expected 000008{ndim:02x})")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(f"{path}: {len(raw)} bytes, shorter than an idx header of {ndim} dimensions")
    shape = tuple(int(n) for n in np.frombuffer(raw, ">u4", count=ndim, offset=4))
    size = int(np.prod(shape))
    if len(raw) - header != size:
        raise ValueError(f"{path}: the header promises {shape} = {size} bytes of data, the file holds "
                         f"{len(raw) - header}")
    return np.frombuffer(raw, np.uint8, offset=header).reshape(shape)


def read_split(source: str, split: str) -> tuple[np.ndarray, np.ndarray]:
    """`(images uint8 (N, 28, 28), labels uint8 (N,))` of the official `train` or `test` split."""
    images_file, labels_file, expected = SPLITS[split]
    images = read_idx(os.path.join(source, images_file), ndim=3)
    labels = read_idx(os.path.join(source, labels_file), ndim=1)
    if len(images) != len(labels):
        raise ValueError(f"{source}: {split} has {len(images)} images but {len(labels)} labels")
    if len(images) != expected or images.shape[1:] != (28, 28):
        raise ValueError(f"{source}: {split} images have shape {images.shape}, expected ({expected}, 28, 28)")
    if labels.max(initial=0) >= len(CONCEPTS):
        raise ValueError(f"{source}: {split} has label {labels.max()}, expected 0..{len(CONCEPTS) - 1}")
    return images, labels


def folder_name(concept: str) -> str:
    """A concept name as a folder name: `T-shirt/top` -> `T-shirt_top`, `Ankle boot` -> `Ankle_boot`."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", concept)


def write_folder(images: np.ndarray, labels: np.ndarray, folder: str) -> str:
    """Writes `folder/<concept>/<index>.png` for every image, once: a complete folder is left as it is.

    Completion is marked by a hidden `.complete` file (hidden files are ignored by the data loader), so
    an interrupted write is redone.
    """
    from PIL import Image

    marker = os.path.join(folder, ".complete")
    if os.path.exists(marker):
        return folder
    if os.path.isdir(folder):
        shutil.rmtree(folder)
    for concept in CONCEPTS:
        os.makedirs(os.path.join(folder, folder_name(concept)))
    for index, (image, label) in enumerate(zip(images, labels, strict=True)):
        Image.fromarray(image).save(os.path.join(folder, folder_name(CONCEPTS[label]), f"{index:05d}.png"))
    with open(marker, "w") as f:
        f.write(f"{len(images)}\n")
    return folder


# ----------------------------------------------------------------------------- metrics


def retrieval(embeddings: np.ndarray, labels: np.ndarray) -> dict:
    """Leave-one-out Recall@1/@5 and MAP@R among the given items."""
    from jaxembed import evaluate

    return {**evaluate.recall_at_k(embeddings, labels), "map@r": evaluate.map_at_r(embeddings, labels)}


def unit_rows(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def raw_pixel_baseline(train: tuple[np.ndarray, np.ndarray], test: tuple[np.ndarray, np.ndarray]) -> dict:
    """Cosine nearest neighbours on the 28x28 grey pixels, centred on the training mean."""
    mean = train[0].reshape(len(train[0]), -1).astype(np.float32).mean(axis=0)
    train_x = unit_rows(train[0].reshape(len(train[0]), -1) - mean)
    test_x = unit_rows(test[0].reshape(len(test[0]), -1) - mean)
    nearest = np.concatenate([np.argmax(test_x[start:start + 1000] @ train_x.T, axis=1)
                              for start in range(0, len(test_x), 1000)])
    return {"accuracy": float(np.mean(train[1][nearest] == test[1])), "accuracy_kind": "1-NN vs train pixels",
            "num_test_images": len(test_x), **retrieval(test_x, test[1])}


def test_metrics(workdir: str, test_images) -> dict:
    """Test-split metrics of the run in `workdir` (see the module docstring)."""
    import jax

    import jaxembed
    from jaxembed import evaluate

    embedder = jaxembed.load(workdir)
    outputs = evaluate.embed_images(embedder, test_images)
    names = [test_images.concepts[test_images.labels[i][0]] for i in outputs["index"]]
    position = {name: i for i, name in enumerate(embedder.concepts)}
    if set(names) - set(position):
        raise ValueError(f"{workdir}: test concepts {sorted(set(names) - set(position))} were not trained")
    truth = np.array([position[name] for name in names])
    metrics = {"num_test_images": len(truth), **retrieval(outputs["embedding"], truth)}
    if "logits" in outputs:
        metrics["accuracy"] = evaluate.top1_accuracy(outputs["logits"], truth)
        metrics["accuracy_kind"] = "classifier top-1"
        # Each concept ranks the images by probability: sigmoid is monotonic in the logit, softmax is not.
        logits = outputs["logits"]
        scores = logits if embedder.config.logreg else np.asarray(jax.nn.softmax(logits, axis=1))
        metrics["mAP"] = evaluate.mean_average_precision(scores, np.eye(len(position))[truth])
    elif "centers" in embedder.variables["params"]:
        centres = unit_rows(np.asarray(embedder.variables["params"]["centers"]).T)  # (num_concepts, D)
        metrics["accuracy"] = float(np.mean(np.argmax(outputs["embedding"] @ centres.T, axis=1) == truth))
        metrics["accuracy_kind"] = "nearest ArcFace centre"
    return metrics


def throughput(workdir: str) -> float | None:
    """Median training images/s over the trainer's logged windows after the first (which includes the
    compilation); None when the run logged no such window."""
    rates = []
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        for line in f:
            record = json.loads(line)
            if "images_per_second" in record:
                rates.append(record["images_per_second"])
    return statistics.median(rates[1:]) if len(rates) > 1 else None


# ----------------------------------------------------------------------------- runs


def train_command(setting: str, args, data: str, workdir: str) -> list[str]:
    template, flags, (epochs, items) = SETTINGS[setting]
    epochs = args.num_epochs or epochs
    items = args.num_items_per_epoch or items
    init_epochs = max(1, round(epochs * 2 / 3))  # then 0.1x, 0.01x ... every step_epochs
    step_epochs = max(1, (epochs - init_epochs) // 2)
    return ["python", "-m", "jaxembed.train", "--template", template, *flags, "--data", data,
            "--image_size", str(args.image_size), "--batch_size", str(args.batch_size),
            "--num_epochs", str(epochs), "--num_items_per_epoch", str(items),
            "--init_epochs", str(init_epochs), "--step_epochs", str(step_epochs),
            "--min_crop_area", str(args.min_crop_area), "--holdout", "images",
            "--holdout_fraction", str(args.holdout_fraction), "--no_progress", "--workdir", workdir]


def run_setting(setting: str, args, train_folder: str, test_images) -> dict:
    workdir = os.path.join(args.workdir, "runs", setting)
    if os.path.isdir(workdir):  # always a fresh run, so the time measured is a whole run's
        shutil.rmtree(workdir)
    os.makedirs(workdir)
    command = train_command(setting, args, train_folder, workdir)
    print(f"{setting}: {shlex.join(command)}", file=sys.stderr, flush=True)
    start = time.perf_counter()
    with open(os.path.join(workdir, "train.log"), "w") as log:
        result = subprocess.run([sys.executable, *command[1:]], check=False, stdout=log, stderr=subprocess.STDOUT,
                                cwd=REPO)
    seconds = time.perf_counter() - start
    if result.returncode != 0:
        with open(os.path.join(workdir, "train.log")) as log:
            raise RuntimeError(f"{shlex.join(command)} failed ({result.returncode}):\n{log.read()[-3000:]}")
    with open(os.path.join(workdir, "summary.json")) as f:
        summary = json.load(f)
    with open(os.path.join(workdir, "run.json")) as f:
        record = json.load(f)
    config = record["config"]
    start = time.perf_counter()
    test = test_metrics(workdir, test_images)
    return {
        "setting": setting, "template": config["template"], "arch": config["arch"],
        "settings": " ".join(SETTINGS[setting][1]), "image_size": config["image_size"],
        "train_seconds": seconds, "images_per_second": throughput(workdir),
        "num_train_images": record["num_train_images"], "num_holdout_images": record["num_eval_images"],
        "images_seen": config["num_epochs"] * config["num_items_per_epoch"],
        "command": shlex.join(command[:-2]),  # the workdir is this machine's
        "holdout": {k.removeprefix("eval/"): v for k, v in summary.items() if k.startswith("eval/")},
        "train_loss": summary.get("train/loss"),
        "test": test, "test_seconds": time.perf_counter() - start,
    }


# ----------------------------------------------------------------------------- tables


def _number(value, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def markdown(rows: list[dict]) -> str:
    lines = ["| method | settings | accuracy | mAP | R@1 | MAP@R | holdout (train split) | train time | images/s |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for row in rows:
        test, holdout = row["test"], row.get("holdout", {})
        accuracy = _number(test.get("accuracy"))
        if test.get("accuracy_kind"):
            accuracy += f" ({test['accuracy_kind']})"
        held = "; ".join(f"{name} {holdout[name]:.3f}" for name in ("top1", "mAP", "recall@1") if name in holdout)
        minutes = row.get("train_seconds")
        lines.append(
            f"| {row['method']} | {row['settings'] or '-'} | {accuracy} | {_number(test.get('mAP'))} "
            f"| {_number(test.get('recall@1'))} | {_number(test.get('map@r'))} | {held or '-'} "
            f"| {'-' if minutes is None else f'{minutes / 60:.1f} min'} | {_number(row.get('images_per_second'), 0)} |")
    commands = [f"- {row['method']}: `{row['command']}`" for row in rows if row.get("command")]
    return "\n".join([
        ("Fashion-MNIST test split (10,000 images, 10 concepts); accuracy and mAP of the classifier outputs "
         "(ArcFace: nearest learned centre; raw pixels: 1-NN against the 60,000 training images), R@1 and "
         "MAP@R of leave-one-out retrieval among the test images. Holdout: the trainer's metrics on the "
         "held-out part of the training split, the only numbers to choose settings by."),
        "", *lines, "", "Commands (`--data` is the PNG cache that `experiments/fashion_mnist.py` writes):", "",
        *commands, ""])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n".join(__doc__.splitlines()[1:]))
    names = [*SETTINGS, BASELINE]
    parser.add_argument("--settings", nargs="+", choices=names, default=names, help="rows to (re)compute")
    parser.add_argument("--templates", nargs="+", default=None,
                        help="only the trained rows of these templates (the raw-pixel row stays if selected)")
    parser.add_argument("--image_size", type=int, default=32)
    parser.add_argument("--num_epochs", type=int, default=None, help="override every row's default budget")
    parser.add_argument("--num_items_per_epoch", type=int, default=None, help="override every row's default")
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--min_crop_area", type=float, default=0.6)
    parser.add_argument("--holdout_fraction", type=float, default=0.05)
    parser.add_argument("--source", default=SOURCE, help="folder with the four *-ubyte.gz idx files")
    parser.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "jaxembed-fashion-mnist"),
                        help="the PNG cache (train/, test/) and one run folder per row (runs/<setting>)")
    parser.add_argument("--results", default=os.path.join(REPO, "experiments", "results", "fashion_mnist"),
                        help="writes RESULTS.json and RESULTS.md")
    args = parser.parse_args(argv)
    selected = [name for name in args.settings
                if name == BASELINE or args.templates is None or SETTINGS[name][0] in args.templates]
    if not selected:
        parser.error(f"no row of --settings {args.settings} uses --templates {args.templates}")

    try:
        train, test = read_split(args.source, "train"), read_split(args.source, "test")
    except (FileNotFoundError, ValueError) as error:
        print(f"fashion_mnist: error: {error}", file=sys.stderr)
        return 1
    start = time.perf_counter()
    train_folder = write_folder(*train, os.path.join(args.workdir, "train"))
    test_folder = write_folder(*test, os.path.join(args.workdir, "test"))
    print(f"PNG cache in {args.workdir} ({time.perf_counter() - start:.0f} s)", file=sys.stderr, flush=True)

    rows = []
    if BASELINE in selected:
        start = time.perf_counter()
        rows.append({"setting": BASELINE, "method": "raw pixels (28x28 grey, centred, cosine)", "settings": "",
                     "command": None, "test": raw_pixel_baseline(train, test),
                     "seconds": time.perf_counter() - start})
        print(f"{BASELINE}: {rows[-1]['test']}", file=sys.stderr, flush=True)
    trained = [name for name in selected if name != BASELINE]
    if trained:
        from jaxembed import data as data_lib

        test_images = data_lib.load_source(test_folder)
        for name in trained:
            row = run_setting(name, args, train_folder, test_images)
            row["method"] = f"{row['template']} ({row['arch']}), {row['image_size']} px, {row['images_seen']:,} images"
            rows.append(row)
            print(f"{name}: {row['train_seconds'] / 60:.1f} min, test {row['test']}", file=sys.stderr, flush=True)

    # Rows of settings not recomputed now are kept from the previous results, in SETTINGS order.
    json_path = args.results + ".json"
    previous = []
    if os.path.exists(json_path):
        with open(json_path) as f:
            previous = [row for row in json.load(f) if row["setting"] not in selected]
    order = {name: i for i, name in enumerate([BASELINE, *SETTINGS])}
    rows = sorted(previous + rows, key=lambda row: order.get(row["setting"], len(order)))
    os.makedirs(os.path.dirname(os.path.abspath(json_path)), exist_ok=True)
    with open(json_path, "w") as f:
        json.dump(rows, f, indent=2)
        f.write("\n")
    table = markdown(rows)
    with open(args.results + ".md", "w") as f:
        f.write(table)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
