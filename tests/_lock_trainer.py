"""The real trainer command line with the test backbone, for tests/test_lock.py:

    python tests/_lock_trainer.py ARGS...        # = python -m jaxembed.train ARGS..., with arch "tiny" known

(it runs jaxembed/train/__main__.py itself, after registering "tiny").

With the environment variable JAXEMBED_TEST_GO=FILE it first imports everything and starts the JAX
backend, prints "ready", then waits for FILE to exist before running the command: the test can then
time the command itself (the lock check), not Python's start-up (about 8 s of imports on two cores).
"""

import os
import runpy
import time

import tiny  # noqa: F401  (this script's folder is on sys.path: registers arch "tiny")

import jaxembed.cli.train  # noqa: F401  (imported here, before waiting)

if __name__ == "__main__":
    go = os.environ.get("JAXEMBED_TEST_GO")
    if go:
        import jax

        jax.devices()
        print("ready", flush=True)
        while not os.path.exists(go):
            time.sleep(0.01)
    runpy.run_module("jaxembed.train", run_name="__main__", alter_sys=True)
