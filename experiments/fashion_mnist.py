"""Fashion-MNIST: train each template on the 60,000 training images, score it on the official 10,000 test images.

    python experiments/fashion_mnist.py                                  # every row (about 1 h each on 2 CPU cores)
    python experiments/fashion_mnist.py --settings resnext_recipe        # rerun one row; the others are kept
    python experiments/fashion_mnist.py --settings inception_bn_recipe raw_pixels \\
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
import os
import re
import shutil
import sys
import tempfile
import time

import numpy as np
import runner  # experiments/runner.py: this script's folder is on sys.path

SOURCE = "/usr/share/datasets/fashion-mnist"
INSTALL_HINT = "sudo apt-get install dataset-fashion-mnist"

# Label index -> concept name, as in Xiao, Rasul & Vollgraf, "Fashion-MNIST" (2017).
CONCEPTS = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
SPLITS = {"train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", 60_000),
          "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz", 10_000)}

# idx magic number: two zero bytes, the element type (0x08 = unsigned byte), the number of dimensions.
_UBYTE = 0x08

# The rows: template, flags, and the training budget (num_epochs, num_items_per_epoch; None: every
# training image). Earlier rows (the ImageNet stem, flips always on, 25,000-50,000 images, per_item_lrate
# probes of 0.0003-0.001) reached test top-1 0.75-0.83, below raw-pixel 1-NN's 0.858; with flips now off by
# default their commands no longer reproduce them, so they were dropped (git history has them).
# The recipe rows (issue 18): one generic recipe for 28 px products, fixed before any test-split result
# and not tuned on it: products may be mirrored (--flip), a light random-resized crop, 0.1 per 128
# images (per_item_lrate 0.0008) with a 0.2-epoch warmup and cosine decay, Nesterov, label smoothing
# 0.1 for softmax, and the 3x3 stride-2 stem (16x16 into stage 1 at 32 px; the ImageNet stem leaves 8x8,
# the stride-1 small stem costs 4x more again: ~9 images/s on 2 cores for resnext50 at 32 px). Budgets:
# two epochs of the 57,000 training images for the classifiers (~37 images/s: ~51 min on 2 idle cores).
RECIPE = ["--stem", "small_s2", "--flip", "--min_crop_area", "0.8", "--warmup_epochs", "0.2",
          "--lr_schedule", "cosine", "--nesterov"]
BATCH_128_RECIPE = ["--batch_size", "128", "--flip", "--crop", "pad", "--crop_padding", "4", "--warmup_epochs", "0.3",
                    "--lr_schedule", "cosine", "--nesterov", "--per_item_lrate", "0.0008"]
FAST_RECIPE = ["--stem", "imagenet", *BATCH_128_RECIPE]
INCEPTION_BN_SMALL_S2 = ["--logreg", "0", "--label_smoothing", "0.1", "--stem", "small_s2", *BATCH_128_RECIPE]
SETTINGS = {
    "resnext_recipe": ("resnext", ["--arch", "resnext50_32x4d", "--logreg", "0", "--label_smoothing", "0.1",
                                   *RECIPE, "--per_item_lrate", "0.0008"], (2, None)),
    "inception_bn_recipe": ("inception_bn", ["--logreg", "0", "--label_smoothing", "0.1", *RECIPE,
                                             "--per_item_lrate", "0.0008"], (2, None)),
    "resnet_arcface_recipe": ("resnet_angular_margin",
                              ["--arch", "resnet50", "--embeddings_size", "128", "--angular_scale", "32",
                               "--angular_margin", "0.3", *RECIPE, "--per_item_lrate", "0.0008"], (2, None)),
    # More epochs instead of more pixels per image: the ImageNet stem (8x8 into stage 1 at 32 px) runs
    # ~4.5x faster than small_s2 (resnext50: ~168 vs ~37 images/s at batch 128 on 2 idle cores, 25-step
    # probes; ~125 in the real run, where the pad-and-flip augmentation shares the cores), so 7 epochs fit
    # in an hour where small_s2 fits 2. Batch 128 at 0.1 (the CIFAR ResNet rate), CIFAR-style
    # pad-and-crop with flips, Nesterov, 0.3-epoch warmup and cosine decay. inception_bn: ~200 images/s in
    # the probe when 6 epochs were chosen; ~330 since conv_forms.cpu_conv (3x3 on 2x2 maps as matrix
    # products), so 11 epochs (285 images/s in the real run, 44 min). 6 epochs had reached the same holdout
    # top-1 (0.901 vs 0.899) and a higher test top-1 (0.898 vs 0.880; git history has that row).
    "resnext_imagenet_stem": ("resnext", ["--arch", "resnext50_32x4d", "--logreg", "0", "--label_smoothing", "0.1",
                                          *FAST_RECIPE], (7, None)),
    "inception_bn_imagenet_stem": ("inception_bn", ["--logreg", "0", "--label_smoothing", "0.1", *FAST_RECIPE],
                                   (11, None)),
    # The same recipe through the 3x3 stride-2 stem: 8x8 maps into inception_3a at 32 px instead of 4x4
    # (2x2 from inception_4e on, instead of 1x1). 111 images/s in a 40-step probe at batch 128 on 2 idle
    # cores, so 6 epochs (~52 min) fit the hour; the GPU row with the stride-1 stem (16x16) reached 0.939
    # in 7. Holdout top-1 0.937 against the ImageNet-stem rows' 0.901 and 0.899 (test: 0.924, seed 1 0.925).
    "inception_bn_small_s2": ("inception_bn", INCEPTION_BN_SMALL_S2, (6, None)),
    # The same command with another seed (initialisation, batch order, augmentation, and which 5% of the
    # training images are held out, so its holdout is not the other rows'): the first seed's test top-1
    # was 0.924, close enough to the 0.92 asked to need a second.
    "inception_bn_small_s2_seed_1": ("inception_bn", [*INCEPTION_BN_SMALL_S2, "--seed", "1"], (6, None)),
    # A third seed: two runs at 0.924 and 0.925 sit 0.004-0.005 above the 0.92 asked, about the spread one
    # seed moves a run by, so one more says whether the mean holds: 0.927 (holdout 0.930; mean of three 0.925).
    "inception_bn_small_s2_seed_2": ("inception_bn", [*INCEPTION_BN_SMALL_S2, "--seed", "2"], (6, None)),
    # ArcFace on the same recipe (no label smoothing: the margin already keeps logits from saturating).
    # resnet50 trained at ~70 images/s here until 3x3 convolutions on 2x2 and 1x1 maps became matrix
    # products (conv_forms.cpu_conv): ~140 in a 40-step probe. 5 epochs ran at 155 images/s in 35.6 min
    # (test nearest-centre 0.853, below raw-pixel 1-NN; git history has that row), so the budget became 8
    # epochs (~49 min at that rate). They ran at 195 images/s on idle cores (39.8 min, holdout Recall@1
    # 0.838), so the budget became 10 epochs: 52.1 min at 190 images/s, holdout Recall@1 0.848.
    "resnet_arcface_imagenet_stem": ("resnet_angular_margin",
                                     ["--arch", "resnet50", "--embeddings_size", "128", "--angular_scale", "32",
                                      "--angular_margin", "0.3", *FAST_RECIPE], (10, None)),
    # The same with margin 0.2 (the template allows 0.1-0.9). At 0.3 the Coat and Pullover centres end at cosine
    # 1.00 (one centre for two concepts; Shirt's at 1.00 too): for images the backbone cannot yet tell
    # apart, an additive angular margin's loss falls as their centres approach each other
    # (log(1 + exp(s (cos a - cos(a + m)))) grows with the angle a between image and centre), so the
    # margin merges the centres of look-alike concepts, and once merged nothing pulls them apart. A
    # smaller margin pulls less. Chosen by holdout Recall@1 of 3-epoch screens (this command with
    # --num_epochs 3 --init_epochs 2): margin 0.3: 0.808 (MAP@R 0.654), Coat/Pullover centres at cosine
    # 1.000; 0.2: 0.850 (0.719), closest Shirt/T-shirt at 0.945; 0.1: 0.849 (0.709), Shirt/T-shirt at 0.934.
    # With the margin ramped up over the first epoch (--margin_warmup_epochs 1): 0.3: 0.847 (0.730), no
    # merge; 0.2: 0.851 (0.720); 0.5: 0.818 (0.656), Coat/Pullover merged (0.804 without the ramp). No ramp here.
    "resnet_arcface_margin_0.2": ("resnet_angular_margin",
                                  ["--arch", "resnet50", "--embeddings_size", "128", "--angular_scale", "32",
                                   "--angular_margin", "0.2", *FAST_RECIPE], (10, None)),
    # resnext at 48 px with the ImageNet stem: 12x12 maps into stage 1 (8x8 at 32 px) and 2x2 at the end
    # (1x1), for 2.5x the cost per image (55 against 137 images/s in a 20-step probe of the bare step),
    # so 3 epochs fit the hour instead of 7. small_s2 paid that way on inception_bn (whose ImageNet stem
    # leaves 4x4 into inception_3a); whether resolution or epochs limit resnext is what this row asks.
    # Epochs: holdout top-1 0.910 against the 7-epoch 32 px row's 0.921 (test 0.900 against 0.908).
    "resnext_48px": ("resnext", ["--arch", "resnext50_32x4d", "--logreg", "0", "--label_smoothing", "0.1",
                                 "--image_size", "48", *FAST_RECIPE], (3, None)),
}
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


def concept_names(labels: np.ndarray) -> np.ndarray:
    """Label indices -> the concept names the PNG cache's folders (and so the trained models) use."""
    return np.asarray([folder_name(concept) for concept in CONCEPTS])[labels]


