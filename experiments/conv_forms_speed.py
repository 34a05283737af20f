"""Convolutions on XLA:CPU: XLA's native forms against jaxembed's CPU forms, in one process.

    python experiments/conv_forms_speed.py [--image_size 32] [--batch_size 128] [--repeats 3]

1. Each ResNeXt-50 32x4d grouped 3x3 layer shape alone (batch, 56/28/14/7 px, 32 groups): forward,
   input-gradient and kernel-gradient milliseconds, native `lax.conv_general_dilated` against
   `conv_forms.split_grouped_conv` (one conv per group), batch 8.
2. Each ResNet-50 dense 3x3 layer shape alone, at 224 px (batch 8: 56/28/14/7 px maps) and at 32 px
   with the ImageNet stem (batch 128: 8/4/2/1 px maps): the same times, native against
   `conv_forms.conv_as_matmul` (im2col), which `cpu_conv` uses on outputs of at most 2x2.
3. The whole ResNet-50, ResNeXt-50 32x4d and BN-Inception train-mode gradient and eval forward at
   --image_size, with conv_impl="native" (XLA's convolutions) against "cpu" (the CPU default,
   `conv_forms.cpu_conv`), with compile times.
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

from jaxembed.models import conv_forms, inception_bn, resnet

HERE = os.path.dirname(os.path.abspath(__file__))
# (batch, spatial size, channels) of the grouped 3x3 convs of ResNeXt-50 32x4d at 224 px, one per stage.
LAYER_SHAPES = ((8, 56, 128), (8, 28, 256), (8, 14, 512), (8, 7, 1024))
GROUPS = 32
FORMS = {"native": lax.conv_general_dilated, "cpu": conv_forms.split_grouped_conv}
# (batch, spatial size, channels) of ResNet-50's dense 3x3 convs, one per stage, at 224 and at 32 px.
DENSE_LAYER_SHAPES = ((8, 56, 64), (8, 28, 128), (8, 14, 256), (8, 7, 512),
                      (128, 8, 64), (128, 4, 128), (128, 2, 256), (128, 1, 512))
DENSE_FORMS = {"native": lax.conv_general_dilated, "matmul": conv_forms.conv_as_matmul}
NETWORK_IMPLS = ("native", "cpu")
NETWORKS = {"resnet50": resnet.ResNet50, "resnext50_32x4d": resnet.ResNeXt50_32x4d,
            "inception_bn": inception_bn.InceptionBN}


def best_seconds(fn, *args, repeats: int) -> tuple[float, float]:
    """(first call incl. compilation, best of `repeats` later calls) in seconds."""
    first, *later = runner.timed(lambda: jax.block_until_ready(fn(*args)), 1 + repeats)
    return first, min(later)


def layer_times(conv, x, w, groups: int, repeats: int) -> dict:
    """Best forward, forward + input-gradient and forward + kernel-gradient milliseconds of a 3x3 layer."""
    def apply(x, w):
        return conv(x, w, (1, 1), ((1, 1), (1, 1)), dimension_numbers=("NHWC", "HWIO", "NHWC"),
                    feature_group_count=groups)

    def loss(x, w):
        return jnp.sum(apply(x, w) ** 2)

    return {label: 1000 * best_seconds(jax.jit(fn), x, w, repeats=repeats)[1]
            for label, fn in (("forward_ms", apply), ("input_grad_ms", jax.grad(loss, 0)),
                              ("kernel_grad_ms", jax.grad(loss, 1)))}


def layer_rows(shapes, forms: dict, groups: int, repeats: int) -> list[dict]:
    """`layer_times` of every form on 3x3 layers of `shapes` (batch, side, channels) with `groups` groups."""
    rng = np.random.default_rng(0)
    rows = []
    for batch_size, size, channels in shapes:
        x = jnp.asarray(rng.standard_normal((batch_size, size, size, channels), np.float32))
        w = jnp.asarray(rng.standard_normal((3, 3, channels // groups, channels), np.float32) * 0.05)
        row = {"shape": f"{batch_size}x{size}x{size}x{channels}",
               **{name: layer_times(conv, x, w, groups, repeats) for name, conv in forms.items()}}
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


def layer_table(title: str, rows: list[dict], forms) -> list[str]:
    return runner.markdown_table(
        [title, "form", "forward ms", "forward + input grad ms", "forward + kernel grad ms"],
        [[row["shape"], name, f"{row[name]['forward_ms']:.1f}", f"{row[name]['input_grad_ms']:.1f}",
          f"{row[name]['kernel_grad_ms']:.1f}"] for row in rows for name in forms])


def markdown(report: dict) -> str:
    lines = [f"`{report['command']}`", "", *layer_table("layer (NHWC, 32 groups)", report["layers"], FORMS), "",
             "ResNet-50's dense 3x3 layers (`cpu_conv` takes the matmul on outputs of at most "
             f"{conv_forms.SMALL_OUTPUT_SIDE}x{conv_forms.SMALL_OUTPUT_SIDE}):", "",
             *layer_table("layer (NHWC)", report["dense_layers"], DENSE_FORMS)]
    lines += ["", f"Whole networks, {report['image_size']} px, batch {report['batch_size']}:", "", *runner.markdown_table(
        ["arch", "conv_impl", "train-mode gradient images/s", "forward images/s", "compile+first (train / forward) s"],
        [[row["arch"], row["conv_impl"], f"{row['train_grad_images_per_s']:.2f}", f"{row['forward_images_per_s']:.1f}",
          f"{row['train_compile_and_first_s']:.1f} / {row['forward_compile_and_first_s']:.1f}"]
         for row in report["network"]])]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image_size", type=int, default=32, help="of the whole-network rows")
    parser.add_argument("--batch_size", type=int, default=128, help="of the whole-network rows")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=os.path.join(HERE, "results", "conv_forms_speed"))
    args = parser.parse_args()
    report = {
        "command": "python experiments/conv_forms_speed.py " + " ".join(
            f"--{k} {v}" for k, v in vars(args).items() if k != "out"),
        "image_size": args.image_size, "batch_size": args.batch_size, "backend": jax.default_backend(),
        "layers": layer_rows(LAYER_SHAPES, FORMS, GROUPS, args.repeats),
        "dense_layers": layer_rows(DENSE_LAYER_SHAPES, DENSE_FORMS, 1, args.repeats),
        "network": network_rows(args.image_size, args.batch_size, args.repeats),
    }
    table = markdown(report)
    runner.write_results(args.out, report, table)
    print(table)


if __name__ == "__main__":
    main()
