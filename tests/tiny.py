"""The tests' small world: a one-block backbone, tiny run settings, real digits, and state comparison.

`SmoothBlock` stands in for the backbones wherever a test is not about the architecture: one 3x3
convolution, batch norm and tanh, globally pooled. It compiles in a second where ResNet-50 takes a
minute on two cores, and it is smooth: no ReLU kink for a rounding difference to flip, so two
computations of the same step (1 vs 8 devices, 1 vs 2 processes, sharded vs replicated centres) agree
to rounding. In float64 (`dtype="float64"` under `jax.enable_x64(True)`) that is 1e-12, so
`assert_same_state` can hold them to 1e-5 relative per leaf, and still catch a one-image mistake.
It is registered as the backbone "tiny" (`jaxembed.models.register`), so the trainer, `jaxembed.load`
and the run directory treat it as any other arch.
"""

from __future__ import annotations

import os
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxembed import data as data_lib
from jaxembed import models, templates
from jaxembed.models.taps import check_tap, with_tapped

CHANNELS, GRID = 8, 4
FEATURES = CHANNELS * GRID * GRID


class SmoothBlock(nn.Module):
    """3x3 conv (stride 2, 8 channels) -> batch norm -> tanh -> mean over a 4x4 grid of cells, flattened:
    `(B, H, W, 3) -> (B, 128)`, H and W multiples of 8. The grid keeps where a stroke is, which a digit needs.
    Its one block is "conv": `tap="conv"` also returns the tanh map `(B, H/2, W/2, 8)` (`models.taps`)."""

    num_classes: int | None = None
    dtype: Any = jnp.float32
    remat: bool = False
    conv_impl: str = "auto"
    tap: str | None = None

    def block_names(self) -> tuple[str, ...]:
        return ("conv",)

    @nn.compact
    def __call__(self, x, train: bool = False):
        check_tap(self.tap, self.block_names(), "tiny")
        params = jnp.float64 if jnp.dtype(self.dtype) == jnp.float64 else jnp.float32
        # No bias before batch norm (as in the real backbones): its gradient is zero up to rounding.
        x = nn.Conv(CHANNELS, (3, 3), strides=2, use_bias=False, dtype=self.dtype, param_dtype=params, name="conv")(x)
        x = nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5, dtype=self.dtype,
                         param_dtype=params, name="bn")(x)
        batch, height, width, channels = x.shape
        block_map = jnp.tanh(x)
        cells = block_map.reshape(batch, GRID, height // GRID, GRID, width // GRID, channels)
        features = jnp.mean(cells, axis=(2, 4)).reshape(batch, FEATURES).astype(params)
        if self.num_classes is not None:
            features = nn.Dense(self.num_classes, dtype=params, param_dtype=params, name="classifier")(features)
        return with_tapped(features, block_map, self.tap)


if "tiny" not in models.registered_archs():
    models.register("tiny", SmoothBlock, FEATURES)

# Two epochs of 16 images in batches of 8: 4 steps, the learning rate decayed after 2. Batches are loaded in
# the test process: a worker process would add seconds of start-up to every run, and the batches do not
# depend on it (tests/test_data.py compares them).
RUN = dict(arch="tiny", image_size=32, batch_size=8, init_epochs=1, step_epochs=1, num_epochs=2,
           num_items_per_epoch=16, per_item_lrate=0.002, progress=False, log_every=1, checkpoint_every=2,
           eval_batch_size=64, data_workers=0)
NUM_STEPS = 4
ARCFACE = dict(angular_scale=16, embeddings_size=32)


def config(template: str = "inception_bn", **overrides) -> templates.Config:
    """The tiny run of `template` on the tiny backbone, with `overrides`."""
    extra = ARCFACE if template == "resnet_angular_margin" else {}
    return templates.get(template).config(**{**RUN, **extra, **overrides})


def digits(step: int = 10) -> data_lib.LabelledImages:
    """Every `step`-th image of the embedded default: 180 real 8x8 digits of 10 concepts by default."""
    full = data_lib.load_source(None)
    return full.subset(range(0, len(full), step))


def write_digits_folder(root: str, step: int = 10) -> str:
    """Every `step`-th image of the embedded default, as PNG files `root/<digit>/<position>.png`."""
    full = data_lib.load_source(None)
    for position in range(0, len(full), step):
        folder = os.path.join(root, full.concepts[full.labels[position][0]])
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, f"{position:04d}.png"), "wb") as f:
            f.write(full.items[position])  # the default keeps each image as PNG bytes
    return root


