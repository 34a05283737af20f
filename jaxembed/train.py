"""`python -m jaxembed.train`: train a template on labelled images, with checkpoints and resume.

    python -m jaxembed.train --template inception_bn [--data SOURCE] [--workdir DIR] [--image_size 128 ...]

The train state is one pytree; `train_step` and `eval_step` are pure functions compiled once with
`jax.jit` over a `("data", "model")` device mesh (`jaxembed.parallel`): the batch is split over all
devices, the state replicated except, with `--model_parallelism` > 1, the ArcFace class centres and
their optimiser state, which are split over `model` (`jaxembed.sharded_arcface`). The workdir holds orbax
checkpoints, `run.json` (what was trained: template config, label map, options), `metrics.jsonl`
(one JSON object per logged step and per evaluation) and `summary.json` (the final metrics).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import logging
import math
import os
import shutil
import signal
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from jaxembed import data as data_lib
from jaxembed import evaluate, losses, models, parallel, schedules, sharded_arcface, templates

log = logging.getLogger("jaxembed.train")

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


@flax.struct.dataclass
class TrainState:
    """Everything that changes during training, as one pytree (saved whole in checkpoints)."""

    step: jax.Array  # int32 scalar: optimiser steps taken
    params: Any
    batch_stats: Any
    opt_state: Any
    rng: jax.Array  # the run's key; each step folds in its step number


@dataclasses.dataclass(frozen=True)
class TrainOptions:
    """Settings of a run that are not template hyperparameters."""

    seed: int = 0
    optimizer: str = "sgd"  # "sgd" (with momentum, the classic choice for these nets) or "adamw"
    momentum: float = 0.9
    weight_decay: float = 5e-4
    lr_decay: float = 0.1  # the factor applied every step_epochs after init_epochs
    dtype: str = "float32"  # computation dtype; parameters and losses stay float32
    remat: bool = False
    holdout: str | None = None  # "images" or "concepts"; default: images for classifiers, concepts for ArcFace
    holdout_fraction: float = 0.1
    min_crop_area: float = 0.25  # random-resized-crop keeps at least this fraction of the image area
    data_dir: str | None = None
    depth: int | None = None
    log_every: int = 10
    checkpoint_every: int = 200  # steps between checkpoints
    keep_checkpoints: int = 3
    eval_batch_size: int = 64
    init_from: str | None = None  # torchvision/BN-Inception weights (.pth or .safetensors) for the backbone
    max_steps: int | None = None  # stop (with a checkpoint) at this step; resume later
    model_parallelism: int = 1  # devices along the mesh's `model` axis, sharing the ArcFace class centres
    progress: bool = True

    def __post_init__(self):
        if self.optimizer not in ("sgd", "adamw"):
            raise ValueError(f"optimizer={self.optimizer!r} is invalid: expected sgd or adamw")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype={self.dtype!r} is invalid: expected one of {', '.join(DTYPES)}")
        if self.holdout not in (None, "images", "concepts"):
            raise ValueError(f"holdout={self.holdout!r} is invalid: expected images or concepts")
        if not 0 < self.min_crop_area <= 1:
            raise ValueError(f"min_crop_area={self.min_crop_area} must be in (0, 1]")
        if not 0 < self.holdout_fraction < 1:
            raise ValueError(f"holdout_fraction={self.holdout_fraction} must be in (0, 1)")
        for name in ("log_every", "checkpoint_every", "keep_checkpoints", "eval_batch_size", "model_parallelism"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")


class TrainingStopped(RuntimeError):
    """Training stopped early (NaN loss); the message names the step and the last good checkpoint."""


# ----------------------------------------------------------------------------- model, loss, optimiser


def build_model(config: templates.Config, num_classes: int, *, dtype: Any = jnp.float32, remat: bool = False):
    """The template's Linen model: backbone + head, taking raw uint8 NHWC images."""
    backbone = models.create(config.arch, dtype=dtype, remat=remat)
    if config.template.head == "arcface":
        return models.heads.ArcFaceModel(
            backbone=backbone, embeddings_size=config.embeddings_size, num_classes=num_classes, dtype=dtype
        )
    return models.heads.ClassifierModel(backbone=backbone, num_classes=num_classes, dtype=dtype)


