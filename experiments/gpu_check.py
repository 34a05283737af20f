"""The product on one GPU, in one call of at most 9 minutes: `python -m jaxembed.train` itself (no bypass).

    python experiments/gpu_check.py --out DIR                  # on the GPU machine (see "Running it there")
    python experiments/gpu_check.py --smoke --out /tmp/check   # the CPU dry run: tiny sizes, a few steps

Writes DIR/gpu_check.json (and DIR/train_logs: each trainer's log) with, in this order:

(c) the device kind and the library versions;
(b) images/s of the trainer's own steps at 224 px in bfloat16, batch 128, for resnet101 (ArcFace),
    resnext101_32x8d and BN-Inception: `python -m jaxembed.train` on the Fashion-MNIST PNG folder (each
    28 px image resized in the data workers), the median of its logged windows after the first
    (compilation) one; beside it the step alone on a fixed device batch (`experiments/benchmark.py`'s
    JAX worker, the same jitted step): a trainer rate well under the step's shows a slow input pipeline;
(a) two Fashion-MNIST rows of `experiments/fashion_mnist.py` on one GPU (`--stem small --dtype bfloat16`
    over the CPU row, a fixed number of epochs chosen to fit), scored on the 10,000 test images: resnext
    (target test top-1 >= 0.93) and ArcFace at margin 0.2 (target nearest-centre accuracy >= 0.92).

Each part is skipped, and says so in the JSON, when the time left (`--seconds`, default 530) is too short
for it (the dry run has no budget); a failed part records its error and the rest still run. The JSON is rewritten after every part.

Running it there (the machine has JAX, flax, optax, orbax, numpy, pillow and tensorboard, no network):
`bash experiments/gpu_wheels.sh` here fetches the wheels it lacks into `.whl/` and copies Fashion-MNIST's
four files into `.gpu_data/`; then run, with both folders carried:
`python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && PYTHONPATH=/tmp/site:$PWD
python3 experiments/gpu_check.py --source .gpu_data --out $OUT`.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import statistics
import sys
import tempfile
import time

import benchmark  # experiments/benchmark.py: this script's folder is on sys.path
import fashion_mnist  # experiments/fashion_mnist.py
import runner  # experiments/runner.py

GPU_FLAGS = ["--stem", "small", "--dtype", "bfloat16"]
# Fashion-MNIST row -> (fashion_mnist.py's CPU row, epochs on one GPU). The epochs fit the budget at the
# rates the rows reached on an H200 (10-11k images/s, 57,000 training images: 5-6 s an epoch).
ROWS = {"resnext_small_stem": ("resnext_imagenet_stem", 15),
        "resnet_arcface_margin_0.2_small_stem": ("resnet_arcface_margin_0.2", 20)}
TARGETS = {"resnext_small_stem": 0.93, "resnet_arcface_margin_0.2_small_stem": 0.92}
# Throughput rows: template -> arch (each template's default backbone).
THROUGHPUT = {"resnet_angular_margin": "resnet101", "resnext": "resnext101_32x8d", "inception_bn": "inception_bn"}
# Seconds a part needs at least, compilation included; a part with less time left is skipped.
NEEDS = {"throughput": 60, "row": 120}
LIBRARIES = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "grain", "numpy", "pillow", "tensorboard")


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="folder of gpu_check.json and the trainers' logs")
    parser.add_argument("--source", default=fashion_mnist.SOURCE, help="folder of Fashion-MNIST's four .gz files")
    parser.add_argument("--seconds", type=float, default=None,
                        help="wall-clock budget of the whole check (default 530; none with --smoke)")
    parser.add_argument("--smoke", action="store_true", help="CPU dry run: 32 px, batch 8, a few steps, 512 images")
    parser.add_argument("--parts", nargs="+", choices=("throughput", "rows"), default=["throughput", "rows"])
    args = parser.parse_args(argv)
    if args.seconds is None:
        args.seconds = float("inf") if args.smoke else 530.0
    return args


def environment() -> dict:
    """(c): the device and the library versions."""
    import jax

    versions = {}
    for name in LIBRARIES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    devices = jax.devices()
    return {"backend": jax.default_backend(), "device": devices[0].device_kind, "device_count": len(devices),
            "python": platform.python_version(), "cpus": os.cpu_count(), "versions": versions}


def throughput_row(template: str, arch: str, args, folder: str, logs: str) -> dict:
    """(b) for one template: the trainer's images/s and the step-only images/s, same size, dtype and batch."""
    size, batch, steps = (32, 8, 6) if args.smoke else (224, 128, 60)
    flags = ["--template", template, "--arch", arch, "--data", folder, "--image_size", str(size),
             "--batch_size", str(batch), "--dtype", "bfloat16", "--max_steps", str(steps), "--log_every",
             str(max(1, steps // 6)), "--checkpoint_every", "100000", "--holdout_fraction", "0.01",
             "--flip", "--no_progress"]
    if template == "resnet_angular_margin":
        flags += ["--holdout", "images"]
    trained = runner.train(flags, os.path.join(logs, f"throughput_{template}"))
    step_only = benchmark.run_worker("jax", benchmark.parse_args(
        ["--backend", "cpu" if args.smoke else "gpu", "--dtype", "bfloat16", "--sizes", str(size), "--batch_size",
         str(batch), "--templates", template, "--no_torch", "--steps", "3" if args.smoke else "10",
         "--warmup", "1" if args.smoke else "3", "--num_classes", "10"]), template, size)
    step_rate = None if "error" in step_only else batch / statistics.median(step_only["train_step_s"])
    trainer_rate = trained.images_per_second()
    return {"template": template, "arch": arch, "image_size": size, "batch_size": batch, "dtype": "bfloat16",
            "trainer_images_per_second": trainer_rate, "step_only_images_per_second": step_rate,
            "trainer_over_step": None if not (trainer_rate and step_rate) else trainer_rate / step_rate,
            "step_compile_s": step_only.get("train_compile_s"), "step_error": step_only.get("error"),
            "command": trained.command, "seconds": trained.seconds}


def fashion_row(setting: str, args, folder: str, test_images, logs: str) -> dict:
    """(a) one Fashion-MNIST row: `fashion_mnist.run_setting` (the trainer, then the test split)."""
    base, epochs = ROWS[setting]
    template, flags, _ = fashion_mnist.SETTINGS[base]
    fashion_mnist.SETTINGS[setting] = (template, runner.merged_flags(flags, GPU_FLAGS), (epochs, None))
    row_args = argparse.Namespace(num_epochs=1 if args.smoke else epochs, num_items_per_epoch=64 if args.smoke else None,
                                  image_size=32, batch_size=8 if args.smoke else 32, min_crop_area=0.6,
                                  holdout_fraction=0.05, workdir=logs)
    row = fashion_mnist.run_setting(setting, row_args, folder, test_images)
    row["target"] = TARGETS[setting]
    row["meets_target"] = row["test"]["accuracy"] >= TARGETS[setting]
    return row


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    start = time.perf_counter()
    os.makedirs(args.out, exist_ok=True)
    out_json = os.path.join(args.out, "gpu_check.json")
    logs = os.path.join(args.out, "train_logs")
    report = {"command": " ".join(["python experiments/gpu_check.py", *(sys.argv[1:] if argv is None else argv)]),
              "smoke": args.smoke, "budget_seconds": args.seconds, "environment": environment(),
              "throughput": [], "fashion_mnist": [], "skipped": []}

    def save():
        report["seconds"] = time.perf_counter() - start
        with open(out_json, "w") as f:
            json.dump(report, f, indent=1, default=float)

    def left() -> float:
        return args.seconds - (time.perf_counter() - start)

    save()
    scratch = tempfile.mkdtemp(prefix="gpu_check_")
    train_split = fashion_mnist.read_split(args.source, "train")
    test_split = fashion_mnist.read_split(args.source, "test")
    if args.smoke:  # a few hundred images: the code paths, not the numbers
        train_split = tuple(part[:512] for part in train_split)
        test_split = tuple(part[:256] for part in test_split)
    folder = fashion_mnist.write_folder(*train_split, os.path.join(scratch, "train"))
    from jaxembed import data as data_lib

    test_images = data_lib.load_source(fashion_mnist.write_folder(*test_split, os.path.join(scratch, "test")))

    if "throughput" in args.parts:
        for template, arch in THROUGHPUT.items():
            if left() < NEEDS["throughput"]:
                report["skipped"].append(f"throughput {template}: {left():.0f} s left")
                continue
            try:
                report["throughput"].append(throughput_row(template, arch, args, folder, logs))
            except Exception as error:  # noqa: BLE001 - one failed part must not lose the others
                report["throughput"].append({"template": template, "error": f"{type(error).__name__}: {error}"})
            save()
    if "rows" in args.parts:
        for setting in ROWS:
            if left() < NEEDS["row"]:
                report["skipped"].append(f"{setting}: {left():.0f} s left")
                continue
            try:
                report["fashion_mnist"].append(fashion_row(setting, args, folder, test_images, logs))
            except Exception as error:  # noqa: BLE001
                report["fashion_mnist"].append({"setting": setting, "error": f"{type(error).__name__}: {error}"})
            save()
    save()
    print(json.dumps(report, indent=1, default=float))
    failed = [r for r in report["throughput"] + report["fashion_mnist"] if "error" in r]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
