"""The templates' learning-rate schedule: piecewise constant, decayed every `step_epochs`; optionally
after a linear warmup, or cosine instead of the steps."""

from __future__ import annotations

import math

import jax.numpy as jnp
import optax


def steps_per_epoch(items_per_epoch: int, batch_size: int) -> int:
    """Optimiser steps in one epoch of the schedule: ceil(items_per_epoch / batch_size).

    Not the input pipeline's `jaxembed.data.batches_per_pass` (full batches in one pass over the data,
    the remainder dropped): an epoch is `num_items_per_epoch` images, which need not be one pass. The
    two agree when it is one pass of a whole number of global batches.
    """
    if items_per_epoch < 1 or batch_size < 1:
        raise ValueError(f"need items_per_epoch >= 1 and batch_size >= 1, got {items_per_epoch=}, {batch_size=}")
    return math.ceil(items_per_epoch / batch_size)


def decay_epochs(*, init_epochs: int, step_epochs: int, num_epochs: int) -> list[int]:
    """The epochs at whose start the learning rate is multiplied by the decay factor.

    init_epochs, init_epochs + step_epochs, ... while < num_epochs.
    """
    return list(range(init_epochs, num_epochs, step_epochs))


def learning_rate_schedule(
    *,
    batch_size: int,
    per_item_lrate: float,
    init_epochs: int,
    step_epochs: int,
    num_epochs: int,
    items_per_epoch: int,
    decay: float = 0.1,
    warmup_epochs: float = 0.0,
    kind: str = "step",
) -> optax.Schedule:
    """The learning rate at each optimiser step, as the templates define it.

      lr(step) = batch_size * per_item_lrate * decay ** k,
      k = the number of boundaries b_i <= step, b_i = (init_epochs + i * step_epochs) * steps_per_epoch,
      for every boundary epoch < num_epochs, with steps_per_epoch = ceil(items_per_epoch / batch_size).

    So the initial rate is held for init_epochs, then multiplied by `decay` every step_epochs.
    Steps at or past num_epochs keep the last rate.

    `kind="cosine"` replaces the steps by `lr0 * (1 + cos(pi * step / total)) / 2`, total = num_epochs *
    steps_per_epoch (0 from the end on). A warmup of W = round(warmup_epochs * steps_per_epoch) steps
    multiplies either by `(step + 1) / W` while step < W: the first step already moves (at lr0 / W),
    step W - 1 runs at the full rate, and the schedule's own boundaries stay where the template puts them.

    Args:
      batch_size: global batch size (images per step).
      per_item_lrate: learning rate per image, >= 0.
      init_epochs: epochs at the initial rate, >= 1.
      step_epochs: epochs between decays, >= 1.
      num_epochs: total epochs, >= 1.
      items_per_epoch: images per epoch, >= 1.
      decay: factor applied at each boundary, in (0, 1].
      warmup_epochs: epochs of linear warmup, >= 0.
      kind: "step" (the templates') or "cosine".

    Returns:
      An optax schedule: step (int or int array) -> learning rate (float32 array).

    Examples:
      >>> s = learning_rate_schedule(batch_size=10, per_item_lrate=0.01, init_epochs=2,
      ...                            step_epochs=1, num_epochs=4, items_per_epoch=95)
      >>> [round(float(s(t)), 6) for t in (0, 19, 20, 29, 30)]  # 10 steps per epoch
      [0.1, 0.1, 0.01, 0.01, 0.001]
    """
    for name, value in (("init_epochs", init_epochs), ("step_epochs", step_epochs), ("num_epochs", num_epochs)):
        if value < 1:
            raise ValueError(f"{name}={value} must be >= 1")
    if per_item_lrate < 0:
        raise ValueError(f"per_item_lrate={per_item_lrate} must be >= 0")
    if not 0 < decay <= 1:
        raise ValueError(f"decay={decay} must be in (0, 1]")
    if kind not in ("step", "cosine"):
        raise ValueError(f"kind={kind!r} must be 'step' or 'cosine'")
    per_epoch = steps_per_epoch(items_per_epoch, batch_size)
    initial = batch_size * per_item_lrate
    if kind == "cosine":
        decayed = optax.cosine_decay_schedule(initial, num_epochs * per_epoch)
    else:
        boundaries = {
            epoch * per_epoch: decay
            for epoch in decay_epochs(init_epochs=init_epochs, step_epochs=step_epochs, num_epochs=num_epochs)
        }
        decayed = optax.piecewise_constant_schedule(initial, boundaries)
    if warmup_epochs == 0:
        return decayed
    warmup = warmup_factor(warmup_epochs, per_epoch)
    return lambda step: decayed(step) * warmup(step)


def warmup_factor(warmup_epochs: float, steps_per_epoch: int):
    """`step -> min(1, (step + 1) / W)`, W = round(warmup_epochs * steps_per_epoch): the linear ramp that
    scales the learning rate (and the ArcFace margin, `margin_warmup_epochs`) during a warmup. The first
    step already gets 1 / W of the value, step W - 1 the whole of it; with W = 0 every step gets all of it.

    Examples:
      >>> ramp = warmup_factor(0.5, 8)  # W = 4 steps
      >>> [float(ramp(t)) for t in (0, 1, 3, 4, 100)]
      [0.25, 0.5, 1.0, 1.0, 1.0]
    """
    if warmup_epochs < 0:
        raise ValueError(f"warmup_epochs={warmup_epochs} must be >= 0")
    warmup_steps = round(warmup_epochs * steps_per_epoch)
    if warmup_steps == 0:
        return lambda step: 1.0
    # The step as the default float (float64 under jax_enable_x64), so a float64 run's margin stays float64.
    return lambda step: jnp.minimum(1.0, (jnp.asarray(step, float) + 1) / warmup_steps)


def total_steps(*, batch_size: int, num_epochs: int, items_per_epoch: int) -> int:
    """Optimiser steps in the whole run: num_epochs * steps_per_epoch."""
    return num_epochs * steps_per_epoch(items_per_epoch, batch_size)
