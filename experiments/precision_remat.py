"""bfloat16 and rematerialisation: do they train like float32, and how much train-step memory do they save?

    python experiments/precision_remat.py                                 # both parts, as in experiments/results
    python experiments/precision_remat.py --steps 40 --memory_sizes 224 448 1024
    python experiments/precision_remat.py --no_memory                     # the training part only

Part 1 (training): `jaxembed.train.train_and_evaluate` on the embedded default digits (1,797 real
images), for inception_bn (softmax classifier: held-out images, top-1) and resnet50 (the
resnet_angular_margin template: ArcFace, held-out digit concepts, MAP@R), each in four variants:
float32, `--dtype bfloat16`, `--remat` and both. It reports the loss of the first and last steps, the
mean of the last few (a single step's loss is noisy) and the held-out metric; and how far each
variant's loss curve is from float32's.

Part 2 (memory), for resnet101 with the ArcFace head at batch 128 and several image sizes, in the
same four variants; nothing is run:
- `residuals`: the bytes autodiff keeps from the forward pass for the backward pass (activations,
  and the weights the backward reads), from `jax.vjp` under `jax.eval_shape`. This is what remat and
  bfloat16 act on, and it does not depend on the backend; a compiler can only shrink it further
  (by fusing, or by rematerialising on its own).
- `temporaries` and `arguments`: XLA's own per-device plan for the compiled train step
  (`jaxembed.train.train_step`: forward, backward, SGD update; `compiled.memory_analysis()`), for
  this machine's backend. On the CPU backend this plan does not shrink with remat (a 16-block MLP
  shows the same: 520 MiB of temporaries without `jax.checkpoint`, 640 MiB with, under each of
  XLA:CPU's schedulers), nor with bfloat16, whose convolutions XLA:CPU computes in float32 (its
  compiled HLO converts them). The GPU and TPU compilers schedule with memory in mind and store
  bfloat16; run this there for their plan (not measured here: no accelerator).

Writes experiments/results/precision_remat.json and .md (override with --out).
"""

from __future__ import annotations

import argparse
import functools
import logging
import math
import os
import platform
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
import runner  # experiments/runner.py: this script's folder is on sys.path

from jaxembed import data as data_lib
from jaxembed import rundir, schedules, tasks, templates, train

VARIANTS = {  # name -> run options of the config
    "float32": {"dtype": "float32", "remat": False},
    "bfloat16": {"dtype": "bfloat16", "remat": False},
    "float32 + remat": {"dtype": "float32", "remat": True},
    "bfloat16 + remat": {"dtype": "bfloat16", "remat": True},
}
# Small real configurations: the CPU demo settings of `python -m jaxembed.train`, at a fixed step count.
MODELS = {
    "inception_bn": ("inception_bn", {"arch": "inception_bn", "logreg": 0, "per_item_lrate": 0.001}, "eval/top1"),
    "resnet50": ("resnet_angular_margin", {"arch": "resnet50", "per_item_lrate": 0.0005, "angular_scale": 32},
                 "eval/map@r"),
}
GIB = 2**30