def template_loss(config: templates.Config, *, mesh=None, num_classes: int | None = None
                  ) -> Callable[[Mapping, Any, Mapping], jax.Array]:
    """`loss(outputs, params, batch) -> scalar` for the template (ArcFace, sigmoid or softmax).

    With a `mesh` whose `model` axis has several devices, ArcFace is `sharded_arcface_loss`, which
    keeps the centres and logits split over `model`; it counts only the first `num_classes` centre
    columns as classes (the rest pad the class count to a multiple of the `model` size).
    """
    if config.template.head == "arcface":
        scale, margin = float(config.angular_scale), float(config.angular_margin)
        if mesh is not None and mesh.shape[parallel.MODEL_AXIS] > 1:
            def sharded_arcface_loss(outputs, params, batch):
                return sharded_arcface.sharded_arcface_loss(
                    outputs["features"], params["centers"], batch["label"], scale=scale, margin=margin, mesh=mesh,
                    valid_classes=num_classes)

            return sharded_arcface_loss

        def arcface(outputs, params, batch):
            return losses.arcface_loss(outputs["features"], params["centers"], batch["label"], scale=scale, margin=margin)

        return arcface
    if config.logreg:
        return lambda outputs, params, batch: losses.sigmoid_loss(outputs["logits"], batch["labels"])
    return lambda outputs, params, batch: losses.softmax_loss(outputs["logits"], batch["label"])


def _decay_mask(params):
    # Weight decay on kernels and class centres only: decaying BN scales and biases hurts.
    return jax.tree.map(lambda p: p.ndim > 1, params)


def build_optimizer(schedule: optax.Schedule, options: TrainOptions) -> optax.GradientTransformation:
    if options.optimizer == "adamw":
        return optax.adamw(schedule, weight_decay=options.weight_decay, mask=_decay_mask)
    return optax.chain(
        optax.add_decayed_weights(options.weight_decay, mask=_decay_mask),
        optax.sgd(schedule, momentum=options.momentum),
    )


# ----------------------------------------------------------------------------- pure steps


