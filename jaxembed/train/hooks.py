"""The small pieces the training loop calls: stop signals, the NaN check, metric logging, progress."""

from __future__ import annotations

import logging
import math
import signal
import time

import jax
from tqdm.auto import tqdm

from jaxembed import parallel, rundir

log = logging.getLogger("jaxembed.train")


class TrainingStopped(RuntimeError):
    """Training stopped early (NaN loss); the message names the step and the last good checkpoint."""


def check_finite(step: int, metrics: dict, last_good: int | None) -> None:
    """Raises TrainingStopped when a metric of `step` is NaN or infinite."""
    values = {name: float(value) for name, value in metrics.items()}
    if not all(math.isfinite(v) for v in values.values()):
        where = f"the checkpoint at step {last_good}" if last_good else "no checkpoint (none saved yet)"
        raise TrainingStopped(
            f"training stopped: non-finite values at step {step} "
            f"({', '.join(f'{k}={v}' for k, v in values.items())}); the last good state is {where}. "
            "Lower per_item_lrate, or check the data.")


class StopSignal:
    """Turns SIGTERM/SIGINT into a flag the loop checks, so it can save a checkpoint before exiting.
    A second signal stops at once."""

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
        if self.signum is not None:
            raise KeyboardInterrupt
        self.signum = signum
        log.warning("received %s: saving a checkpoint, then exiting", signal.Signals(signum).name)

    def __exit__(self, *exc):
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)


class SignalVote:
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
        self._previous_vote = None

    def after_step(self, local_signum: int | None) -> int:
        """The signal number all processes act on after this step (0: keep going)."""
        if jax.process_count() == 1:
            return local_signum or 0
        agreed = 0 if self._previous_vote is None else int(self._previous_vote)
        self._previous_vote = parallel.max_over_processes(local_signum or 0, self._mesh)
        return agreed


class MetricsLog:
    """Writes the mean of each window of `log_every` steps' metrics to metrics.jsonl and the progress bar.

    A window's mean, not its last step's value: one batch's loss is noise, and a spike between two
    logged steps would go unseen; `loss_max`, the window's largest step loss, shows such a spike. The loop hands over each step's metrics one step late (`record`),
    so reading them never waits for the devices to finish the step just dispatched.
    """

    def __init__(self, run_dir: rundir.RunDir, run, start: int, end: int):
        self._run_dir, self._run = run_dir, run
        self._window_start, self._window_images = time.perf_counter(), 0
        self._window_sums: dict[str, float] = {}
        self._window_steps, self._last_step, self._window_max_loss = 0, start - 1, -math.inf
        self.progress = tqdm(total=end, initial=start, desc=f"{run.config.template.name} step", unit="step",
                             disable=not run.config.progress or jax.process_index() != 0, dynamic_ncols=True)

    def record(self, step: int, metrics: dict) -> None:
        """Metrics of the step that took the state from `step` to `step + 1`."""
        self._window_images += self._run.config.batch_size
        self._window_steps += 1
        self._last_step = step
        for name, value in metrics.items():
            self._window_sums[name] = self._window_sums.get(name, 0.0) + float(value)
        self._window_max_loss = max(self._window_max_loss, float(metrics["loss"]))
        if (step + 1) % self._run.config.log_every == 0:
            self._write_window()

    def close(self) -> None:
        """Writes the last, shorter window (a run's end or a stop between two logging steps), then closes
        the progress bar."""
        if self._window_steps:
            self._write_window()
        self.progress.close()

    def _write_window(self) -> None:
        step = self._last_step
        # One timestamp ends this window and starts the next, so the windows tile the run: the time spent
        # writing here, and any wait for the step in flight, is counted (a gap would overstate images/s).
        now = time.perf_counter()
        rate = self._window_images / (now - self._window_start)
        entry = {"step": step + 1, "epoch": (step + 1) / self._run.steps_per_epoch,
                 "learning_rate": float(self._run.schedule(step)), "images_per_second": rate,
                 "window_steps": self._window_steps,
                 **{name: total / self._window_steps for name, total in self._window_sums.items()},
                 "loss_max": self._window_max_loss}
        self._run_dir.append_metrics(entry)
        self.progress.set_postfix(loss=f"{entry['loss']:.4f}", lr=f"{entry['learning_rate']:.3g}",
                                  img_s=f"{rate:.1f}", refresh=False)
        self._window_start, self._window_images = now, 0
        self._window_sums, self._window_steps, self._window_max_loss = {}, 0, -math.inf
