"""TensorFlow is optional: the bare trainer command and `jaxembed.load` run where it is not installed, as on
a JAX accelerator image. Real subprocesses, with tests/no_tensorflow on PYTHONPATH hiding the package from
them and from the data worker they spawn."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np

TESTS = os.path.dirname(os.path.abspath(__file__))
TIMEOUT = 300  # for each subprocess: generous, the machine is shared


def _env() -> dict:
    path = os.pathsep.join([os.path.join(TESTS, "no_tensorflow"), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return {**os.environ, "PYTHONPATH": path, "XLA_FLAGS": "--xla_force_host_platform_device_count=1",
            "JAX_PLATFORMS": "cpu"}


def test_the_bare_command_and_load_run_without_tensorflow(tmp_path):
    hidden = subprocess.run([sys.executable, "-c", "import tensorflow"], capture_output=True, text=True, env=_env(),
                            timeout=TIMEOUT)
    assert "No module named 'tensorflow'" in hidden.stderr  # the setting below is what it claims to be

    workdir = str(tmp_path / "run")
    # The bare command (embedded default data, CPU demo settings), with a data worker process (none by
    # default below 4 cores), on the test backbone and for 3 steps to stay fast; tests/_lock_trainer.py
    # runs `python -m jaxembed.train`.
    trained = subprocess.run([sys.executable, os.path.join(TESTS, "_lock_trainer.py"), "--template", "inception_bn",
                              "--arch", "tiny", "--max_steps", "3", "--log_every", "1", "--data_workers", "1",
                              "--workdir", workdir, "--no_progress"], capture_output=True, text=True, env=_env(),
                             timeout=TIMEOUT)
    assert trained.returncode == 0, trained.stderr
    summary = json.loads(trained.stdout[trained.stdout.index("{"):trained.stdout.rindex("}") + 1])
    assert summary["step"] == 3 and np.isfinite(summary["train/loss"])
    assert any(name.startswith("events.out.tfevents.") for name in os.listdir(workdir))  # TensorBoard's file

    load = ("import json, sys; sys.path.insert(0, sys.argv[2]); import tiny, numpy, jaxembed\n"
            "embedder = jaxembed.load(sys.argv[1])\n"
            "vectors = embedder(numpy.full((2, 32, 32, 3), 200, numpy.uint8))\n"
            "print(json.dumps({'shape': vectors.shape, 'norms': numpy.linalg.norm(vectors, axis=1).tolist(),\n"
            "                  'tensorflow': 'tensorflow' in sys.modules}))")
    loaded = subprocess.run([sys.executable, "-c", load, workdir, TESTS], capture_output=True, text=True, env=_env(),
                            timeout=TIMEOUT)
    assert loaded.returncode == 0, loaded.stderr
    result = json.loads(loaded.stdout.strip().splitlines()[-1])
    assert result["shape"][0] == 2 and not result["tensorflow"]
    # Unit vectors: float32 normalisation leaves norms within an ulp or so of 1 (1.2e-7 measured).
    np.testing.assert_allclose(result["norms"], 1.0, rtol=0, atol=5e-7)