def init_state(rng: jax.Array, *, model, tx: optax.GradientTransformation, image_size: int,
               num_classes: int | None = None) -> TrainState:
    """A fresh train state (pure; jit it with out_shardings to create it directly on devices).

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
    return TrainState(
        step=jnp.zeros((), jnp.int32), params=params, batch_stats=variables.get("batch_stats", {}),
        opt_state=tx.init(params), rng=state_rng,
    )


def train_step(state: TrainState, batch: Mapping[str, jax.Array], *, model, tx, loss_fn) -> tuple[TrainState, dict]:
    """One optimiser step on a global batch.

    Args:
      state: the train state.
      batch: `image` uint8 `(B, H, W, 3)`, `label` int32 `(B,)`, `labels` float32 `(B, C)` multi-hot.
      model, tx, loss_fn: the Linen model, optax optimiser and `loss(outputs, params, batch)`.

    Returns:
      The new state and float32 metrics `loss`, `grad_norm`, `param_norm` (a NaN check covers all three).
    """
    dropout_rng = jax.random.fold_in(state.rng, state.step)

    def loss_and_stats(params):
        outputs, updates = model.apply(
            {"params": params, "batch_stats": state.batch_stats}, batch["image"], train=True,
            mutable=["batch_stats"], rngs={"dropout": dropout_rng},
        )
        return loss_fn(outputs, params, batch), updates["batch_stats"]

    (loss, batch_stats), grads = jax.value_and_grad(loss_and_stats, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads), "param_norm": optax.tree.norm(params)}
    new_state = state.replace(step=state.step + 1, params=params, batch_stats=batch_stats, opt_state=opt_state)
    return new_state, metrics


def eval_step(variables: Mapping, images: jax.Array, *, model) -> dict[str, jax.Array]:
    """Model outputs in inference mode: `embedding` (unit vectors) and, for classifiers, `logits`."""
    return model.apply(variables, images, train=False)


# ----------------------------------------------------------------------------- the run


@dataclasses.dataclass
class Run:
    """What a run needs besides the state: built once from the config, the data and the options."""

    config: templates.Config
    options: TrainOptions
    train_data: Any
    eval_data: Any
    concepts: tuple[str, ...]
    mesh: Any
    model: Any
    tx: optax.GradientTransformation
    schedule: optax.Schedule
    steps_per_epoch: int
    total_steps: int

    @property
    def local_batch_size(self) -> int:
        return parallel.per_process_batch_size(self.config.batch_size, self.mesh)

    @property
    def num_classes(self) -> int:
        """The training classes (the model may have more class-centre columns: padding)."""
        return len(self.concepts)


def padded_class_count(num_classes: int, model_parallelism: int) -> int:
    """Columns of the ArcFace centre matrix: `num_classes` rounded up to a multiple of `model_parallelism`.

    Any class count works with any model_parallelism: the extra columns are zeros that the loss
    masks out (`sharded_arcface_loss(valid_classes=...)`), so loss and gradients equal those of
    the unpadded centres. Checkpoints hold the padded matrix; `jaxembed.load` drops the padding.
    """
    return math.ceil(num_classes / model_parallelism) * model_parallelism


def _split(data, config: templates.Config, options: TrainOptions):
    holdout = options.holdout or ("concepts" if config.template.head == "arcface" else "images")
    if holdout == "images":
        return data_lib.split_by_images(data, options.holdout_fraction, options.seed)
    fraction = options.holdout_fraction
    if round(fraction * data.num_concepts) < 2 <= data.num_concepts - 2:
        # Retrieval among one unseen concept is trivially perfect: hold out at least two.
        fraction = 2 / data.num_concepts
        log.info("holding out 2 of %d concepts (holdout_fraction %.3f) so retrieval is meaningful",
                 data.num_concepts, fraction)
    return data_lib.split_by_concepts(data, fraction, options.seed)


def prepare_run(config: templates.Config, options: TrainOptions, data) -> Run:
    """Splits the data, builds model, optimiser and schedule, and checks they fit together."""
    if data.num_concepts < 2 and config.template.head == "arcface" or (
            config.template.head == "classifier" and not config.logreg and data.num_concepts < 2):
        raise ValueError(f"{config.template.name} with this loss needs at least 2 concepts; the data "
                         f"({data.source or 'default'}) has {data.num_concepts}: {list(data.concepts)}")
    if options.model_parallelism > 1 and config.template.head != "arcface":
        raise ValueError(f"model_parallelism={options.model_parallelism} shards the ArcFace class centres, "
                         f"which the {config.template.name} template does not have: use model_parallelism=1")
    train_data, eval_data = _split(data, config, options)
    num_concepts = train_data.num_concepts  # a class-disjoint split leaves the training side fewer
    mesh = parallel.make_mesh(model_parallelism=options.model_parallelism)
    local_batch = parallel.per_process_batch_size(config.batch_size, mesh)
    items_per_epoch = config.num_items_per_epoch or len(train_data)
    if len(train_data) // jax.process_count() < local_batch:
        raise ValueError(
            f"the training split has {len(train_data)} images, fewer than one batch per process "
            f"(batch_size={config.batch_size} over {jax.process_count()} process(es)); lower batch_size"
        )
    per_epoch = schedules.steps_per_epoch(items_per_epoch, config.batch_size)
    schedule = schedules.learning_rate_schedule(
        batch_size=config.batch_size, per_item_lrate=config.per_item_lrate, init_epochs=config.init_epochs,
        step_epochs=config.step_epochs, num_epochs=config.num_epochs, items_per_epoch=items_per_epoch,
        decay=options.lr_decay,
    )
    num_outputs = num_concepts
    if config.template.head == "arcface":
        num_outputs = padded_class_count(num_concepts, options.model_parallelism)
        if num_outputs > num_concepts:
            log.info("%d classes padded to %d centres for model_parallelism=%d (the padding is masked out)",
                     num_concepts, num_outputs, options.model_parallelism)
    model = build_model(config, num_outputs, dtype=DTYPES[options.dtype], remat=options.remat)
    return Run(
        config=config, options=options, train_data=train_data, eval_data=eval_data, concepts=tuple(train_data.concepts),
        mesh=mesh, model=model, tx=build_optimizer(schedule, options), schedule=schedule,
        steps_per_epoch=per_epoch, total_steps=config.num_epochs * per_epoch,
    )


def compile_steps(run: Run):
    """`(init, train_step, eval_step)` jitted over the mesh: batches split over all devices, the state
    replicated except the ArcFace centres and their optimiser state, split over `model`."""
    replicated, sharded = parallel.replicated(run.mesh), parallel.batch_sharded(run.mesh)
    make_state = functools.partial(init_state, model=run.model, tx=run.tx, image_size=run.config.image_size,
                                   num_classes=run.num_classes)
    # Leaves under "centers" (the parameter, its momentum or Adam moments) split over `model`.
    state_shardings = sharded_arcface.tree_shardings(jax.eval_shape(make_state, jax.random.PRNGKey(0)), run.mesh)
    variables_shardings = {"params": state_shardings.params, "batch_stats": state_shardings.batch_stats}
    init = jax.jit(make_state, out_shardings=state_shardings)
    loss_fn = template_loss(run.config, mesh=run.mesh, num_classes=run.num_classes)
    step = jax.jit(
        functools.partial(train_step, model=run.model, tx=run.tx, loss_fn=loss_fn),
        in_shardings=(state_shardings, sharded), out_shardings=(state_shardings, replicated), donate_argnums=0,
    )
    evaluate_batch = jax.jit(
        functools.partial(eval_step, model=run.model), in_shardings=(variables_shardings, sharded),
        out_shardings=sharded,
    )
    return init, step, evaluate_batch


def _batches_from(run: Run, step: int) -> Iterator[dict]:
    """The training batches from optimiser step `step` on, identical to an uninterrupted run's."""
    # The pipeline plans every epoch's order up front, so skipping decodes nothing.
    return data_lib.train_batches(
        run.train_data, image_size=run.config.image_size, batch_size=run.local_batch_size, seed=run.options.seed,
        process_index=jax.process_index(), process_count=jax.process_count(), skip_batches=step,
        crop_area=(run.options.min_crop_area, 1.0),
    )


