"""One process of the multi-process training test (`tests/test_multiprocess.py`).

    python tests/_multiprocess_worker.py --workdir DIR --result FILE.json \
        [--num_processes 2 --process_id I --coordinator 127.0.0.1:PORT] [--checkpoint_every N] [--sigterm_at_step S]

Trains the tiny inception_bn configuration of tests/test_train.py on every 10th image of the embedded
default data with `jaxembed.train.train_and_evaluate`, and writes what the test compares to `--result`:
the summary, this process's rows of every training batch (`index`, positions in the training split)
and the device counts; and next to it (`*_eval.npz`) the evaluation outputs it gathered. The local
device count comes from XLA_FLAGS, which the parent sets; it must be in the environment before jax is
imported, which is why this is a separate script and not a fixture.
A checkpoint is kept after every step (unless `--checkpoint_every` says otherwise), so the test can
check each step on its own. With `--sigterm_at_step S` this process sends itself SIGTERM while loading
the batch of step S, as a preemption notice that reaches one host; the exit status is the trainer's
(`train.exit_status`: 143 after a SIGTERM).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys

TINY = dict(image_size=32, batch_size=8, init_epochs=1, step_epochs=1, num_epochs=2, num_items_per_epoch=16,
            per_item_lrate=0.002)


def tiny_setup(checkpoint_every: int = 1):
    """`(config, options, data)`: the tiny inception_bn run of tests/test_train.py."""
    from jaxembed import data as data_lib
    from jaxembed import templates, train

    config = templates.get("inception_bn").config(arch="inception_bn", **TINY)
    options = train.TrainOptions(progress=False, log_every=1, checkpoint_every=checkpoint_every, keep_checkpoints=10,
                                 eval_batch_size=64)
    full = data_lib.load_source(None)
    return config, options, full.subset(range(0, len(full), 10))


def recording_batches(record: list):
    """A stand-in for `train._batches_from` that appends each batch's `index` rows to `record`."""
    from jaxembed import train

    original = train._batches_from

    def batches_from(run, step):
        for batch in original(run, step):
            record.append(batch["index"].tolist())
            yield batch

    return batches_from


def sigterm_at(step: int, batches_from):
    """Wraps a `train._batches_from`: this process gets SIGTERM while the batch of `step` is loaded."""

    def batches_then_sigterm(run, start):
        for current, batch in enumerate(batches_from(run, start), start=start):
            if current == step:
                os.kill(os.getpid(), signal.SIGTERM)
            yield batch

    return batches_then_sigterm


def recording_evaluation(record: dict):
    """A stand-in for `train.embed_split` that also keeps what it returns in `record` (by name)."""
    from jaxembed import train

    original = train.embed_split

    def embed_split(*args, **kwargs):
        outputs = original(*args, **kwargs)
        record.update(outputs)
        return outputs

    return embed_split


def warm_up_collectives() -> None:
    """Opens the cross-process gloo connections now, while the processes are in step.

    XLA's CPU collectives connect a group of devices the first time it communicates, and give the other
    processes only 30 s to arrive. Each process compiles the train step on its own, and on a loaded
    machine one may finish compiling more than 30 s after the other: the first step then fails with
    "Gloo context initialization failed: DEADLINE_EXCEEDED". `jax.distributed.initialize` returns when
    all processes have connected, so collectives run right after it are in step; once a group is
    connected, later collectives wait for late processes without that limit. The trainer uses two
    groups: all devices (the gradient and batch-norm all-reduces) and one device per process
    (`multihost_utils.process_allgather`, used by orbax and by evaluation).
    """
    import jax
    import numpy as np
    from jax.experimental import multihost_utils

    from jaxembed import parallel

    mesh = parallel.make_mesh()
    ones = parallel.global_batch({"x": np.ones(jax.local_device_count(), np.float32)}, mesh)["x"]
    total = jax.jit(jax.numpy.sum, out_shardings=parallel.replicated(mesh))(ones)
    assert int(total) == jax.device_count()
    multihost_utils.sync_global_devices("jaxembed warm-up")


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

    from jaxembed import parallel, train

    if args.num_processes > 1:
        try:
            # Cross-process collectives on CPU need an implementation; gloo ships with jaxlib (the default
            # in jax 0.10, named here so the test keeps meaning what it says if the default changes).
            jax.config.update("jax_cpu_collectives_implementation", "gloo")
            parallel.initialize_distributed(args.coordinator, args.num_processes, args.process_id)
            jax.devices()  # creates the CPU client, which is where a jaxlib without gloo fails
        except (ValueError, AttributeError, RuntimeError) as error:
            if "gloo" not in str(error).lower():
                raise
            print(f"gloo CPU collectives unavailable: {error}", file=sys.stderr)
            return GLOO_UNAVAILABLE
        warm_up_collectives()
    config, options, data = tiny_setup(args.checkpoint_every)
    record, evaluation = [], {}
    train._batches_from = recording_batches(record)
    if args.sigterm_at_step is not None:
        train._batches_from = sigterm_at(args.sigterm_at_step, train._batches_from)
    train.embed_split = recording_evaluation(evaluation)
    summary = train.train_and_evaluate(config, args.workdir, options=options, data=data)
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
    return train.exit_status(summary)


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    sys.exit(main())
