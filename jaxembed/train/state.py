"""The train state and the optimiser: what a step changes, and how."""

from __future__ import annotations

from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax

from jaxembed import templates


@flax.struct.dataclass
class TrainState:
    """Everything that changes during training, as one pytree (saved whole in checkpoints)."""

    step: jax.Array  # int32 scalar: optimiser steps taken
    params: Any
    batch_stats: Any
    opt_state: Any
    rng: jax.Array  # the run's key; each step folds in its step number
    # With `ema_decay`: `{"params", "batch_stats"}` averaged over the steps (`update_ema`); else None.
    ema: Any = None

    @property
    def trained_variables(self) -> dict:
        """The weights as the last step left them."""
        return {"params": self.params, "batch_stats": self.batch_stats}

    @property
    def variables(self) -> dict:
        """What the model uses for inference: the moving average of the weights when the run keeps one."""
        return self.trained_variables if self.ema is None else self.ema


def ema_decay_at(decay: float, step: jax.Array) -> jax.Array:
    """The decay of the average's update at optimiser step `step` (0 for the first): `decay`, but at most
    (1 + step) / (10 + step), so early on the average follows the weights instead of staying near their
    random initialisation (as TensorFlow's ExponentialMovingAverage with num_updates)."""
    step = jnp.asarray(step).astype(jnp.result_type(float))  # float64 under jax_enable_x64, else float32
    return jnp.minimum(decay, (1.0 + step) / (10.0 + step))


def update_ema(ema: dict, variables: dict, decay: jax.Array) -> dict:
    """`decay * ema + (1 - decay) * variables`, leaf by leaf, in each leaf's dtype."""
    return jax.tree.map(lambda average, new: (decay * average + (1 - decay) * new).astype(average.dtype),
                        ema, variables)


def _decay_mask(params):
    # Weight decay on kernels and class centres only: decaying BN scales and biases hurts.
    return jax.tree.map(lambda p: p.ndim > 1, params)


def build_optimizer(schedule: optax.Schedule, config: templates.Config) -> optax.GradientTransformation:
    """SGD with momentum (Nesterov's with `config.nesterov`), or AdamW, at `schedule`, with
    `config.weight_decay` on kernels and centres; the raw gradient's global norm is first clipped to
    `config.clip_grad_norm` when set (before weight decay, which is not a gradient of the data)."""
    clip = [] if config.clip_grad_norm is None else [optax.clip_by_global_norm(config.clip_grad_norm)]
    if config.optimizer == "adamw":
        return optax.chain(*clip, optax.adamw(schedule, weight_decay=config.weight_decay, mask=_decay_mask))
    return optax.chain(
        *clip,
        optax.add_decayed_weights(config.weight_decay, mask=_decay_mask),
        optax.sgd(schedule, momentum=config.momentum, nesterov=config.nesterov),
    )


def init_state(rng: jax.Array, *, model, tx: optax.GradientTransformation, image_size: int,
               num_classes: int | None = None, ema: bool = False) -> TrainState:
    """A fresh train state (pure; jit it with out_shardings to create it directly on devices).

    `ema`: keep a moving average of the weights, starting from the initial weights.

    `num_classes`: the real class count of an ArcFace `model` whose centre matrix has more columns
    (padded to a multiple of `model_parallelism`). The centres start as they would for `num_classes`
    classes, so every model_parallelism starts from the same weights, and the padding columns start
    at zero and stay there: the masked loss gives them zero gradient, and weight decay and momentum
    of zero are zero.
    """
    params_rng, dropout_rng, state_rng = jax.random.split(rng, 3)
    dummy = jnp.zeros((1, image_size, image_size, 3), jnp.uint8)
    padded = num_classes is not None and num_classes < model.num_classes
    unpadded_model = model.clone(num_classes=num_classes) if padded else model
    variables = unpadded_model.init({"params": params_rng, "dropout": dropout_rng}, dummy, train=False)
    params = variables["params"]
    if padded:
        padding = ((0, 0), (0, model.num_classes - num_classes))
        params = {**params, "centers": jnp.pad(params["centers"], padding)}
    # flax's BatchNorm creates its running statistics in float32 whatever the model's dtype, and a
    # float64 step promotes them to float64. Start them as a step leaves them, so the state keeps its
    # dtypes: else a float64 run compiles its step twice and restores checkpoints (shaped like the
    # initial state) with the statistics rounded to float32.
    stats_dtype = jnp.promote_types(jnp.float32, getattr(model, "dtype", jnp.float32))
    batch_stats = jax.tree.map(lambda x: x.astype(jnp.promote_types(x.dtype, stats_dtype)),
                               variables.get("batch_stats", {}))
    return TrainState(
        step=jnp.zeros((), jnp.int32), params=params, batch_stats=batch_stats,
        opt_state=tx.init(params), rng=state_rng,
        ema={"params": params, "batch_stats": batch_stats} if ema else None,
    )