def embed_split(run: Run, variables, evaluate_batch, data) -> dict[str, np.ndarray]:
    """Eval-mode outputs for every item of `data`, in order, gathered on every process."""
    batch_size = math.ceil(run.options.eval_batch_size / run.mesh.devices.size) * run.mesh.devices.size
    local = batch_size // jax.process_count()
    chunks: dict[str, list[np.ndarray]] = {}
    for batch in data_lib.eval_batches(
        data, image_size=run.config.image_size, batch_size=local,
        process_index=jax.process_index(), process_count=jax.process_count(),
    ):
        images = parallel.global_batch({"image": batch["image"]}, run.mesh)["image"]
        outputs = evaluate_batch(variables, images)
        # Global arrays and each process's own mask/index rows, gathered in the same process order.
        gathered = {
            **multihost_utils.process_allgather({k: outputs[k] for k in ("embedding", "logits") if k in outputs},
                                                tiled=True),
            **multihost_utils.process_allgather({"mask": batch["mask"], "index": batch["index"]}, tiled=True),
        }
        for name, value in gathered.items():
            chunks.setdefault(name, []).append(np.asarray(value))
    joined = {name: np.concatenate(parts) for name, parts in chunks.items()}
    real = joined.pop("mask").astype(bool)
    order = np.argsort(joined.pop("index")[real], kind="stable")
    return {name: value[real][order] for name, value in joined.items()}


def evaluate_run(run: Run, state: TrainState, evaluate_batch) -> dict[str, float]:
    """Held-out metrics: retrieval Recall@1/@5 and MAP@R for all, top-1 (softmax) or mAP (sigmoid)."""
    variables = {"params": state.params, "batch_stats": state.batch_stats}
    outputs = embed_split(run, variables, evaluate_batch, run.eval_data)
    labels = np.asarray([item_labels[0] for item_labels in run.eval_data.labels])
    metrics = {"eval/num_images": float(len(labels))}
    if len(labels) >= 2 and np.bincount(labels).max() >= 2:  # retrieval needs a concept seen twice
        metrics.update({f"eval/{k}": v for k, v in evaluate.recall_at_k(outputs["embedding"], labels).items()})
        metrics["eval/map@r"] = evaluate.map_at_r(outputs["embedding"], labels)
    if "logits" in outputs:
        if run.config.logreg:
            targets = np.zeros_like(outputs["logits"])
            for row, item_labels in enumerate(run.eval_data.labels):
                targets[row, list(item_labels)] = 1.0
            metrics["eval/mAP"] = evaluate.mean_average_precision(outputs["logits"], targets)
        else:
            metrics["eval/top1"] = evaluate.top1_accuracy(outputs["logits"], labels)
    return metrics


