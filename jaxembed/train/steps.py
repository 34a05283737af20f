"""The pure train and eval steps, and their compilation over the device mesh."""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import NamedTuple

import jax
import optax

from jaxembed import parallel, tasks
from jaxembed.train.state import TrainState, ema_decay_at, init_state, update_ema


def train_step(state: TrainState, batch: Mapping[str, jax.Array], *, model, tx,
               loss_fn: tasks.LossFn, ema_decay: float | None = None) -> tuple[TrainState, dict]:
    """One optimiser step on a global batch.

    Args:
      state: the train state.
      batch: `image` uint8 `(B, H, W, 3)`, `label` int32 `(B,)`, `labels` float32 `(B, C)` multi-hot.
      model, tx, loss_fn: the Linen model, optax optimiser and the task's `loss(outputs, params, batch, step)`.
      ema_decay: the decay of the state's moving average of the weights (`state.ema`), if it keeps one.

    Returns:
      The new state and float32 metrics `loss`, `grad_norm`, `param_norm` (a NaN check covers all three).
    """
    dropout_rng = jax.random.fold_in(state.rng, state.step)

    def loss_and_stats(params):
        outputs, updates = model.apply(
            {"params": params, "batch_stats": state.batch_stats}, batch["image"], train=True,
            mutable=["batch_stats"], rngs={"dropout": dropout_rng},
        )
        return loss_fn(outputs, params, batch, step=state.step), updates["batch_stats"]

    (loss, batch_stats), grads = jax.value_and_grad(loss_and_stats, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads), "param_norm": optax.tree.norm(params)}
    new_state = state.replace(step=state.step + 1, params=params, batch_stats=batch_stats, opt_state=opt_state)
    if state.ema is not None:
        decay = ema_decay_at(ema_decay, state.step)
        new_state = new_state.replace(ema=update_ema(state.ema, new_state.trained_variables, decay))
    return new_state, metrics


def eval_step(variables: Mapping, images: jax.Array, *, model) -> dict[str, jax.Array]:
    """Model outputs in inference mode: `embedding` (unit vectors) and, for classifiers, `logits`."""
    return model.apply(variables, images, train=False)


class Steps(NamedTuple):
    """The compiled functions of a run."""

    init: Callable  # rng -> TrainState, created on the devices
    train: Callable  # (state, global batch) -> (state, metrics); donates the state
    evaluate: Callable  # (variables, global images) -> outputs


def compile_steps(run) -> Steps:
    """`Steps` jitted over `run.mesh`: batches split over all devices, the state replicated except
    the ArcFace centres and their optimiser state, split over `model` (`parallel.state_shardings`)."""
    replicated, sharded = parallel.replicated(run.mesh), parallel.batch_sharded(run.mesh)
    make_state = functools.partial(init_state, model=run.model, tx=run.tx, image_size=run.config.image_size,
                                   num_classes=run.num_classes, ema=run.config.ema_decay is not None)
    shardings = parallel.state_shardings(jax.eval_shape(make_state, jax.random.PRNGKey(0)), run.mesh)
    loss_fn = run.task.loss_fn(mesh=run.mesh, num_classes=run.num_classes, steps_per_epoch=run.steps_per_epoch)
    step = jax.jit(
        functools.partial(train_step, model=run.model, tx=run.tx, loss_fn=loss_fn, ema_decay=run.config.ema_decay),
        in_shardings=(shardings, sharded), out_shardings=(shardings, replicated), donate_argnums=0,
    )
    evaluate = jax.jit(functools.partial(eval_step, model=run.model), in_shardings=(shardings.variables, sharded),
                       out_shardings=sharded)
    return Steps(init=jax.jit(make_state, out_shardings=shardings), train=step, evaluate=evaluate)
