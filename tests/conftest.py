"""Test-session set-up: 8 fake CPU devices, so sharding is tested without accelerators.

XLA reads the flag when the backend starts, so it must be set before anything imports jax.
"""

import os
import tempfile

if "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Many tests compile the same small models: a persistent compilation cache turns repeats into hits.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(tempfile.gettempdir(), "jaxembed-test-xla-cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "-1")

# The one-block test backbone, registered as arch "tiny" for every test module (tests/tiny.py).
import tiny  # noqa: E402,F401


# ------------------------------------------------------------------------- one shared trained tiny run
import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> tiny.TrainedRun:
    """A finished 4-step tiny inception_bn run (sigmoid classifier) on 180 digits in a folder, 18 held out,
    trained once per session (a few seconds on 2 cores) for the tests that need a workdir. They must not change
    it: they read it, and the report test writes its `report/` folder only."""
    return tiny.train_digits_run(str(tmp_path_factory.mktemp("tiny_run")), "inception_bn")
