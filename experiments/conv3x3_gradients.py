"""Where XLA:CPU loses to PyTorch in training: the three convolutions of a 3x3 layer, timed one by one.

    python experiments/conv3x3_gradients.py [--batch 16] [--repeats 5] [--no_torch]

For the 3x3 layers of ResNet-50/101 at 224 px (batch 16, fp32, NHWC), this times the forward conv,
the input gradient and the kernel gradient in JAX, next to the same three in PyTorch (oneDNN) in the
same command. It also times two ways of writing the kernel gradient as matrix products, which a CPU
code path could use if they were faster:
  - shifted dots: nine dot_generals of a shifted (padded, sliced) input with the output gradient;
  - patches: the nine shifted inputs concatenated on channels (im2col), then one dot_general.
Each alternative is checked against jax.vjp's kernel gradient before it is timed.
Writes experiments/results/conv3x3_gradients.{md,json}.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import runner  # experiments/runner.py: this script's folder is on sys.path

# (height = width, channels) of the 3x3 convolutions in ResNet-50/101's four stages at 224 px.
LAYERS = [(56, 64), (28, 128), (14, 256), (7, 512)]


def best_ms(function, *args, repeats: int) -> float:
    """Milliseconds of the fastest of `repeats` calls after one that compiles and warms up."""
    import jax

    return 1e3 * min(runner.timed(lambda: jax.block_until_ready(function(*args)), repeats, warmup=1))


def jax_rows(batch: int, repeats: int) -> list[dict]:
    import jax
    import jax.numpy as jnp
    from jax import lax

    def conv(x, w):
        return lax.conv_general_dilated(x, w, (1, 1), ((1, 1), (1, 1)), dimension_numbers=("NHWC", "HWIO", "NHWC"))

    def shifted(x):
        _, height, width, _ = x.shape
        padded = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
        return [padded[:, dy:dy + height, dx:dx + width, :] for dy in range(3) for dx in range(3)]

    def kernel_grad_shifted_dots(x, g):
        sums = [lax.dot_general(view, g, (((0, 1, 2), (0, 1, 2)), ((), ()))) for view in shifted(x)]
        return jnp.stack(sums).reshape(3, 3, x.shape[-1], g.shape[-1])

    def kernel_grad_patches(x, g):
        patches = jnp.concatenate(shifted(x), axis=-1)
        return lax.dot_general(patches, g, (((0, 1, 2), (0, 1, 2)), ((), ()))).reshape(3, 3, x.shape[-1], -1)

    forward = jax.jit(conv)
    input_grad = jax.jit(lambda x, w, g: jax.vjp(conv, x, w)[1](g)[0])
    kernel_grad = jax.jit(lambda x, w, g: jax.vjp(conv, x, w)[1](g)[1])
    rows = []
    for size, channels in LAYERS:
        keys = jax.random.split(jax.random.PRNGKey(size), 3)
        x = jax.random.normal(keys[0], (batch, size, size, channels))
        w = jax.random.normal(keys[1], (3, 3, channels, channels)) * 0.05
        g = jax.random.normal(keys[2], (batch, size, size, channels))
        reference = kernel_grad(x, w, g)
        row = {"layer": f"{batch}x{size}x{size}x{channels}",
               "gflop": 2 * batch * size * size * channels * channels * 9 / 1e9,
               "jax_forward_ms": best_ms(forward, x, w, repeats=repeats),
               "jax_input_grad_ms": best_ms(input_grad, x, w, g, repeats=repeats),
               "jax_kernel_grad_ms": best_ms(kernel_grad, x, w, g, repeats=repeats)}
        for name, function in [("shifted_dots", kernel_grad_shifted_dots), ("patches", kernel_grad_patches)]:
            compiled = jax.jit(function)
            error = float(jnp.max(jnp.abs(compiled(x, g) - reference)) / jnp.max(jnp.abs(reference)))
            if error > 1e-4:
                raise AssertionError(f"kernel gradient by {name} differs from jax.vjp's by {error:.1e} (relative)")
            row[f"jax_kernel_grad_{name}_ms"] = best_ms(compiled, x, g, repeats=repeats)
        rows.append(row)
        print(row, file=sys.stderr, flush=True)
    return rows


def torch_rows(batch: int, repeats: int, threads: int) -> list[dict]:
    import torch

    torch.set_num_threads(threads)

    def best(function) -> float:
        return 1e3 * min(runner.timed(function, repeats, warmup=1))

    def layer(size: int, channels: int) -> dict:
        x = torch.randn(batch, channels, size, size).to(memory_format=torch.channels_last).requires_grad_()
        w = (torch.randn(channels, channels, 3, 3) * 0.05).to(memory_format=torch.channels_last).requires_grad_()
        g = torch.randn(batch, channels, size, size).to(memory_format=torch.channels_last)
        with torch.no_grad():
            forward = best(lambda: torch.nn.functional.conv2d(x, w, padding=1))
        y = torch.nn.functional.conv2d(x, w, padding=1)
        return {"torch_forward_ms": forward,
                "torch_input_grad_ms": best(lambda: torch.autograd.grad(y, x, g, retain_graph=True)),
                "torch_kernel_grad_ms": best(lambda: torch.autograd.grad(y, w, g, retain_graph=True))}

    rows = [layer(size, channels) for size, channels in LAYERS]
    return rows


def markdown(rows: list[dict]) -> str:
    def cell(row, key):
        return f"{row[key]:.1f}" if key in row else "-"

    keys = ("jax_forward_ms", "jax_input_grad_ms", "jax_kernel_grad_ms", "jax_kernel_grad_shifted_dots_ms",
            "jax_kernel_grad_patches_ms", "torch_forward_ms", "torch_input_grad_ms", "torch_kernel_grad_ms")
    lines = runner.markdown_table(
        ["layer (NHWC)", "GFLOP", "JAX fwd", "JAX input grad", "JAX kernel grad", "shifted dots", "patches",
         "PyTorch fwd", "PyTorch input grad", "PyTorch kernel grad"],
        [[row["layer"], f"{row['gflop']:.2f}", *(cell(row, key) for key in keys)] for row in rows])
    caption = ("Milliseconds, best of the repeats; shifted dots and patches are alternative JAX kernel "
               "gradients (see experiments/conv3x3_gradients.py).")
    return "\n".join([caption, "", *lines, ""])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--no_torch", action="store_true")
    parser.add_argument("--torch_only", action="store_true", help=argparse.SUPPRESS)  # the PyTorch subprocess
    parser.add_argument("--out", default=os.path.join(runner.REPO, "experiments", "results", "conv3x3_gradients"))
    args = parser.parse_args()
    if args.torch_only:
        json.dump(torch_rows(args.batch, args.repeats, args.threads), sys.stdout)
        return
    rows = jax_rows(args.batch, args.repeats)
    if not args.no_torch:  # its own process, as in benchmark.py, so neither runtime's threads disturb the other
        output = subprocess.run([sys.executable, __file__, "--torch_only", "--batch", str(args.batch),
                                 "--repeats", str(args.repeats), "--threads", str(args.threads)],
                                check=True, capture_output=True, text=True).stdout
        for row, torch_row in zip(rows, json.loads(output)):
            row.update(torch_row)
    table = markdown(rows)
    runner.write_results(args.out, rows, table)
    print(table)


if __name__ == "__main__":
    main()
