"""Is a logged loss spike the optimiser or the batch? Replays a finished run's batches through frozen weights.

    python experiments/loss_spikes.py RUN_DIR [RUN_DIR ...] [--out experiments/results/loss_spikes]

metrics.jsonl logs, per window of `log_every` steps, the mean step loss and the largest (`loss_max`);
issue 18 calls a step above 3x its window's mean after warmup a spike. An unstable optimiser makes
such a step (a jump the next steps must undo); so does a batch that is simply hard for the model of
the moment, and at a window mean of 0.2 one such batch at 0.6 is "3x". To tell the two apart this
feeds every window after warmup the very batches the run trained on (the pipeline replays them
exactly: same seed, same order, same augmentation) through the run's final weights, frozen: the loss
a training step computes (train-mode batch norm, the step's dropout key), but no update in between.
Frozen weights cannot jump, so a window whose frozen ratio is as high as the logged one had a hard
batch, not an optimiser spike. The final weights are the run's newest checkpoint (its moving average
for a run with `ema_decay`), so early windows, where the model was still far from them, compare less
well than late ones; the table says how far each replayed window was from the end.
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np

import runner  # experiments/runner.py: this script's folder is on sys.path

SPIKE = 3.0  # issue 18: no step loss above 3x its window's mean after warmup


def frozen_step_losses(workdir: str, first_step: int) -> tuple[np.ndarray, int]:
    """`(losses, final step)`: the loss of each training step from `first_step` to the run's end, computed on
    that step's batch by the run's final weights (frozen), as the step itself computed it."""
    import jax

    from jaxembed import parallel, rundir
    from jaxembed.train import loop, prepare, steps as steps_lib

    run_dir = rundir.RunDir(workdir)
    config, data = run_dir.config(), run_dir.data()
    run = prepare.prepare_run(config, data)
    if run.eval_data.item_names != run_dir.heldout(data).item_names:
        raise ValueError(f"{run_dir.file('split.json')}: the replayed split differs from the run's")
    variables, final_step = run_dir.variables()
    variables = jax.device_put(variables, parallel.replicated(run.mesh))  # beside the batches, as in training
    # The step's dropout key comes from the state's rng, which only the seed decides.
    rng = steps_lib.compile_steps(run).init(jax.random.PRNGKey(config.seed)).rng
    loss_fn = run.task.loss_fn(mesh=run.mesh, num_classes=run.num_classes, steps_per_epoch=run.steps_per_epoch)

    @jax.jit
    def step_loss(variables, batch, step):
        outputs, _ = run.model.apply(variables, batch["image"], train=True, mutable=["batch_stats"],
                                     rngs={"dropout": jax.random.fold_in(rng, step)})
        return loss_fn(outputs, variables["params"], batch, step=step)

    batches = loop.training_batches(run, first_step)
    losses = [float(step_loss(variables, parallel.global_batch(next(batches), run.mesh), step))
              for step in range(first_step, final_step)]
    return np.asarray(losses), final_step


def replayed(workdir: str) -> dict:
    """The run's logged windows after warmup beside the same windows replayed through its frozen final weights."""
    from jaxembed import rundir

    run_dir = rundir.RunDir(workdir)
    windows = runner.windows_after_warmup(run_dir.metrics(), run_dir.config().warmup_epochs)
    if not windows:
        raise ValueError(f"{run_dir.file('metrics.jsonl')}: no window after warmup logs loss_max")
    first = windows[0]["step"] - windows[0]["window_steps"]
    losses, final_step = frozen_step_losses(workdir, first)
    rows = []
    for window in windows:
        frozen = losses[window["step"] - window["window_steps"] - first:window["step"] - first]
        rows.append({"step": window["step"], "steps_before_end": final_step - window["step"],
                     "logged_mean": window["loss"], "logged_max": window["loss_max"],
                     "logged_ratio": window["loss_max"] / window["loss"],
                     "frozen_mean": float(frozen.mean()), "frozen_max": float(frozen.max()),
                     "frozen_ratio": float(frozen.max() / frozen.mean())})
    spike = max(rows, key=lambda row: row["logged_ratio"])
    return {"run": os.path.basename(os.path.normpath(workdir)), "final_step": final_step, "windows": rows,
            "largest": spike,
            "logged_spikes": sum(row["logged_ratio"] > SPIKE for row in rows),
            "frozen_spikes": sum(row["frozen_ratio"] > SPIKE for row in rows)}


def markdown(results: list[dict], command: str) -> str:
    number = runner.number
    cells = []
    for r in results:
        s = r["largest"]
        cells.append([r["run"], len(r["windows"]), s["step"], s["steps_before_end"],
                      f"{number(s['logged_max'])} / {number(s['logged_mean'])} = {s['logged_ratio']:.2f}x",
                      f"{number(s['frozen_max'])} / {number(s['frozen_mean'])} = {s['frozen_ratio']:.2f}x",
                      f"{r['logged_spikes']} / {r['frozen_spikes']}",
                      f"{max(row['frozen_ratio'] for row in r['windows']):.2f}x"])
    lines = [f"`{command}`", "",
             "Each run's window with the largest logged step loss / window mean after warmup, and the same "
             "window's batches through the run's final weights, frozen (no update between them).", "",
             *runner.markdown_table(["run", "windows after warmup", "window (last step)", "steps before the end",
                                     "logged: largest step / mean", "frozen: largest step / mean",
                                     f"windows over {SPIKE:g}x: logged / frozen", "largest frozen ratio"], cells)]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", help="finished training runs (workdirs)")
    parser.add_argument("--out", default=os.path.join(runner.RESULTS, "loss_spikes"),
                        help="results path without extension (.json and .md are written)")
    args = parser.parse_args(argv)
    runner.refuse_unfinished(parser, args.runs)
    results = []
    for workdir in args.runs:
        try:
            results.append(replayed(workdir))
        except ValueError as error:  # names metrics.jsonl or split.json
            parser.error(str(error))
        s = results[-1]["largest"]
        print(f"{workdir}: logged {s['logged_ratio']:.2f}x, frozen {s['frozen_ratio']:.2f}x at step {s['step']}",
              file=sys.stderr, flush=True)
    command = "python experiments/loss_spikes.py " + " ".join(args.runs)
    table = markdown(results, command)
    runner.write_results(args.out, {"command": command, "runs": results}, table)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
