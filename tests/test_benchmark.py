"""experiments/benchmark.py: its arithmetic, and one tiny end-to-end run (BN-Inception, 32 px, batch 2).

The end-to-end run measures nothing meaningful; it checks that every measuring process starts, runs
the trainer's step and writes its result, PyTorch's too where torch and torchvision are installed.
"""

from __future__ import annotations

import importlib.util
import json
import pathlib
import subprocess
import sys

import pytest

BENCHMARK = pathlib.Path(__file__).resolve().parents[1] / "experiments" / "benchmark.py"
HAVE_TORCHVISION = all(importlib.util.find_spec(name) is not None for name in ("torch", "torchvision"))


def _benchmark():
    spec = importlib.util.spec_from_file_location("benchmark", BENCHMARK)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_summaries_credit_both_sides_with_the_jax_flops():
    benchmark = _benchmark()
    rows = [{
        "template": "inception_bn", "arch": "inception_bn", "image_size": 32,
        # 8 images: JAX 2 s and 1 s per step, PyTorch 4 s and 0.5 s (medians of the lists).
        "jax": {"train_step_s": [2.0, 9.0, 1.0], "infer_step_s": [1.0], "train_flops": 100e9, "infer_flops": 30e9,
                "train_compile_s": 5.0, "infer_compile_s": 1.0},
        "torch": {"train_step_s": [4.0], "infer_step_s": [0.5]},
    }]
    benchmark.add_summaries(rows, roof_gflops=100.0, batch_size=8, peak_tflops=None)
    jax_side, torch_side = rows[0]["jax"], rows[0]["torch"]
    assert jax_side["train"]["images_per_s"] == pytest.approx(4.0)
    assert jax_side["train"]["pct_roof"] == pytest.approx(50.0)  # 100 GFLOP in 2 s of a 100 GFLOP/s roof
    assert torch_side["train"]["pct_roof"] == pytest.approx(25.0)
    assert torch_side["infer"]["pct_roof"] == pytest.approx(60.0)
    assert rows[0]["ratio"] == pytest.approx({"train": 2.0, "infer": 0.5})
    assert jax_side["train_gflop_per_image"] == pytest.approx(12.5)

    report = {"command": "python experiments/benchmark.py", "rows": rows,
              "settings": {"backend": "cpu", "dtype": "float32", "batch_size": 8, "steps": 3, "warmup": 1,
                           "peak_tflops": None},
              "machine": {"cpu": "a CPU", "cpu_count": 2, "cpus_usable": 2, "threads": 2, "versions": {},
                          "git_commit": None, "load_average_at_start": 0.5},
              "roof": {"gflops": 100.0, "size": 64, "dtype": "float32", "jax_start": 100.0, "jax_end": 90.0}}
    table = benchmark.markdown(report)
    train_cells, infer_cells = "4.0 | 50.0 | 2.0 | 25.0 | 2.00", "8.0 | 30.0 | 16.0 | 60.0 | 0.50"
    assert f"| inception_bn | inception_bn | 32 | {train_cells} | {infer_cells} | 5.0 / 1.0 | 12.50 / 3.75 |" in table


def test_tiny_run_end_to_end(tmp_path):
    out = tmp_path / "benchmark"
    command = [sys.executable, str(BENCHMARK), "--templates", "inception_bn", "--sizes", "32", "--batch_size", "2",
               "--steps", "1", "--warmup", "0", "--num_classes", "4", "--roof_size", "256", "--out", str(out)]
    if not HAVE_TORCHVISION:
        command.append("--no_torch")
    result = subprocess.run(command, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    report = json.loads(out.with_suffix(".json").read_text())
    (row,) = report["rows"]
    assert row["jax"]["train"]["images_per_s"] > 0 and row["jax"]["infer"]["images_per_s"] > 0
    assert row["jax"]["train_flops"] > 2 * row["jax"]["infer_flops"] > 0  # backward costs about twice forward
    if HAVE_TORCHVISION:
        assert row["ratio"]["train"] > 0 and row["ratio"]["infer"] > 0
    assert "| inception_bn | inception_bn | 32 |" in out.with_suffix(".md").read_text()