# ----------------------------------------------------------------------------- workdir files


def _run_record(run: Run) -> dict:
    return {
        "config": run.config.to_dict(),
        "options": dataclasses.asdict(run.options),
        "concepts": list(run.concepts),
        "num_train_images": len(run.train_data),
        "num_eval_images": len(run.eval_data),
        "steps_per_epoch": run.steps_per_epoch,
        "total_steps": run.total_steps,
    }


def _check_same_run(path: str, record: dict) -> None:
    """A workdir resumes only the run that created it."""
    with open(path) as f:
        previous = json.load(f)
    ignored = {"max_steps", "progress", "log_every", "checkpoint_every", "keep_checkpoints", "eval_batch_size"}
    # An option missing from an older run.json did not exist then: that run used today's default.
    known_before = {"config": {}, "options": dataclasses.asdict(TrainOptions())}
    for section in ("config", "options"):
        before = {k: v for k, v in {**known_before[section], **previous.get(section, {})}.items() if k not in ignored}
        now = {k: v for k, v in record[section].items() if k not in ignored}
        changed = sorted(k for k in set(before) | set(now) if before.get(k) != now.get(k))
        if changed:
            details = ", ".join(f"{k}: {before.get(k)!r} -> {now.get(k)!r}" for k in changed)
            raise ValueError(f"{path} belongs to a different run ({details}); use a new --workdir")


def _append_jsonl(path: str, record: dict) -> None:
    if jax.process_index() == 0:
        with open(path, "a") as f:
            f.write(json.dumps(record) + "\n")


def _write_json(path: str, record: dict) -> None:
    if jax.process_index() == 0:
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(record, f, indent=2)
        os.replace(tmp, path)  # atomic: a crash never leaves half a file


def restore_latest(manager: ocp.CheckpointManager, abstract_state, quarantine: str) -> tuple[TrainState | None, int | None]:
    """The newest checkpoint that restores, and its step.

    An unreadable checkpoint (corrupted, or cut short by a crash mid-save) is moved to `quarantine`
    with a warning, so the run falls back to the previous one and can later save that step again.
    """
    for step in sorted(manager.all_steps(), reverse=True):
        try:
            return manager.restore(step, args=ocp.args.StandardRestore(abstract_state)), step
        except Exception as error:  # noqa: BLE001 - any failure to read means: fall back
            log.warning("checkpoint at step %d is unreadable (%s: %s); falling back to an older one; moved to %s",
                        step, type(error).__name__, str(error)[:200], quarantine)
            if jax.process_index() == 0:
                os.makedirs(quarantine, exist_ok=True)
                target = os.path.join(quarantine, f"{step}-{int(time.time())}")
                shutil.move(os.path.join(manager.directory, str(step)), target)
            multihost_utils.sync_global_devices("quarantine checkpoint")
            manager.reload()
    return None, None


class _StopSignal:
    """Turns SIGTERM/SIGINT into a flag the loop checks, so it can save a checkpoint before exiting."""

    def __init__(self):
        self.signum: int | None = None
        self._previous = {}

    def __enter__(self):
        for signum in (signal.SIGTERM, signal.SIGINT):
            try:
                self._previous[signum] = signal.signal(signum, self._handle)
            except ValueError:  # not the main thread: leave signals alone
                pass
        return self

    def _handle(self, signum, frame):
        if self.signum is not None:  # a second signal: stop now
            raise KeyboardInterrupt
        self.signum = signum
        log.warning("received %s: saving a checkpoint, then exiting", signal.Signals(signum).name)

    def __exit__(self, *exc):
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)


