"""Omniglot: train on background_small1 (136 concepts), measure retrieval on background_small2's unseen ones.

    python experiments/omniglot.py [--templates inception_bn ...] [--image_size 48] [--num_epochs 10]

Both zips come from ../shared/datasets/omniglot (never copied into the repository). The two splits are
not disjoint: Greek and Latin (50 characters, 1,000 drawings) are in both, byte for byte. The test set
is therefore background_small2 without the concepts background_small1 has (`unseen_concepts`): 106
concepts of Japanese (katakana), Sanskrit and Tagalog, 2,120 drawings. Each template is trained with
the command printed in the table; its embeddings of those give Recall@1/@5, MAP@R and 20-way one-shot
accuracy within an alphabet (1,000 episodes; katakana and Sanskrit have 20 or more characters). A
raw-pixel nearest-neighbour baseline at the same image size is in the same table.
Writes experiments/results/omniglot.json and .md. Rows of templates not run now are kept from the
previous results, so `--templates resnext` adds or refreshes one row. Each row also holds the trainer's
held-out metrics (a 5% split of background_small1: images for the classifiers, concepts for ArcFace), the
only numbers to choose settings by, and the trainer's median images/s.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import zipfile

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.path.join(REPO, "..", "shared", "datasets", "omniglot")

# Per-template settings for a 2-core CPU; the --flag values a user can copy.
SETTINGS = {
    "inception_bn": ["--logreg", "0", "--per_item_lrate", "0.001"],
    "resnet_angular_margin": ["--arch", "resnet50", "--angular_scale", "32", "--angular_margin", "0.3",
                              "--embeddings_size", "128", "--per_item_lrate", "0.0005"],
    "resnext": ["--arch", "resnext50_32x4d", "--logreg", "0", "--per_item_lrate", "0.001"],
}


def extract(split: str, root: str) -> str:
    folder = os.path.join(root, split)
    if not os.path.isdir(folder):
        with zipfile.ZipFile(os.path.join(SHARED, f"{split}.zip")) as archive:
            archive.extractall(root)
    return folder


def unseen_concepts(test_images, train_images):
    """The images of `test_images` whose concepts `train_images` lacks, with their own concept list."""
    seen = set(train_images.concepts)
    keep = [i for i, labels in enumerate(test_images.labels)
            if not any(test_images.concepts[c] in seen for c in labels)]
    return test_images.subset(keep).with_own_concepts()


def metrics_of(embeddings: np.ndarray, images) -> dict:
    from jaxembed import evaluate

    names = np.asarray([images.concepts[label[0]] for label in images.labels])
    return evaluate.retrieval_metrics(embeddings, names, n_way=20, episodes=1000, seed=0)


def raw_pixel_baseline(images, image_size: int) -> dict:
    """Nearest neighbours on centred, L2-normalised grey pixels after the same eval preprocessing."""
    from jaxembed import data as data_lib

    pixels = np.stack([data_lib.preprocess_for_eval(data_lib.decode_image(item), image_size)[..., 0]
                       for item in images.items]).reshape(len(images), -1).astype(np.float32)
    pixels -= pixels.mean(axis=0)
    pixels /= np.linalg.norm(pixels, axis=1, keepdims=True) + 1e-8
    return metrics_of(pixels, images)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--templates", nargs="*", default=["inception_bn"])
    parser.add_argument("--image_size", type=int, default=48)
    parser.add_argument("--num_epochs", type=int, default=10)
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "jaxembed-omniglot"))
    parser.add_argument("--out", default=os.path.join(REPO, "experiments", "results", "omniglot.json"))
    args = parser.parse_args()

    import jaxembed
    from jaxembed import data as data_lib
    from jaxembed import evaluate

    train_folder = extract("images_background_small1", args.workdir)
    test_folder = extract("images_background_small2", args.workdir)
    all_test_images = data_lib.load_source(test_folder)
    test_images = unseen_concepts(all_test_images, data_lib.load_source(train_folder))
    print(f"test set: {len(test_images)} images of {len(test_images.concepts)} concepts; left out "
          f"{len(all_test_images) - len(test_images)} images of concepts also in the training split",
          file=sys.stderr, flush=True)
    baseline = {"method": f"raw pixels, {args.image_size} px", "command": "-", "train_minutes": 0.0,
                **raw_pixel_baseline(test_images, args.image_size)}
    rows = {row["method"]: row for row in previous_rows(args.out)}
    rows[baseline["method"]] = baseline
    for name in args.templates:
        epochs = str(args.num_epochs)
        workdir = os.path.join(args.workdir, f"run_{name}_{args.image_size}_{epochs}")
        if os.path.isdir(workdir):  # a fresh run, never a resumed one, so the time is a whole run's
            shutil.rmtree(workdir)
        command = ["python", "-m", "jaxembed.train", "--template", name, "--data", train_folder,
                   "--image_size", str(args.image_size), "--batch_size", str(args.batch_size),
                   "--num_epochs", epochs, "--init_epochs", str(max(1, args.num_epochs * 2 // 3)),
                   "--step_epochs", str(max(1, args.num_epochs // 6)), "--min_crop_area", "0.6",
                   "--holdout_fraction", "0.05", "--no_progress", *SETTINGS[name], "--workdir", workdir]
        print(f"{name}: {shlex.join(command)}", file=sys.stderr, flush=True)
        start = time.perf_counter()
        result = subprocess.run([sys.executable, *command[1:]], check=False, capture_output=True, text=True,
                                cwd=REPO)
        minutes = (time.perf_counter() - start) / 60
        if result.returncode != 0:
            raise RuntimeError(f"{shlex.join(command)} failed:\n{result.stderr[-3000:]}")
        embedder = jaxembed.load(workdir)
        outputs = evaluate.embed_images(embedder, test_images)
        with open(os.path.join(workdir, "summary.json")) as f:
            summary = json.load(f)
        row = {"method": f"{name} ({embedder.config.arch}), {args.image_size} px", "train_minutes": minutes,
               "images_per_second": median_throughput(workdir),
               "holdout": {k.removeprefix("eval/"): v for k, v in summary.items() if k.startswith("eval/")},
               "command": shlex.join(command[:-2]), **metrics_of(outputs["embedding"], test_images)}
        rows[row["method"]] = row
        print(f"{row['method']}: {minutes:.1f} min, recall@1 {row['recall@1']:.3f}", file=sys.stderr, flush=True)

    ordered = sorted(rows.values(), key=lambda row: (row["command"] != "-", row["method"]))  # baselines first
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(ordered, f, indent=2)
    table = markdown(ordered)
    with open(os.path.splitext(args.out)[0] + ".md", "w") as f:
        f.write(table)
    print(table)


def previous_rows(path: str) -> list[dict]:
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return json.load(f)


def median_throughput(workdir: str) -> float | None:
    """Median training images/s over the trainer's logged windows after the first (which includes the
    compilation); None when the run logged no such window."""
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        rates = [record["images_per_second"] for record in map(json.loads, f) if "images_per_second" in record]
    return statistics.median(rates[1:]) if len(rates) > 1 else None


def markdown(rows: list[dict]) -> str:
    def number(value, digits=3):
        return "-" if value is None else f"{value:.{digits}f}"

    lines = ["| method | Recall@1 | Recall@5 | MAP@R | 20-way one-shot | holdout (background_small1) | train time | images/s |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for row in rows:
        holdout = row.get("holdout", {})
        held = "; ".join(f"{name} {holdout[name]:.3f}" for name in ("top1", "mAP", "recall@1", "map@r")
                         if name in holdout) or "-"
        lines.append(f"| {row['method']} | {row['recall@1']:.3f} | {row['recall@5']:.3f} | {row['map@r']:.3f} "
                     f"| {number(row.get('one_shot_20way'))} | {held} | {row['train_minutes']:.1f} min "
                     f"| {number(row.get('images_per_second'), 0)} |")
    commands = [f"- {row['method']}: `{row['command']}`" for row in rows if row["command"] != "-"]
    caption = ("Omniglot background_small2 without the concepts background_small1 also has (Greek, Latin): "
               "106 concepts, 2,120 images, none trained on; holdout: the trainer's metrics on 5% of "
               "background_small1.")
    return "\n".join([caption, "", *lines, "", *commands, ""])


if __name__ == "__main__":
    main()
