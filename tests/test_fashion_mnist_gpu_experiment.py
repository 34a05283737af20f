"""experiments/fashion_mnist_gpu.py: its commands and table (no training)."""

import json

import pytest

import _experiment_script as experiment_script


@pytest.fixture(scope="module")
def gpu():
    return experiment_script.load("fashion_mnist_gpu")


def test_rows_hold_the_commands_the_script_builds_and_tabulate_as_committed(gpu):
    results = experiment_script.EXPERIMENTS / "results" / "fashion_mnist_gpu"
    rows = json.loads(results.with_suffix(".json").read_text())
    assert gpu.markdown(rows) == results.with_suffix(".md").read_text()
    for row in rows:
        flags = gpu.row_flags(row["setting"], row["num_epochs"])
        assert "python -m jaxembed.train " + " ".join(flags) == row["command"]
        base, overrides = gpu.SETTINGS[row["setting"]]
        assert all(flag in flags for flag in overrides)
