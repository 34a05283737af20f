"""`train_and_evaluate`: the training loop, from a config and data to a finished run directory."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import signal
from collections.abc import Iterator

import jax
import numpy as np
import orbax.checkpoint as ocp

from jaxembed import data as data_lib
from jaxembed import metrics, models, parallel, rundir, templates
from jaxembed.eval import evaluate
from jaxembed.inference import embed
from jaxembed.train import hooks
from jaxembed.train.prepare import Run, prepare_run
from jaxembed.train.state import TrainState
from jaxembed.train.steps import Steps, compile_steps

log = logging.getLogger("jaxembed.train")


def training_batches(run: Run, step: int) -> Iterator[dict]:
    """This process's training batches from optimiser step `step` on, identical to an uninterrupted
    run's (the pipeline plans every epoch's order up front, so skipping decodes nothing)."""
    workers = run.config.data_workers
    return data_lib.train_batches(
        run.train_data, image_size=run.config.image_size, batch_size=run.local_batch_size, seed=run.config.seed,
        augmentation=data_lib.Augmentation.from_config(run.config), process_index=jax.process_index(),
        process_count=jax.process_count(), skip_batches=step,
        workers=data_lib.default_workers() if workers is None else workers)


def train_and_evaluate(config: templates.Config, workdir: str, *, data_spec: str | None = None,
                       data: data_lib.LabelledImages | None = None) -> dict:
    """Trains `config` on `data_spec` (or an already loaded `data`), resuming from `workdir`.

    Holds the workdir's write lock throughout (`fileio.DirectoryBusy` if another process trains there).
    Returns the summary also written to `workdir/summary.json`. A run stopped by `max_steps` or a
    signal returns early with `"finished": False` and resumes when called again with the same workdir.
    """
    run_dir = rundir.RunDir(workdir)
    with run_dir.writer():
        if data is None:
            data = data_lib.load_source(data_spec, data_dir=config.data_dir, depth=config.depth)
        run = prepare_run(config, data)
        run_dir.start(config, data_source=data_spec or data.source or "default", concepts=run.concepts,
                      data=data, heldout=run.heldout,
                      sizes={"num_train_images": len(run.train_data), "num_eval_images": len(run.eval_data),
                             "steps_per_epoch": run.steps_per_epoch, "total_steps": run.total_steps})
        steps = compile_steps(run)
        with run_dir.checkpoint_manager(keep=config.keep_checkpoints) as manager:
            state, last_good = _initial_state(run, steps, run_dir, manager)
            state, stopped_by, last_loss = _train(run, steps, state, last_good, run_dir, manager)
        summary = _summary(run, state, data, stopped_by=stopped_by, last_loss=last_loss)
        if summary["finished"] and len(run.eval_data):
            heldout_metrics = evaluate_run(run, state, steps)
            summary.update(heldout_metrics)
            run_dir.append_metrics({"step": summary["step"], **heldout_metrics})
            log.info("held-out: %s", ", ".join(f"{k}={v:.4f}" for k, v in heldout_metrics.items()))
        run_dir.write_summary(summary)
    return summary


def _initial_state(run: Run, steps: Steps, run_dir: rundir.RunDir, manager) -> tuple[TrainState, int | None]:
    """The newest readable checkpoint's state, or a fresh one (from pretrained weights with `init_from`)."""
    state = steps.init(jax.random.PRNGKey(run.config.seed))
    restored, step = run_dir.restore_latest(manager, jax.tree.map(ocp.utils.to_shape_dtype_struct, state))
    if restored is not None:
        log.info("resumed from the checkpoint at step %d", step)
        return restored, step
    if run.config.init_from:  # a resumed run keeps its own weights
        pretrained = models.load_pretrained(run.config.arch, run.config.init_from)
        merged = models.merge_backbone(state.trained_variables, pretrained)
        state = state.replace(params=merged["params"], batch_stats=merged["batch_stats"],
                              ema=None if state.ema is None else merged)
        log.info("backbone initialised from %s", run.config.init_from)
    return state, None