def train_variant(model_name: str, variant: str, args, data) -> dict:
    """Trains one model in one variant for `args.steps` steps; returns its losses and held-out metrics."""
    template_name, overrides, metric = MODELS[model_name]
    if args.per_item_lrate is not None:
        overrides = {**overrides, "per_item_lrate": args.per_item_lrate}
    steps_per_epoch = 10
    config = templates.get(template_name).config(
        **overrides, image_size=args.image_size, batch_size=args.batch_size,
        num_items_per_epoch=steps_per_epoch * args.batch_size, num_epochs=args.steps // steps_per_epoch,
        init_epochs=max(1, args.steps // steps_per_epoch - 1), step_epochs=1,
        **VARIANTS[variant], min_crop_area=0.7, log_every=1, progress=False, checkpoint_every=10_000, seed=0,
    )
    with tempfile.TemporaryDirectory() as workdir:
        start = time.perf_counter()
        summary = train.train_and_evaluate(config, workdir, data=data)
        seconds = time.perf_counter() - start
        records = rundir.RunDir(workdir).metrics()
    losses = [r["loss"] for r in records if "loss" in r] + [summary["train/loss"]]  # the last step is not logged
    window = max(1, len(losses) // 5)  # one batch's loss is noisy: also average the first and last fifth
    return {"model": model_name, "variant": variant, "template": template_name, "image_size": args.image_size,
            "batch_size": args.batch_size, "steps": summary["step"], "losses": losses,
            "first_loss": losses[0], "last_loss": losses[-1], "steps_averaged": window,
            "mean_loss_first_steps": float(np.mean(losses[:window])),
            "mean_loss_last_steps": float(np.mean(losses[-window:])), "metric": metric, "metric_value": summary[metric],
            "recall@1": summary.get("eval/recall@1"), "seconds_with_compile": seconds}


def residual_bytes(model, loss_fn, state, batch) -> int:
    """Bytes of what the backward pass of the train step's loss reads from its forward pass.

    The residuals are the leaves of the function `jax.vjp` returns; `jax.eval_shape` gives their
    shapes without computing anything.
    """

    def loss(params, batch_stats, batch):  # the loss `train.train_step` differentiates
        outputs, _ = model.apply({"params": params, "batch_stats": batch_stats}, batch["image"], train=True,
                                 mutable=["batch_stats"], rngs={"dropout": jax.random.PRNGKey(0)})
        return loss_fn(outputs, params, batch)

    def backward(params, batch_stats, batch):
        return jax.vjp(lambda params: loss(params, batch_stats, batch), params)[1]

    residuals = jax.tree.leaves(jax.eval_shape(backward, state.params, state.batch_stats, batch))
    return sum(math.prod(leaf.shape) * np.dtype(leaf.dtype).itemsize for leaf in residuals)


def train_step_memory(image_size: int, variant: str, args) -> dict:
    """The trainer's resnet101 ArcFace train step: its residual bytes, and XLA's per-device plan (compiled, not run)."""
    config = templates.get("resnet_angular_margin").config(arch="resnet101", image_size=image_size,
                                                           batch_size=args.memory_batch_size, **VARIANTS[variant])
    model = tasks.build_model(config, args.memory_classes)  # in the variant's dtype, with its remat
    schedule = schedules.learning_rate_schedule(
        batch_size=config.batch_size, per_item_lrate=config.per_item_lrate, init_epochs=config.init_epochs,
        step_epochs=config.step_epochs, num_epochs=config.num_epochs, items_per_epoch=50_000)
    tx = train.build_optimizer(schedule, config)
    state = jax.eval_shape(functools.partial(train.init_state, model=model, tx=tx, image_size=image_size),
                           jax.random.PRNGKey(0))
    batch = {"image": jax.ShapeDtypeStruct((config.batch_size, image_size, image_size, 3), jnp.uint8),
             "label": jax.ShapeDtypeStruct((config.batch_size,), jnp.int32)}
    loss_fn = tasks.for_config(config).loss_fn()
    step = jax.jit(functools.partial(train.train_step, model=model, tx=tx, loss_fn=loss_fn), donate_argnums=0)
    start = time.perf_counter()
    memory = step.lower(state, batch).compile().memory_analysis()
    return {"arch": "resnet101", "image_size": image_size, "batch_size": config.batch_size, "variant": variant,
            "num_classes": args.memory_classes, "compile_seconds": time.perf_counter() - start,
            "residual_bytes": residual_bytes(model, loss_fn, state, batch), "backend": jax.default_backend(),
            "temp_bytes": memory.temp_size_in_bytes, "argument_bytes": memory.argument_size_in_bytes,
            "output_bytes": memory.output_size_in_bytes, "alias_bytes": memory.alias_size_in_bytes,
            # The donated state aliases the new state, so it counts once.
            "peak_bytes": memory.argument_size_in_bytes + memory.output_size_in_bytes - memory.alias_size_in_bytes
            + memory.temp_size_in_bytes}


def markdown(result: dict) -> str:
    lines = ["# bfloat16 and rematerialisation", "",
             f"`{result['command']}`, on {result['backend']} ({result['machine']}, {result['cpu_count']} cores shared "
             f"with other jobs, jax {result['jax']}). Produced by `experiments/precision_remat.py`; raw numbers, "
             "including every step's loss, in `precision_remat.json`.", ""]
    if result["training"]:
        first = result["training"][0]
        window = first["steps_averaged"]
        lines += [f"## Training: {first['steps']} steps, {first['image_size']} px, batch {first['batch_size']}, "
                  "embedded digits", "",
                  "inception_bn: softmax classifier, held-out images (top-1 over 10 digits); resnet50: the "
                  "resnet_angular_margin template (ArcFace), 2 held-out digit concepts (MAP@R). One batch's loss "
                  f"is noisy, so the mean of the first and last {window} steps is shown too.", "",
                  *runner.markdown_table(
                      ["model", "variant", "loss, step 1", f"mean, first {window}", f"mean, last {window}",
                       "loss, last step", "max abs loss difference to float32 (any step)", "held-out metric"],
                      [[row["model"], row["variant"], f"{row['first_loss']:.4f}", f"{row['mean_loss_first_steps']:.4f}",
                        f"{row['mean_loss_last_steps']:.4f}", f"{row['last_loss']:.4f}",
                        f"{row['max_abs_loss_difference_to_float32']:.4f}",
                        f"{row['metric']} {row['metric_value']:.4f}"] for row in result["training"]])]
        lines.append("")
    if result["memory"]:
        first = result["memory"][0]
        backend = first["backend"].upper()
        lines += [f"## Train-step memory: resnet101 + ArcFace ({first['num_classes']} classes), batch "
                  f"{first['batch_size']}, one device, nothing run", "",
                  "- residuals: what the backward pass reads from the forward pass (activations, and the weights "
                  "it needs), from `jax.vjp` under `jax.eval_shape`; what remat and bfloat16 act on, whatever the "
                  "backend. A compiler can shrink it further by fusing.",
                  f"- XLA:{backend} temporaries, arguments, peak (arguments + outputs - donated + temporaries): "
                  f"`compiled.memory_analysis()` of the train step compiled for this machine's backend. XLA:CPU's "
                  "plan does not shrink with remat (a 16-block MLP shows 520 MiB of temporaries without "
                  "`jax.checkpoint` and 640 MiB with, under each of its schedulers), nor with bfloat16, whose "
                  "convolutions it computes in float32. Run this on a GPU or TPU for their compilers' plan.",
                  "- batch 128 on one device, as asked of the compiler; across N data-parallel devices each holds "
                  "about 1/N of the activations.", "",
                  *runner.markdown_table(
                      ["image size", "variant", "residuals (GiB)", "residuals vs float32",
                       f"XLA:{backend} temporaries (GiB)", "arguments (GiB)", "peak (GiB)"],
                      [[row["image_size"], row["variant"], f"{row['residual_bytes'] / GIB:.2f}",
                        f"{row['residuals_vs_float32']:.2f}", f"{row['temp_bytes'] / GIB:.2f}",
                        f"{row['argument_bytes'] / GIB:.2f}", f"{row['peak_bytes'] / GIB:.2f}"]
                       for row in result["memory"]])]
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="*", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--steps", type=int, default=40, help="training steps per variant (a multiple of 10)")
    parser.add_argument("--image_size", type=int, default=32)
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--memory_sizes", type=int, nargs="*", default=[224, 448, 1024])
    parser.add_argument("--memory_batch_size", type=int, default=128)
    parser.add_argument("--memory_classes", type=int, default=1000)
    parser.add_argument("--no_memory", action="store_true")
    parser.add_argument("--per_item_lrate", type=float, default=None,
                        help="override every trained model's per_item_lrate (default: each model's in MODELS)")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                                      "precision_remat"))
    args = parser.parse_args()
    if args.steps % 10 or args.steps < 20:
        parser.error(f"--steps={args.steps} must be a multiple of 10, at least 20")
    logging.basicConfig(level=logging.WARNING)

    data = data_lib.load_source(None)
    training = []
    for model_name in args.models:
        rows = [train_variant(model_name, variant, args, data) for variant in VARIANTS]
        for row in rows:
            difference = np.subtract(row["losses"], rows[0]["losses"])  # rows[0] is float32
            row["max_abs_loss_difference_to_float32"] = float(np.max(np.abs(difference)))
            print(f"{model_name:12s} {row['variant']:17s} loss {row['first_loss']:.4f} -> {row['last_loss']:.4f} "
                  f"(mean of first/last {row['steps_averaged']}: {row['mean_loss_first_steps']:.4f} -> "
                  f"{row['mean_loss_last_steps']:.4f}; max |diff| to "
                  f"float32 {row['max_abs_loss_difference_to_float32']:.4f}), {row['metric']} "
                  f"{row['metric_value']:.4f}, {row['seconds_with_compile']:.0f} s", flush=True)
        training += rows

    memory = []
    for image_size in [] if args.no_memory else args.memory_sizes:
        rows = [train_step_memory(image_size, variant, args) for variant in VARIANTS]
        for row in rows:
            row["residuals_vs_float32"] = row["residual_bytes"] / rows[0]["residual_bytes"]
            row["temp_vs_float32"] = row["temp_bytes"] / rows[0]["temp_bytes"]
            print(f"resnet101 {image_size:5d} px {row['variant']:17s} residuals {row['residual_bytes'] / GIB:7.2f} GiB "
                  f"({row['residuals_vs_float32']:.2f} x float32); XLA temporaries {row['temp_bytes'] / GIB:7.2f} GiB "
                  f"({row['temp_vs_float32']:.2f} x), arguments {row['argument_bytes'] / GIB:.2f} GiB, "
                  f"compiled in {row['compile_seconds']:.0f} s", flush=True)
        memory += rows

    command = " ".join(["python experiments/precision_remat.py", *sys.argv[1:]])
    result = {"experiment": "precision_remat", "command": command, "backend": jax.default_backend(),
              "jax": jax.__version__, "machine": platform.machine(), "cpu_count": os.cpu_count(), "load_average_1min": os.getloadavg()[0],
              "training": training, "memory": memory}
    runner.write_results(args.out, result, markdown(result))
    print(f"wrote {args.out}.json and {args.out}.md")


if __name__ == "__main__":
    main()
