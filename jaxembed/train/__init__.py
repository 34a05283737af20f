"""The trainer: `python -m jaxembed.train --template NAME [--data SOURCE] [--workdir DIR] [--<setting> VALUE]`.

    state.py    TrainState, its initialisation and the optimiser
    steps.py    the pure train/eval steps and their compilation over the device mesh
    prepare.py  a run's fixed parts from config and data: split, task, model, schedule, mesh
    hooks.py    what the loop calls: stop signals, the NaN check, metric logging, progress
    loop.py     train_and_evaluate: resume, train, checkpoint, evaluate, summarise

The train state is one pytree; the steps are pure functions compiled once with `jax.jit` over a
`("data", "model")` mesh (`jaxembed.parallel`): the batch is split over all devices, the state
replicated except the ArcFace class centres and their optimiser state with `model_parallelism` > 1.
Every file of the run directory is read and written through `jaxembed.rundir`.
"""

from jaxembed.train.hooks import TrainingStopped
from jaxembed.train.loop import evaluate_run, train_and_evaluate, training_batches
from jaxembed.train.prepare import Run, prepare_run
from jaxembed.train.state import TrainState, build_optimizer, init_state
from jaxembed.train.steps import Steps, compile_steps, eval_step, train_step

__all__ = ["Run", "Steps", "TrainState", "TrainingStopped", "build_optimizer", "compile_steps", "eval_step",
           "evaluate_run", "init_state", "prepare_run", "train_and_evaluate", "train_step",
           "training_batches"]