def _train(run: Run, steps: Steps, state: TrainState, last_good: int | None, run_dir: rundir.RunDir,
           manager) -> tuple[TrainState, str | None, float | None]:
    """Steps until the end (or `max_steps`, or a signal), checkpointing; returns the state, the signal that
    stopped it and the last step's loss."""
    config = run.config
    start = int(state.step)
    end = min(run.total_steps, config.max_steps or run.total_steps)
    log.info("training %s (%s) on %d images, %d concepts: steps %d -> %d of %d, %d per epoch, %d device(s) "
             "(data %d x model %d)", config.template.name, config.arch, len(run.train_data), run.num_classes,
             start, end, run.total_steps, run.steps_per_epoch, run.mesh.devices.size,
             run.mesh.shape[parallel.DATA_AXIS], run.mesh.shape[parallel.MODEL_AXIS])
    metrics_log = hooks.MetricsLog(run_dir, run, start, end)
    batches = training_batches(run, start)
    pending = None  # (step, metrics) of the last dispatched step, read one step later to keep devices busy
    stopped_by, last_loss = None, None
    with hooks.StopSignal() as stop, contextlib.closing(batches):
        vote = hooks.SignalVote(run.mesh)
        for step in range(start, end):
            try:
                batch = next(batches)
            except data_lib.DataWorkerDied as error:
                last_good = _save_before_stopping(state, pending, last_good, manager)
                where = f"step {last_good}" if last_good else "no step (none saved yet)"
                raise hooks.TrainingStopped(f"training stopped before step {step}: {error}. The last checkpoint "
                                            f"is at {where}; the same command resumes from it") from error
            state, metrics = steps.train(state, parallel.global_batch(batch, run.mesh))
            agreed_signum = vote.after_step(stop.signum)
            if pending is not None:
                hooks.check_finite(*pending, last_good)
                metrics_log.record(*pending)
            pending = (step, metrics)
            metrics_log.progress.update(1)
            if (step + 1) % config.checkpoint_every == 0 or agreed_signum:
                hooks.check_finite(*pending, last_good)
                manager.save(step + 1, args=ocp.args.StandardSave(state))
                last_good = step + 1
            if agreed_signum:
                stopped_by = signal.Signals(agreed_signum).name
                break
        if pending is not None:  # the last step's metrics, which no later step handed over
            hooks.check_finite(*pending, last_good)
            metrics_log.record(*pending)
            last_loss = float(pending[1]["loss"])
        if int(state.step) not in (last_good, start):
            manager.save(int(state.step), args=ocp.args.StandardSave(state), force=True)
        manager.wait_until_finished()
    metrics_log.close()
    return state, stopped_by, last_loss


def _save_before_stopping(state: TrainState, pending, last_good: int | None, manager) -> int | None:
    """Checkpoints the state the loop holds when the input pipeline fails, so no finished step is lost;
    returns the newest checkpointed step. With several processes only the last regular checkpoint counts:
    the others, whose pipelines still run, would not join this save."""
    if jax.process_count() > 1 or int(state.step) in (0, last_good):
        return last_good
    if pending is not None:
        hooks.check_finite(*pending, last_good)  # a NaN state is never saved
    manager.save(int(state.step), args=ocp.args.StandardSave(state), force=True)
    manager.wait_until_finished()
    return int(state.step)


def _summary(run: Run, state: TrainState, data, *, stopped_by: str | None, last_loss: float | None) -> dict:
    step = int(state.step)
    bad_files = [dataclasses.asdict(bad) for bad in data.bad_files]  # the source has logged each by name
    summary = {"step": step, "total_steps": run.total_steps, "finished": step >= run.total_steps,
               "template": run.config.template.name, "arch": run.config.arch,
               "bad_files": bad_files, "num_bad_files": len(bad_files)}
    if last_loss is not None:
        summary["train/loss"] = last_loss
    if stopped_by:
        summary["stopped_by"] = stopped_by
    if run.task.has_class_centres:
        summary.update(closest_centres(run.concepts, state.variables["params"]["centers"]))
    return summary


