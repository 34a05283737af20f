"""One process of the multi-process training test (`tests/test_multiprocess.py`).

    python tests/_multiprocess_worker.py --workdir DIR --result FILE.json \
        [--num_processes 2 --process_id I --coordinator 127.0.0.1:PORT] [--checkpoint_every N] [--sigterm_at_step S]

Trains the tiny inception_bn run of tests/tiny.py (the one-block smooth backbone, in float64) on every
10th image of the embedded default data with `jaxembed.train.train_and_evaluate`, and writes what the
test compares to `--result`: the summary, this process's rows of every training batch (`index`,
positions in the training split) and the device counts; and next to it (`*_eval.npz`) the evaluation
outputs it gathered. The local device count comes from XLA_FLAGS and float64 from JAX_ENABLE_X64=1,
which the parent sets; they must be in the environment before jax is imported, which is why this is a
separate script and not a fixture. The tests folder goes on `sys.path` so that `import tiny` registers
the arch "tiny" here too.
A checkpoint is kept after every step (unless `--checkpoint_every` says otherwise), so the test can
check each step. With `--sigterm_at_step S` this process sends itself SIGTERM while loading the batch
of step S, as a preemption notice that reaches one host; the exit status is the trainer's
(`jaxembed.cli.train.exit_status`: 143 after a SIGTERM).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys

TESTS = os.path.dirname(os.path.abspath(__file__))


def tiny_setup(checkpoint_every: int = 1):
    """`(config, data)`: the tiny inception_bn run of tests/tiny.py in float64, every checkpoint kept."""
    if TESTS not in sys.path:
        sys.path.insert(0, TESTS)
    import tiny

    config = tiny.config("inception_bn", dtype="float64", checkpoint_every=checkpoint_every, keep_checkpoints=10)
    return config, tiny.digits()


def recording_batches(record: list):
    """A stand-in for `jaxembed.train.loop.training_batches` that appends each batch's `index` rows to `record`."""
    from jaxembed.train import loop

    original = loop.training_batches

    def training_batches(run, step):
        for batch in original(run, step):
            record.append(batch["index"].tolist())
            yield batch

    return training_batches


def sigterm_at(step: int, training_batches):
    """Wraps a `training_batches`: this process gets SIGTERM while the batch of `step` is loaded."""

    def batches_then_sigterm(run, start):
        for current, batch in enumerate(training_batches(run, start), start=start):
            if current == step:
                os.kill(os.getpid(), signal.SIGTERM)
            yield batch

    return batches_then_sigterm


def recording_evaluation(record: dict):
    """A stand-in for `jaxembed.embed.embed_dataset` that keeps what its first call returns (the model's
    outputs on the held-out images and their raw pixels, the baseline's input) in `record`."""
    from jaxembed.inference import embed

    original = embed.embed_dataset

    def embed_dataset(*args, **kwargs):
        outputs = original(*args, **kwargs)
        if not record:
            record.update(outputs)
        return outputs

    return embed_dataset


# The exit status that tells the test to skip: this jaxlib cannot run CPU collectives across processes.
GLOO_UNAVAILABLE = 77


def main(argv=None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--result", required=True)
    parser.add_argument("--num_processes", type=int, default=1)
    parser.add_argument("--process_id", type=int, default=0)
    parser.add_argument("--coordinator", default=None, help="host:port of process 0 (loopback only)")
    parser.add_argument("--checkpoint_every", type=int, default=1)
    parser.add_argument("--sigterm_at_step", type=int, default=None, help="send this process SIGTERM at this step")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s p{args.process_id} %(name)s: %(message)s")

    import jax
    import numpy as np

    from jaxembed import fileio, parallel, train
    from jaxembed.cli import train as train_cli
    from jaxembed.inference import embed
    from jaxembed.train import loop

    assert jax.config.jax_enable_x64, "the parent sets JAX_ENABLE_X64=1: the run is in float64"
    if args.num_processes > 1:
        try:
            # Cross-process collectives on CPU need an implementation; gloo ships with jaxlib (the default
            # in jax 0.10, named here so the test keeps meaning what it says if the default changes).
            # `initialize_distributed` also connects the gloo device groups while the processes are in step.
            jax.config.update("jax_cpu_collectives_implementation", "gloo")
            parallel.initialize_distributed(args.coordinator, args.num_processes, args.process_id)
            jax.devices()  # creates the CPU client, which is where a jaxlib without gloo fails
        except (ValueError, AttributeError, RuntimeError) as error:
            if "gloo" not in str(error).lower():
                raise
            print(f"gloo CPU collectives unavailable: {error}", file=sys.stderr)
            return GLOO_UNAVAILABLE
    config, data = tiny_setup(args.checkpoint_every)
    record, evaluation = [], {}
    loop.training_batches = recording_batches(record)
    if args.sigterm_at_step is not None:
        loop.training_batches = sigterm_at(args.sigterm_at_step, loop.training_batches)
    embed.embed_dataset = recording_evaluation(evaluation)
    try:
        summary = train.train_and_evaluate(config, args.workdir, data=data)
    except fileio.DirectoryBusy as error:  # as the command line reports it
        print(f"refused: {error}", flush=True)
        return 2
    np.savez(args.result.removesuffix(".json") + "_eval.npz", **evaluation)
    result = {
        "process_index": jax.process_index(), "process_count": jax.process_count(),
        "device_count": jax.device_count(), "local_device_count": jax.local_device_count(),
        "summary": summary, "batch_indices": record,
    }
    with open(args.result, "w") as f:
        json.dump(result, f)
    if args.num_processes > 1:
        jax.distributed.shutdown()
    return train_cli.exit_status(summary)


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(TESTS))
    sys.exit(main())