class _SignalVote:
    """Makes every process stop after the same step when any of them receives a signal.

    One process alone (a preemption notice reaches one host) must not stop: the others would wait
    forever in the next step's collectives, and the checkpoint is saved by all processes together.
    So with several processes each step also dispatches a max over the processes' signal numbers
    (0: none), and the loop acts on the previous step's result: by the time the host reads it, the
    devices have finished that step, so the vote never stalls them. All processes read the same
    value after the same step, so they stop, save and exit together, one step after the signal.
    With one process the local signal is acted on at once.
    """

    def __init__(self, mesh):
        self._mesh = mesh
        self._previous_vote = None  # the collective dispatched after the previous step

    def after_step(self, local_signum: int | None) -> int:
        """The signal number all processes act on after this step (0: keep going)."""
        if jax.process_count() == 1:
            return local_signum or 0
        agreed = 0 if self._previous_vote is None else int(self._previous_vote)
        self._previous_vote = parallel.max_over_processes(local_signum or 0, self._mesh)
        return agreed


def train_and_evaluate(config: templates.Config, workdir: str, *, data_spec: str | None = None,
                       options: TrainOptions = TrainOptions(), data=None) -> dict:
    """Trains `config` on `data_spec` (or an already loaded `data`), resuming from `workdir`.

    Returns the summary also written to `workdir/summary.json`. A run stopped by `max_steps` or a
    signal returns early with `"finished": False` and resumes when called again with the same workdir.
    """
    workdir = os.path.abspath(workdir)
    os.makedirs(workdir, exist_ok=True)
    if data is None:
        data = data_lib.load_source(data_spec, data_dir=options.data_dir, depth=options.depth)
    run = prepare_run(config, options, data)
    record = {**_run_record(run), "data": data_spec or data.source or "default"}
    run_path = os.path.join(workdir, "run.json")
    if os.path.exists(run_path):
        _check_same_run(run_path, record)
    else:
        _write_json(run_path, record)
        if jax.process_index() == 0:  # one writer per shared file
            data_lib.save_label_map(run.concepts, os.path.join(workdir, "label_map.json"))
    bad_files = [dataclasses.asdict(bad) for bad in data.bad_files]  # the source has logged each by name

    init, step_fn, evaluate_batch = compile_steps(run)
    state = init(jax.random.PRNGKey(options.seed))
    manager = ocp.CheckpointManager(
        os.path.join(workdir, "checkpoints"),
        options=ocp.CheckpointManagerOptions(max_to_keep=options.keep_checkpoints, create=True),
    )
    restored, restored_step = restore_latest(manager, jax.tree.map(ocp.utils.to_shape_dtype_struct, state),
                                             os.path.join(workdir, "unreadable_checkpoints"))
    if restored is not None:
        state = restored
        log.info("resumed from the checkpoint at step %d", restored_step)
    elif options.init_from:  # a fresh run starts its backbone from pretrained weights; a resumed one keeps its own
        pretrained = models.load_pretrained(config.arch, options.init_from)
        merged = models.merge_backbone({"params": state.params, "batch_stats": state.batch_stats}, pretrained)
        state = state.replace(params=merged["params"], batch_stats=merged["batch_stats"])
        log.info("backbone initialised from %s", options.init_from)
    start = int(state.step)
    last_good = restored_step
    end = run.total_steps if options.max_steps is None else min(run.total_steps, options.max_steps)
    log.info("training %s (%s) on %d images, %d concepts: steps %d -> %d of %d, %d per epoch, %d device(s) "
             "(data %d x model %d)", config.template.name, config.arch, len(run.train_data), len(run.concepts),
             start, end, run.total_steps, run.steps_per_epoch, run.mesh.devices.size,
             run.mesh.shape[parallel.DATA_AXIS], run.mesh.shape[parallel.MODEL_AXIS])

    metrics_path = os.path.join(workdir, "metrics.jsonl")
    progress = _progress_bar(run, start, end)
    batches = _batches_from(run, start)
    pending = None  # (step, metrics) of the last dispatched step, read one step later to keep devices busy
    window_start, window_images = time.perf_counter(), 0
    stopped_by = None
    with _StopSignal() as stop:
        signal_vote = _SignalVote(run.mesh)
        for step in range(start, end):
            batch = parallel.global_batch(next(batches), run.mesh)
            state, metrics = step_fn(state, batch)
            agreed_signum = signal_vote.after_step(stop.signum)
            window_images += config.batch_size
            if pending is not None:
                _check_finite(pending, last_good)
                if (pending[0] + 1) % options.log_every == 0:
                    rate = window_images / (time.perf_counter() - window_start)
                    _log_step(metrics_path, progress, run, pending, rate)
                    window_start, window_images = time.perf_counter(), 0
            pending = (step, metrics)
            progress.update(1)
            if (step + 1) % options.checkpoint_every == 0 or agreed_signum:
                _check_finite(pending, last_good)
                manager.save(step + 1, args=ocp.args.StandardSave(state))
                last_good = step + 1
            if agreed_signum:
                stopped_by = signal.Signals(agreed_signum).name
                break
        if pending is not None:
            _check_finite(pending, last_good)
        final_step = int(state.step)
        if final_step != last_good and final_step > start:
            manager.save(final_step, args=ocp.args.StandardSave(state), force=True)
        manager.wait_until_finished()
    progress.close()

    finished = final_step >= run.total_steps
    summary = {"step": final_step, "total_steps": run.total_steps, "finished": finished,
               "template": config.template.name, "arch": config.arch,
               "bad_files": bad_files, "num_bad_files": len(bad_files)}
    if pending is not None:
        summary["train/loss"] = float(pending[1]["loss"])
    if stopped_by:
        summary["stopped_by"] = stopped_by
    if finished and len(run.eval_data):
        eval_metrics = evaluate_run(run, state, evaluate_batch)
        summary.update(eval_metrics)
        _append_jsonl(metrics_path, {"step": final_step, **eval_metrics})
        log.info("held-out: %s", ", ".join(f"{k}={v:.4f}" for k, v in eval_metrics.items()))
    _write_json(os.path.join(workdir, "summary.json"), summary)
    manager.close()
    return summary