def pixel_baseline(train: tuple[np.ndarray, np.ndarray], test: tuple[np.ndarray, np.ndarray]) -> dict:
    """Cosine nearest neighbours on the 28x28 grey pixels, centred on the training mean."""
    metrics = runner.raw_pixel_baseline(test[0], concept_names(test[1]), reference=(train[0], concept_names(train[1])))
    return {**metrics, "accuracy_kind": "1-NN vs train pixels", "num_test_images": len(test[0])}


def test_metrics(workdir: str, test_images) -> dict:
    """Test-split metrics of the run in `workdir` (see the module docstring)."""
    embedder, outputs = runner.embed(workdir, test_images)
    names = runner.concept_names(test_images, outputs["index"])
    return scores(outputs, names, concepts=embedder.concepts, task=embedder.task, variables=embedder.variables,
                  run=workdir)


def scores(outputs: dict, names: np.ndarray, *, concepts, task, variables, run: str) -> dict:
    """The metrics of eval-mode `outputs` (`embedding`, `logits` for classifiers) of images whose concepts are
    `names`, for the model `run` trained on `concepts` with `task` (a `jaxembed.tasks.Task`) and `variables`."""
    from jaxembed import metrics as metrics_lib
    from jaxembed.train.loop import closest_centres

    position = {name: i for i, name in enumerate(concepts)}
    if set(names) - set(position):
        raise ValueError(f"{run}: test concepts {sorted(set(names) - set(position))} were not trained")
    truth = np.array([position[name] for name in names])
    metrics = {"num_test_images": len(truth), **runner.retrieval(outputs["embedding"], names)}
    if "logits" in outputs:
        metrics["accuracy"] = metrics_lib.top1_accuracy(outputs["logits"], truth)
        metrics["accuracy_kind"] = "classifier top-1"
        # Each concept ranks the images by the task's probability (softmax or sigmoid of the logits).
        metrics["mAP"] = metrics_lib.mean_average_precision(task.predict(outputs), np.eye(len(position))[truth])
    elif task.has_class_centres:
        centres = runner.unit_rows(np.asarray(variables["params"]["centers"]).T)  # (num_concepts, D)
        metrics["accuracy"] = float(np.mean(np.argmax(outputs["embedding"] @ centres.T, axis=1) == truth))
        metrics["accuracy_kind"] = "nearest ArcFace centre"
        # Two concepts sharing a centre (cosine near 1) cap the accuracy: the trainer's check, also on GPU rows.
        metrics.update(closest_centres(concepts, variables["params"]["centers"]))
    return metrics