def state_leaves(state) -> dict[str, np.ndarray]:
    """Parameters, batch-norm statistics and optimiser state of a `TrainState`, by path, as numpy copies
    (taken before a step that donates the state's buffers)."""
    tree = {"params": state.params, "batch_stats": state.batch_stats, "opt_state": state.opt_state}
    return {jax.tree_util.keystr(path): np.array(leaf) for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def relative_differences(ours: dict, reference: dict) -> dict[str, float]:
    """`||ours - reference|| / ||reference||` per leaf (0 for two zero leaves)."""
    assert ours.keys() == reference.keys()
    return {name: float(np.linalg.norm(np.asarray(ours[name], np.float64) - reference[name])
                        / max(np.linalg.norm(np.asarray(reference[name], np.float64)), 1e-300))
            for name in reference}


def assert_same_state(ours: dict, reference: dict, rtol: float = 1e-5, context: str = "") -> None:
    """Every leaf within `rtol` relative of the reference's (the issue's equivalence standard)."""
    worst = max(relative_differences(ours, reference).items(), key=lambda item: item[1])
    assert worst[1] <= rtol, f"{worst[0]}{context}: {worst[1]:.3g} relative apart (limit {rtol:g})"


# ============================================================================================================
# One shared trained run, and the command-line tools with this backbone registered.
# (tests/conftest.py's session fixture `tiny_run`; used by test_evaluate_cli.py, test_report.py,
# test_export.py and test_search.py, which read the run and never train their own.)

import dataclasses  # noqa: E402
import sys  # noqa: E402

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))


@dataclasses.dataclass(frozen=True)
class TrainedRun:
    workdir: str  # the finished run
    images: str  # its data: the folder `write_digits_folder` wrote (run.json names it, so the split can be recreated)
    summary: dict  # what train_and_evaluate returned


def train_digits_run(base: str, template: str = "inception_bn", **overrides) -> TrainedRun:
    """Trains `config(template, **overrides)` (4 steps) on `write_digits_folder(base/digits)`: 180 images of 10
    concepts, 18 of them held out for a classifier template, into `base/workdir`."""
    from jaxembed.train import loop  # imported on use: every test module imports this file

    images = write_digits_folder(os.path.join(base, "digits"))
    workdir = os.path.join(base, "workdir")
    summary = loop.train_and_evaluate(config(template, **overrides), workdir, data_spec=images)
    assert summary["finished"] and summary["step"] == NUM_STEPS, summary
    return TrainedRun(workdir=workdir, images=images, summary=summary)


def tool_command(module: str, *args: str, setup: str = "") -> list[str]:
    """The argv of `python -m jaxembed.<module> args` run with the arch "tiny" registered: a fresh process knows
    only the built-in backbones, so it imports this file first, runs the Python statements `setup`, then runs
    the module as `-m` would."""
    code = (f"import sys; sys.path.insert(0, {TESTS_DIR!r}); import runpy, tiny\n{setup}\n"
            f"runpy.run_module('jaxembed.{module}', run_name='__main__', alter_sys=True)")
    return [sys.executable, "-c", code, *args]


# ----------------------------------------------------------------------------- compiling deep networks quickly

# XLA's backend optimisations and its newer CPU fusion emitters off: the architecture tests only check
# values, and at 32-64 px optimising a deep network's code costs more than running it (resnext50_32x4d
# at 64 px, batch 2: about 20 s against 3 s; a 32-group convolution and its gradients: 7 s against 0.7 s).
QUICK_COMPILE = {"xla_backend_optimization_level": 0, "xla_cpu_use_fusion_emitters": False}
# Optimisations off only: XLA's default emitters, which two programs must share to round the same way
# (the remat test compares a plain and a rematerialised program exactly; the older emitters differ by 2e-7).
UNOPTIMISED_COMPILE = {"xla_backend_optimization_level": 0}


def compile_quickly(fn, *args, options=QUICK_COMPILE):
    """`jax.jit(fn)` compiled for `args` with `options` (an XLA without the fusion-emitter option gets
    `UNOPTIMISED_COMPILE`)."""
    lowered = jax.jit(fn).lower(*args)
    try:
        return lowered.compile(compiler_options=options)
    except Exception as error:  # noqa: BLE001 - only an unknown option falls back
        if "xla_cpu_use_fusion_emitters" not in str(error):
            raise
        return lowered.compile(compiler_options=UNOPTIMISED_COMPILE)