# Comparing every pair of class centres costs num_concepts^2 dot products: done up to this many concepts.
MAX_CENTRES_COMPARED = 20_000
# Above this cosine (8 degrees) two centres count as one.
MERGED_CENTRES_COSINE = 0.99


def closest_centres(concepts, centers: jax.Array) -> dict:
    """`{"closest_centres": {"concepts": [a, b], "cosine": c}}`: the two concepts whose ArcFace centres
    (`centers` `(D, >= len(concepts))`, padded columns ignored) point most nearly the same way, with a
    warning when they coincide. An additive angular margin lowers the loss of images the backbone cannot
    yet tell apart as their centres approach each other (log(1 + exp(s (cos a - cos(a + m)))) grows
    with the angle a between image and centre), so it can merge the centres of look-alike concepts
    (Fashion-MNIST's coats and pullovers at margin 0.3), and nearest-centre search then cannot separate
    them; a smaller margin pulls less, and so does one ramped up from 0 (`margin_warmup_epochs`). Empty for
    one concept, more than MAX_CENTRES_COMPARED, or centres spread over several processes."""
    if not 2 <= len(concepts) <= MAX_CENTRES_COMPARED or not centers.is_fully_addressable:
        return {}
    first, second, cosine = metrics.closest_pair(np.asarray(centers)[:, :len(concepts)].T)
    if cosine > MERGED_CENTRES_COSINE:
        log.warning("the ArcFace centres of %r and %r point the same way (cosine %.3f): the margin merged two "
                    "look-alike concepts, which nearest-centre search cannot tell apart; a smaller "
                    "--angular_margin (0.1-0.2), or the margin ramped up over the first epoch "
                    "(--margin_warmup_epochs 1), keeps them apart", concepts[first], concepts[second], cosine)
    return {"closest_centres": {"concepts": [concepts[first], concepts[second]], "cosine": cosine}}


@jax.jit
def _flat_pixels(images: jax.Array) -> jax.Array:
    return images.reshape(images.shape[0], -1)


def evaluate_run(run: Run, state: TrainState, steps: Steps) -> dict[str, float]:
    """Held-out metrics, prefixed `eval/`: retrieval Recall@1/5, MAP@R and one-shot accuracy, the
    task's classification metrics (top-1 for softmax, mAP for sigmoid), and `eval/pixels_recall@1`:
    the raw-pixel nearest neighbour's Recall@1 on the same images at the same size, the baseline the
    model must beat (`metrics.pixel_vectors`)."""
    def outputs_and_pixels(variables, images: jax.Array) -> dict[str, jax.Array]:
        # The pixels the model saw, kept from the same pass (each image decoded once), as uint8.
        return {**steps.evaluate(variables, images), "pixels": _flat_pixels(images)}

    outputs = embed.embed_dataset(outputs_and_pixels, state.variables, run.eval_data,
                                  image_size=run.config.image_size, batch_size=run.config.eval_batch_size,
                                  mesh=run.mesh, keep=("embedding", "logits", "pixels"))
    pixels = outputs.pop("pixels")
    results = evaluate.dataset_metrics(outputs, run.eval_data, run.concepts, run.task)
    if "recall@1" in results:  # some concept has two held-out images: the baseline is defined too
        labels = run.eval_data.primary_labels[outputs["index"]]
        pixel_recall = metrics.recall_at_k(metrics.pixel_vectors(pixels), labels, ks=(1,))
        results["pixels_recall@1"] = pixel_recall["recall@1"]
    return {"eval/num_images": float(len(outputs["index"])),
            **{f"eval/{k}": float(v) for k, v in results.items() if k not in ("num_images",)}}