# ----------------------------------------------------------------------------- runs


def train_flags(setting: str, args, data: str) -> list[str]:
    """The `python -m jaxembed.train` flags of a row (without --workdir)."""
    template, flags, (epochs, items) = SETTINGS[setting]
    epochs = args.num_epochs or epochs
    items = args.num_items_per_epoch or items
    init_epochs = max(1, round(epochs * 2 / 3))  # then 0.1x, 0.01x ... every step_epochs
    step_epochs = max(1, (epochs - init_epochs) // 2)
    items_flags = [] if items is None else ["--num_items_per_epoch", str(items)]  # None: every training image
    # The row's own flags override the script's defaults.
    return runner.merged_flags(["--template", template, "--data", data,
                                "--image_size", str(args.image_size), "--batch_size", str(args.batch_size),
                                "--num_epochs", str(epochs), *items_flags,
                                "--init_epochs", str(init_epochs), "--step_epochs", str(step_epochs),
                                "--min_crop_area", str(args.min_crop_area), "--holdout", "images",
                                "--holdout_fraction", str(args.holdout_fraction), "--no_progress"], flags)


def run_setting(setting: str, args, train_folder: str, test_images) -> dict:
    """Trains one row from scratch (runs/<setting>) and scores it on the test split."""
    run = runner.train(train_flags(setting, args, train_folder), os.path.join(args.workdir, "runs", setting))
    record = run.run_dir.record()
    config = record["config"]
    start = time.perf_counter()
    test = test_metrics(run.workdir, test_images)
    return {
        "setting": setting, "template": config["template"], "arch": config["arch"],
        "settings": " ".join(SETTINGS[setting][1]), "image_size": config["image_size"],
        "train_seconds": run.seconds, "images_per_second": run.images_per_second(),
        "num_train_images": record["num_train_images"], "num_holdout_images": record["num_eval_images"],
        "images_seen": config["num_epochs"] * (config["num_items_per_epoch"] or record["num_train_images"]),
        "command": run.command, "holdout": run.holdout(), "train_loss": run.summary().get("train/loss"),
        "test": test, "test_seconds": time.perf_counter() - start,
        **runner.loss_curve_record(run, f"fashion_mnist_{setting}"),
    }


# ----------------------------------------------------------------------------- tables


def markdown(rows: list[dict]) -> str:
    number = runner.number
    cells = []
    for row in rows:
        test, holdout = row["test"], row.get("holdout", {})
        accuracy = number(test.get("accuracy"))
        if test.get("accuracy_kind"):
            closest = test.get("closest_centres")
            pair = (f"; closest centres {' and '.join(closest['concepts'])} at cosine {closest['cosine']:.2f}"
                    if closest else "")
            accuracy += f" ({test['accuracy_kind']}{pair})"
        held = "; ".join(f"{name} {holdout[name]:.3f}" for name in ("top1", "mAP", "recall@1") if name in holdout)
        seconds = row.get("train_seconds")
        cells.append([row["method"], row["settings"] or "-", accuracy, number(test.get("mAP")),
                      number(test.get("recall@1")), number(test.get("map@r")), held or "-",
                      "-" if seconds is None else f"{seconds / 60:.1f} min", number(row.get("images_per_second"), 0),
                      runner.loss_curve_cell(row)])
    table = runner.markdown_table(["method", "settings", "accuracy", "mAP", "R@1", "MAP@R", "holdout (train split)",
                                   "train time", "images/s", "largest step loss / window mean"], cells)
    commands = [f"- {row['method']}: `{row['command']}`" for row in rows if row.get("command")]
    return "\n".join([
        ("Fashion-MNIST test split (10,000 images, 10 concepts); accuracy and mAP of the classifier outputs "
         "(ArcFace: nearest learned centre; raw pixels: 1-NN against the 60,000 training images), R@1 and "
         "MAP@R of leave-one-out retrieval among the test images. Holdout: the trainer's metrics on the "
         "held-out part of the training split, the only numbers to choose settings by."),
        "", *table, "", "Commands (`--data` is the PNG cache that `experiments/fashion_mnist.py` writes):", "",
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
    parser.add_argument("--results", default=os.path.join(runner.REPO, "experiments", "results", "fashion_mnist"),
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
                     "command": None, "test": pixel_baseline(train, test), "seconds": time.perf_counter() - start})
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
    previous = [row for row in runner.previous_rows(args.results + ".json") if row["setting"] not in selected]
    order = {name: i for i, name in enumerate([BASELINE, *SETTINGS])}
    rows = sorted(previous + rows, key=lambda row: order.get(row["setting"], len(order)))
    table = markdown(rows)
    runner.write_results(args.results, rows, table)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
