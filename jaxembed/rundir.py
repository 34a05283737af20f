"""The run directory: the one reader and writer of a training run's files.

    run.json           what was trained: the whole config (template hyperparameters and run options),
                       the data source, sizes and step counts
    label_map.json     concept names, index -> name
    split.json         the held-out split: the data's item count and the held-out items' positions
                       and names (relative to the data folder, which may move), so evaluation and the
                       report score exactly the images never trained on
    metrics.jsonl      one JSON object per logged step and per evaluation
    events.out.tfevents.*   the same numbers for TensorBoard
    summary.json       the final metrics
    checkpoints/       orbax checkpoints of the whole train state
    unreadable_checkpoints/   checkpoints that failed to restore, moved aside
    .lock              the writer's lock (`jaxembed.fileio.exclusive_lock`)

A trainer holds `RunDir.writer()` for the whole run: one writer per directory, refused at once with
`DirectoryBusy` when another live process holds it. Readers (`jaxembed.load`, evaluate, report,
export, search) never lock and never see a half-written file: every file is replaced atomically.
With several processes, process 0 writes the shared files and holds the lock.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import time
import zlib
from collections.abc import Iterator, Sequence
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from jaxembed import fileio, templates
from jaxembed.data import LabelledImages, load_label_map, load_source, save_label_map

log = logging.getLogger("jaxembed.rundir")


def heldout_names(data: LabelledImages, positions: Sequence[int]) -> list[str]:
    """The names split.json records for the images at `positions`: paths relative to the data's
    folder (or its manifest's folder) where they lie under it, so a run's held-out images are still
    found after the data folder moves; other names (in-memory, TFDS) as they are."""
    root = data.source if os.path.isdir(data.source) else os.path.dirname(data.source)
    names = [data.item_names[i] for i in positions]
    if not os.path.isabs(root):  # "tfds:NAME:SPLIT", "" (in memory): names are not paths
        return names
    return [os.path.relpath(name, root) if name.startswith(root.rstrip(os.sep) + os.sep) else name for name in names]


def split_matches(split: dict, data: LabelledImages) -> bool:
    """Whether `data` holds, at split.json's positions, the held-out images it names."""
    if len(data) != split["num_items"] or any(i >= len(data) for i in split["heldout"]):
        return False
    # Runs from before relative names recorded absolute paths: those still match the data in its old place.
    return split["heldout_names"] in (heldout_names(data, split["heldout"]),
                                      [data.item_names[i] for i in split["heldout"]])


class RunDir:
    """A training run's directory (need not exist yet for a writer)."""

    def __init__(self, path: str):
        self.path = os.path.abspath(path)
        self._events = None  # the TensorBoard event writer, opened by the first `append_metrics`

    def file(self, name: str) -> str:
        return os.path.join(self.path, name)

    @property
    def checkpoints(self) -> str:
        return self.file("checkpoints")

    def exists(self) -> bool:
        """Whether a run was started here (its run.json is written)."""
        return os.path.exists(self.file("run.json"))

    def _require(self, name: str) -> str:
        path = self.file(name)
        if not os.path.exists(path):
            raise FileNotFoundError(f"{path} not found: {self.path!r} is not a jaxembed training workdir")
        return path

    # ------------------------------------------------------------------------- writing (process 0)

    @contextlib.contextmanager
    def writer(self) -> Iterator[RunDir]:
        """Holds the directory's write lock (process 0) for the `with` block.

        With several processes, process 0 tells the others whether it got the lock, so a refused run
        stops on every host at once instead of leaving them waiting for process 0 at the next sync.

        Raises:
          fileio.DirectoryBusy: another live process trains here (on every process of this run).
        """
        with contextlib.ExitStack() as lock:
            refusal = None
            if jax.process_index() == 0:
                try:
                    lock.enter_context(fileio.exclusive_lock(self.path))
                except fileio.DirectoryBusy as error:
                    refusal = error
            if jax.process_count() > 1:
                refused = multihost_utils.broadcast_one_to_all(np.int32(refusal is not None))
                if refusal is None and int(refused):
                    refusal = fileio.DirectoryBusy(self.path, "another writer, which refused process 0 of this run")
            if refusal is not None:
                raise refusal
            yield self

    def start(self, config: templates.Config, *, data_source: str, concepts: Sequence[str],
              data: LabelledImages, heldout: Sequence[int], sizes: dict[str, int]) -> None:
        """Writes a new run's run.json, label_map.json and split.json, or checks that the run already
        here is this one: the same config, field by field, and the same held-out images.

        Raises:
          ValueError: naming run.json and each setting that differs (or the split file).
        """
        split = {"num_items": len(data), "heldout": [int(i) for i in heldout],
                 "heldout_names": heldout_names(data, heldout)}
        if self.exists():
            changed = config.differences(self.record()["config"])
            if changed:
                raise ValueError(f"{self.file('run.json')} belongs to a different run ({', '.join(changed)}); "
                                 "use a new --workdir")
            stored = fileio.read_json(self.file("split.json")) if os.path.exists(self.file("split.json")) else None
            if stored is not None and (stored["heldout"] != split["heldout"] or not split_matches(stored, data)):
                raise ValueError(f"{self.file('split.json')}: the data's held-out images differ from this run's "
                                 "(the data changed since it started); use a new --workdir")
        elif jax.process_index() == 0:
            os.makedirs(self.path, exist_ok=True)
            save_label_map(concepts, self.file("label_map.json"))
            fileio.write_json(self.file("split.json"), split)
            # run.json last: its presence says the run's files are complete.
            fileio.write_json(self.file("run.json"), {"config": config.to_dict(), "data": data_source, **sizes})
        self._check_processes_agree()

    def _check_processes_agree(self) -> None:
        """Every process must see the run process 0 wrote (a shared directory, not a stale local copy)."""
        if jax.process_count() == 1:
            return
        multihost_utils.sync_global_devices("jaxembed: run directory written")
        with open(self._require("run.json"), "rb") as f:
            digest = zlib.crc32(f.read())
        try:
            multihost_utils.assert_equal(np.asarray([digest], np.int64), "run.json differs between processes")
        except AssertionError:
            raise ValueError(f"{self.file('run.json')} differs between processes: every process must see "
                             "the same run directory (a shared file system)") from None

    def append_metrics(self, record: dict) -> None:
        """Appends `record` (with its `step`) to metrics.jsonl, and its numbers to the TensorBoard event
        file beside it (`tensorboard --logdir runs/` shows every run)."""
        if jax.process_index() != 0:
            return
        fileio.append_jsonl(self.file("metrics.jsonl"), record)
        if self._events is None:
            self._events = _event_file(self.path)
        self._events.add_event(_scalars_event(record))
        self._events.flush()

    def write_summary(self, summary: dict) -> None:
        if jax.process_index() == 0:
            fileio.write_json(self.file("summary.json"), summary)

    def checkpoint_manager(self, *, keep: int | None = None) -> ocp.CheckpointManager:
        """The orbax manager of `checkpoints/` (keeping `keep` checkpoints; None: all, for readers)."""
        return ocp.CheckpointManager(
            self.checkpoints, item_handlers=ocp.StandardCheckpointHandler(),
            options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=keep is not None))

    def restore_latest(self, manager: ocp.CheckpointManager, abstract_state) -> tuple[Any, int | None]:
        """The newest checkpoint that restores, and its step (`(None, None)` when none does).

        An unreadable checkpoint (corrupted, or cut short by a crash mid-save) is moved to
        `unreadable_checkpoints/` with a warning, so the run falls back to the previous one and can
        later save that step again.
        """
        quarantine = self.file("unreadable_checkpoints")
        for step in sorted(manager.all_steps(), reverse=True):
            try:
                return manager.restore(step, args=ocp.args.StandardRestore(abstract_state)), step
            except Exception as error:  # noqa: BLE001 - any failure to read means: fall back
                log.warning("checkpoint at step %d is unreadable (%s: %s); falling back to an older one; "
                            "moved to %s", step, type(error).__name__, str(error)[:200], quarantine)
                if jax.process_index() == 0:
                    os.makedirs(quarantine, exist_ok=True)
                    shutil.move(os.path.join(manager.directory, str(step)),
                                os.path.join(quarantine, f"{step}-{int(time.time())}"))
                multihost_utils.sync_global_devices("quarantine checkpoint")
                manager.reload()
        return None, None

    # ------------------------------------------------------------------------- reading

    def record(self) -> dict:
        """run.json as written."""
        return fileio.read_json(self._require("run.json"))

    def config(self) -> templates.Config:
        """The run's validated config. run.json of older versions kept run options apart ("options")."""
        record = self.record()
        values = {**record.get("options", {}), **record["config"]}
        template = templates.get(values.pop("template"))
        known = template.specs
        return template.config(**{name: value for name, value in template.recorded(values).items() if name in known})

    def concepts(self) -> tuple[str, ...]:
        """Concept names, index -> name (label_map.json; older runs kept them in run.json)."""
        path = self.file("label_map.json")
        if os.path.exists(path):
            return load_label_map(path)
        return tuple(self.record()["concepts"])

    def data(self) -> LabelledImages:
        """The run's data loaded again from the source run.json names (the embedded default when "default")."""
        config, spec = self.config(), self.record().get("data")
        return load_source(None if spec in (None, "default") else spec, data_dir=config.data_dir, depth=config.depth)

    def heldout(self, data: LabelledImages) -> LabelledImages:
        """The held-out images of `data`, the run's data loaded again, exactly as the run held them out.

        Raises:
          ValueError: naming split.json when `data` is not the data the run was trained on.
        """
        return data.subset(self._heldout_positions(data))

    def trained_on(self, data: LabelledImages) -> LabelledImages:
        """The images of `data`, the run's data loaded again, that the run trained on: all but the held-out.

        Raises:
          ValueError: naming split.json when `data` is not the data the run was trained on.
        """
        heldout = set(self._heldout_positions(data))
        return data.subset([i for i in range(len(data)) if i not in heldout])

    def _heldout_positions(self, data: LabelledImages) -> list[int]:
        split = fileio.read_json(self._require("split.json"))
        if not split_matches(split, data):
            raise ValueError(f"{self.file('split.json')} does not match the data given ({len(data)} images, "
                             f"{data.source or 'default'}): the run held out images of {split['num_items']}")
        return split["heldout"]

    def metrics(self) -> list[dict]:
        """metrics.jsonl's records, oldest first."""
        return fileio.read_jsonl(self.file("metrics.jsonl"))

    def summary(self) -> dict | None:
        """summary.json, or None before the run has one."""
        path = self.file("summary.json")
        return fileio.read_json(path) if os.path.exists(path) else None

    def latest_step(self) -> int | None:
        with self.checkpoint_manager() as manager:
            return manager.latest_step()

    def variables(self, step: int | None = None) -> tuple[dict, int]:
        """`({"params", "batch_stats"}, step)` of the newest checkpoint (or `step`) on one local device,
        whatever device layout wrote it; for a run with `ema_decay`, its moving average of the weights;
        ArcFace centres without the columns that padded them for model parallelism.

        Safe while the run trains: the newest checkpoint can be deleted by the trainer (it keeps
        `keep_checkpoints`) while it is being read; then the newest one is read again.
        """
        newest = step is None
        device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        with self.checkpoint_manager() as manager:
            for attempt in range(10):
                step = manager.latest_step() if newest else step
                if step is None:
                    raise FileNotFoundError(f"no checkpoint in {self.checkpoints}")
                try:
                    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device),
                                          manager.item_metadata(step))
                    restored = manager.restore(step, args=ocp.args.StandardRestore(target))
                    break
                except Exception:
                    manager.reload()
                    # A newer checkpoint appeared meanwhile: the trainer moved on and may have deleted
                    # this one. Otherwise the checkpoint itself is unreadable: say so.
                    if not newest or attempt == 9 or manager.latest_step() == step:
                        raise
                    log.info("checkpoint %d was replaced while being read; reading the newest", step)
        # A run with `ema_decay` is used through its moving average of the weights.
        weights = restored if restored.get("ema") is None else restored["ema"]
        params = weights["params"]
        if "centers" in params:
            params = {**params, "centers": params["centers"][:, :len(self.concepts())]}
        return {"params": params, "batch_stats": weights["batch_stats"]}, step


def _event_file(directory: str):
    """A TensorBoard event file in `directory`, written by the tensorboard package's own writer, which
    needs no TensorFlow (imported here, by the first record: readers of a run never need it)."""
    from tensorboard.summary.writer.event_file_writer import EventFileWriter

    return EventFileWriter(directory)


def _scalars_event(record: dict):
    """The numbers of a metrics record (but its `step`) as one TensorBoard event at that step."""
    from tensorboard.compat.proto import event_pb2, summary_pb2

    values = [summary_pb2.Summary.Value(tag=name, simple_value=float(value)) for name, value in record.items()
              if name != "step" and isinstance(value, (int, float)) and not isinstance(value, bool)]
    return event_pb2.Event(wall_time=time.time(), step=int(record["step"]), summary=summary_pb2.Summary(value=values))
