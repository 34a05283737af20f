"""Convolutions on XLA:CPU: XLA's native forms against jaxembed's CPU forms, in one process.

    python experiments/conv_forms_speed.py [--image_size 64] [--batch_size 8]

1. Each ResNeXt-50 32x4d grouped 3x3 layer shape alone (batch, 56/28/14/7 px, 32 groups): forward,
   input-gradient and kernel-gradient milliseconds, native `lax.conv_general_dilated` against
   `conv_forms.split_grouped_conv` (one conv per group).
2. The whole ResNet-50 and ResNeXt-50 32x4d train-mode gradient and eval forward at --image_size, with
   conv_impl="native" (XLA's convolutions, what jaxembed did before) against "cpu" (the CPU default:
   this grouped form, and 1x1 convolutions as matrix products), with compile times.
Times are the best of --repeats calls. Writes experiments/results/conv_forms_speed.{md,json}.
"""

from __future__ import annotations

import argparse
import itertools
import os

import jax
import jax.numpy as jnp
import numpy as np
import runner  # experiments/runner.py: this script's folder is on sys.path
from jax import lax

from jaxembed.models import conv_forms, resnet

HERE = os.path.dirname(os.path.abspath(__file__))
# (spatial size, channels) of the grouped 3x3 convs of ResNeXt-50 32x4d at 224 px, one per stage.
LAYER_SHAPES = ((56, 128), (28, 256), (14, 512), (7, 1024))
GROUPS = 32
FORMS = {"native": lax.conv_general_dilated, "cpu": conv_forms.split_grouped_conv}
NETWORK_IMPLS = ("native", "cpu")
NETWORKS = {"resnet50": resnet.ResNet50, "resnext50_32x4d": resnet.ResNeXt50_32x4d}


def best_seconds(fn, *args, repeats: int) -> tuple[float, float]:
    """(first call incl. compilation, best of `repeats` later calls) in seconds."""
    first, *later = runner.timed(lambda: jax.block_until_ready(fn(*args)), 1 + repeats)
    return first, min(later)


def layer_rows(batch_size: int, repeats: int) -> list[dict]:
    rng = np.random.default_rng(0)
    rows = []
    for size, channels in LAYER_SHAPES:
        x = jnp.asarray(rng.standard_normal((batch_size, size, size, channels), np.float32))
        w = jnp.asarray(rng.standard_normal((3, 3, channels // GROUPS, channels), np.float32) * 0.05)
        row = {"shape": f"{batch_size}x{size}x{size}x{channels}"}
        for name, conv in FORMS.items():
            def apply(x, w, conv=conv):
                return conv(x, w, (1, 1), ((1, 1), (1, 1)), dimension_numbers=("NHWC", "HWIO", "NHWC"),
                            feature_group_count=GROUPS)

            def loss(x, w, apply=apply):
                return jnp.sum(apply(x, w) ** 2)

            row[name] = {
                label: 1000 * best_seconds(jax.jit(fn), x, w, repeats=repeats)[1]
                for label, fn in (("forward_ms", apply), ("input_grad_ms", jax.grad(loss, 0)),
                                  ("kernel_grad_ms", jax.grad(loss, 1)))
            }
        rows.append(row)
        print(row, flush=True)
    return rows


def network_rows(image_size: int, batch_size: int, repeats: int) -> list[dict]:
    images = jnp.asarray(np.random.default_rng(0).standard_normal((batch_size, image_size, image_size, 3), np.float32))
    rows = []
    for arch, name in itertools.product(NETWORKS, NETWORK_IMPLS):
        model = NETWORKS[arch](num_classes=10, conv_impl=name)
        variables = model.init(jax.random.key(0), images)

        def loss(params, model=model, variables=variables):
            logits, _ = model.apply({**variables, "params": params}, images, train=True, mutable=["batch_stats"])
            return jnp.sum(logits**2)

        grad_first, grad_best = best_seconds(jax.jit(jax.grad(loss)), variables["params"], repeats=repeats)
        forward = jax.jit(lambda variables, model=model: model.apply(variables, images))
        forward_first, forward_best = best_seconds(forward, variables, repeats=repeats)
        row = {"arch": arch, "conv_impl": name, "train_grad_images_per_s": batch_size / grad_best,
               "forward_images_per_s": batch_size / forward_best,
               "train_compile_and_first_s": grad_first, "forward_compile_and_first_s": forward_first}
        rows.append(row)
        print(row, flush=True)
    return rows


def markdown(report: dict) -> str:
    lines = [f"`{report['command']}`", "", *runner.markdown_table(
        ["layer (NHWC, 32 groups)", "form", "forward ms", "forward + input grad ms", "forward + kernel grad ms"],
        [[row["shape"], name, f"{row[name]['forward_ms']:.1f}", f"{row[name]['input_grad_ms']:.1f}",
          f"{row[name]['kernel_grad_ms']:.1f}"] for row in report["layers"] for name in FORMS])]
    lines += ["", f"Whole networks, {report['image_size']} px, batch {report['batch_size']}:", "", *runner.markdown_table(
        ["arch", "conv_impl", "train-mode gradient images/s", "forward images/s", "compile+first (train / forward) s"],
        [[row["arch"], row["conv_impl"], f"{row['train_grad_images_per_s']:.2f}", f"{row['forward_images_per_s']:.1f}",
          f"{row['train_compile_and_first_s']:.1f} / {row['forward_compile_and_first_s']:.1f}"]
         for row in report["network"]])]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image_size", type=int, default=64)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=os.path.join(HERE, "results", "conv_forms_speed"))
    args = parser.parse_args()
    report = {
        "command": "python experiments/conv_forms_speed.py " + " ".join(
            f"--{k} {v}" for k, v in vars(args).items() if k != "out"),
        "image_size": args.image_size, "batch_size": args.batch_size, "backend": jax.default_backend(),
        "layers": layer_rows(args.batch_size, args.repeats),
        "network": network_rows(args.image_size, args.batch_size, args.repeats),
    }
    table = markdown(report)
    runner.write_results(args.out, report, table)
    print(table)


if __name__ == "__main__":
    main()