def _check_finite(pending, last_good) -> None:
    step, metrics = pending
    values = {name: float(value) for name, value in metrics.items()}
    if not all(math.isfinite(v) for v in values.values()):
        where = f"the checkpoint at step {last_good}" if last_good else "no checkpoint (none saved yet)"
        raise TrainingStopped(
            f"training stopped: non-finite values at step {step} "
            f"({', '.join(f'{k}={v}' for k, v in values.items())}); the last good state is {where}. "
            "Lower per_item_lrate, or check the data."
        )


def _log_step(path, progress, run: Run, pending, images_per_second: float) -> None:
    step, metrics = pending
    record = {"step": step + 1, "epoch": (step + 1) / run.steps_per_epoch,
              "learning_rate": float(run.schedule(step)), "images_per_second": images_per_second,
              **{name: float(value) for name, value in metrics.items()}}
    _append_jsonl(path, record)
    progress.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['learning_rate']:.3g}",
                         img_s=f"{images_per_second:.1f}", refresh=False)


def _progress_bar(run: Run, start: int, end: int):
    from tqdm.auto import tqdm

    return tqdm(total=end, initial=start, desc=f"{run.config.template.name} step", unit="step",
                disable=not run.options.progress or jax.process_index() != 0, dynamic_ncols=True)


# ----------------------------------------------------------------------------- command line

# Settings for the bare command on a CPU, where the template defaults (224 px, 30 epochs of a
# 100-layer network) would take days. Flags given by the user override them.
CPU_DEMO = {
    "resnet_angular_margin": {"image_size": 32, "batch_size": 32, "num_epochs": 2,
                              "init_epochs": 1, "step_epochs": 1, "num_items_per_epoch": 512,
                              "per_item_lrate": 0.0005, "angular_scale": 32},
    "inception_bn": {"image_size": 32, "batch_size": 32, "num_epochs": 3, "init_epochs": 2, "step_epochs": 1,
                     "per_item_lrate": 0.001},
    "resnext": {"arch": "resnext50_32x4d", "image_size": 32, "batch_size": 32, "num_epochs": 2,
                "init_epochs": 1, "step_epochs": 1, "num_items_per_epoch": 512, "per_item_lrate": 0.001},
}


