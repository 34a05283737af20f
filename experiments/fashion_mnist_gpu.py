"""Fashion-MNIST rows on one accelerator within a wall-clock budget: what the recipe reaches with compute.

    python experiments/fashion_mnist_gpu.py --setting resnext_small_stem --seconds 250 --out DIR
    python experiments/fashion_mnist_gpu.py --collect DIR        # DIR/*.json -> experiments/results/fashion_mnist_gpu.*

The 2-core CPU rows of `experiments/fashion_mnist.py` fit 7-11 epochs with the ImageNet stem (8x8 maps into
stage 1 at 32 px). This script trains the same rows with the stride-1 small stem (32x32 into stage 1, the
usual CIFAR setting) in bfloat16, for as many epochs as fit in `--seconds` on the machine it runs on.

Everything but the batches is the trainer's own (`accelerator_rows`: the trainer's config, holdout, model,
loss, optimiser and jitted step; batches from its augmentation of the PNG-encoded images, in forked worker
processes; the epoch count from a timed probe).

Scores on the official 10,000 test images with `fashion_mnist.scores` (top-1 and mAP of classifiers,
nearest ArcFace centre, leave-one-out Recall@1 and MAP@R), and the same on the holdout. Writes
OUT/<setting>.json; `--collect OUT` gathers those into experiments/results/fashion_mnist_gpu.json and .md
(rows already there for other settings are kept).
"""

from __future__ import annotations

import argparse
import io
import shlex
import sys
import time

import numpy as np
import accelerator_rows  # experiments/accelerator_rows.py: this script's folder is on sys.path
import fashion_mnist  # experiments/fashion_mnist.py: this script's folder is on sys.path
import runner

# Row -> (the fashion_mnist.py row it starts from, flags overriding that row's).
GPU_FLAGS = ["--stem", "small", "--dtype", "bfloat16"]
SETTINGS = {
    "resnext_small_stem": ("resnext_imagenet_stem", GPU_FLAGS),
    "resnet_arcface_small_stem": ("resnet_arcface_imagenet_stem", GPU_FLAGS),
    "resnet_arcface_margin_0.2_small_stem": ("resnet_arcface_margin_0.2", GPU_FLAGS),
    "inception_bn_small_stem": ("inception_bn_imagenet_stem", GPU_FLAGS),
}


def in_memory_images(images: np.ndarray, labels: np.ndarray, split: str):
    """A `LabelledImages` of PNG bytes with the concept names of the PNG cache (`fashion_mnist.folder_name`)."""
    from PIL import Image

    from jaxembed import data as data_lib

    def png(image: np.ndarray) -> bytes:
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, format="PNG")
        return buffer.getvalue()

    concepts = tuple(sorted(fashion_mnist.folder_name(c) for c in fashion_mnist.CONCEPTS))
    names = fashion_mnist.concept_names(labels)
    return data_lib.LabelledImages(
        items=tuple(png(image) for image in images), labels=tuple((concepts.index(n),) for n in names),
        concepts=concepts, item_names=tuple(f"fashion_mnist:{split}[{i}]" for i in range(len(images))),
        source=f"fashion_mnist:{split}")


def row_flags(setting: str, num_epochs: int, trainer_flags: str = "") -> list[str]:
    """The trainer flags of a row: fashion_mnist.py's row with this script's overrides, then `trainer_flags`."""
    base, overrides = SETTINGS[setting]
    script_args = argparse.Namespace(num_epochs=num_epochs, num_items_per_epoch=None, image_size=32,
                                     batch_size=32, min_crop_area=0.6, holdout_fraction=0.05)
    return runner.merged_flags(fashion_mnist.train_flags(base, script_args, "<in-memory>"), overrides,
                               shlex.split(trainer_flags))


def train_row(setting: str, args, pool, data, test_images) -> dict:
    start = time.perf_counter()
    trained = accelerator_rows.train_within_budget(
        setting, lambda num_epochs: row_flags(setting, num_epochs, args.trainer_flags), data, pool,
        seconds=args.seconds, eval_seconds=args.eval_seconds, probe_steps=args.probe_steps)
    run, variables = trained.run, trained.state.variables
    scored = {}
    for split, images in (("test", test_images), ("holdout", run.eval_data)):
        outputs = accelerator_rows.eval_outputs(trained.steps, variables,
                                                runner.eval_images(images, run.config.image_size))
        scored[split] = fashion_mnist.scores(outputs, runner.concept_names(images), concepts=run.concepts,
                                             task=run.task, variables=variables, run=setting)
    return {"setting": setting, "template": run.config.template.name, "arch": run.config.arch,
            "settings": " ".join(SETTINGS[setting][1]), **trained.record(),
            "test": scored["test"], "holdout": scored["holdout"], "total_seconds": time.perf_counter() - start}


def markdown(rows: list[dict]) -> str:
    cells = []
    for row in rows:
        test, holdout = row["test"], row["holdout"]
        cells.append([f"{row['template']} ({row['arch']}), {row['num_epochs']} epochs", row["settings"],
                      f"{test['accuracy']:.3f} ({test['accuracy_kind']})", runner.number(test.get("mAP")),
                      f"{test['recall@1']:.3f}", f"{test['map@r']:.3f}",
                      f"accuracy {holdout['accuracy']:.3f}; recall@1 {holdout['recall@1']:.3f}",
                      f"{row['train_seconds']:.0f} s", f"{row['images_per_second']:,.0f}", row["device"]])
    table = runner.markdown_table(["method", "settings over the CPU row", "accuracy", "mAP", "R@1", "MAP@R",
                                   "holdout (train split)", "train time", "images/s", "device"], cells)
    commands = [f"- {row['template']}: `{row['command']}`" for row in rows]
    caption = ("Fashion-MNIST test split (10,000 images) after training on one accelerator for the epochs that fit "
               "the row's budget (`experiments/fashion_mnist_gpu.py`); metrics as in fashion_mnist.md. The "
               "trainer flags of each row (the script feeds the trainer's step from memory; with `--data` the "
               "PNG cache of fashion_mnist.py, `python -m jaxembed.train` runs the same recipe, holding out "
               "other images of the same 5%):")
    return "\n".join([caption, "", *table, "", *commands, ""])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    accelerator_rows.script_arguments(parser, SETTINGS, "fashion_mnist_gpu", seconds=240)
    parser.add_argument("--source", default=fashion_mnist.SOURCE)
    args = accelerator_rows.parse_or_collect(parser, argv, SETTINGS, markdown)
    if args is None:
        return 0

    data = in_memory_images(*fashion_mnist.read_split(args.source, "train"), "train")
    test_images = in_memory_images(*fashion_mnist.read_split(args.source, "test"), "test")
    with accelerator_rows.worker_pool(data.items, args.workers) as pool:
        for setting in args.setting:
            accelerator_rows.write_row(args.out, train_row(setting, args, pool, data, test_images))
    return 0


if __name__ == "__main__":
    sys.exit(main())