# Help for the option flags that need more than their default.
OPTION_HELP = {
    "model_parallelism": "devices along the 'model' mesh axis that shard the ArcFace class centres; "
                         "must divide the device count",
}

# The embedded digits are 8x8 pixels: crops of a quarter of that lose the digit.
CPU_DEMO_OPTIONS = {"min_crop_area": 0.7}


def build_parser(template: templates.Template) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m jaxembed.train", description=f"Train the {template.name} template: {template.description}.")
    parser.add_argument("--template", required=True, choices=templates.NAMES)
    parser.add_argument("--data", default=None,
                        help="a folder of concept sub-folders, a .csv/.jsonl manifest, or tfds:NAME[:SPLIT] "
                             "(default: the embedded default dataset)")
    parser.add_argument("--workdir", default=None, help="checkpoints and logs; an unfinished run there resumes "
                                                        "(default: runs/<template>)")
    template.add_arguments(parser)
    defaults = TrainOptions()
    for field in dataclasses.fields(TrainOptions):
        if field.name in ("progress",):
            continue
        default = getattr(defaults, field.name)
        if isinstance(default, bool):
            parser.add_argument(f"--{field.name}", action=argparse.BooleanOptionalAction, default=default)
        else:
            kind = type(default) if default is not None else (int if field.name in ("depth", "max_steps") else str)
            # None = not given, so the demo settings can tell the user's choices from the defaults.
            help_text = f"{OPTION_HELP[field.name]} " if field.name in OPTION_HELP else ""
            parser.add_argument(f"--{field.name}", type=kind, default=None, help=f"{help_text}(default {default})")
    parser.add_argument("--no_progress", action="store_true", help="no progress bar (for logs)")
    parser.add_argument("--coordinator_address", default=None, help="multi-host: the coordinator's host:port")
    parser.add_argument("--num_processes", type=int, default=None)
    parser.add_argument("--process_id", type=int, default=None)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--template", choices=templates.NAMES)
    known, _ = pre.parse_known_args(argv)
    if known.template is None:
        build_parser(templates.get("inception_bn")).parse_args(argv)  # prints usage and the error
        return 2
    template = templates.get(known.template)
    args = build_parser(template).parse_args(argv)
    parallel.initialize_distributed(args.coordinator_address, args.num_processes, args.process_id)

    overrides = {name: getattr(args, name) for name in ("arch", *template.hparams) if getattr(args, name) is not None}
    option_values = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainOptions)
                     if f.name != "progress" and getattr(args, f.name) is not None}
    if args.data is None and jax.default_backend() == "cpu":
        demo_options = {k: v for k, v in CPU_DEMO_OPTIONS.items() if k not in option_values}
        demo = {k: v for k, v in CPU_DEMO[template.name].items() if k not in overrides}
        option_values.update(demo_options)
        if demo or demo_options:
            print(f"jaxembed: training on the embedded default dataset on a CPU; the template defaults would "
                  f"take days here, so these demo settings apply (flags override them): "
                  f"{', '.join(f'--{k} {v}' for k, v in {**demo, **demo_options}.items())}", flush=True)
        overrides = {**demo, **overrides}
    try:
        config = template.config(**overrides)
        options = TrainOptions(**option_values, progress=not args.no_progress)
    except ValueError as error:
        print(f"jaxembed.train: error: {error}", file=sys.stderr)
        return 2
    workdir = args.workdir or os.path.join("runs", template.name)
    try:
        summary = train_and_evaluate(config, workdir, data_spec=args.data, options=options)
    except (TrainingStopped, ValueError, FileNotFoundError) as error:
        print(f"jaxembed.train: error: {error}", file=sys.stderr)
        return 1
    print(json.dumps({k: v for k, v in summary.items() if k != "bad_files"}, indent=2))
    print(f"workdir: {workdir}")
    return exit_status(summary)


def exit_status(summary: Mapping) -> int:
    """0, or for a run stopped by a signal the shell's 128 + its number (143 for SIGTERM), which
    tells a job scheduler the run was interrupted and should be restarted."""
    if summary.get("stopped_by"):
        return 128 + signal.Signals[summary["stopped_by"]].value
    return 0


if __name__ == "__main__":
    sys.exit(main())
