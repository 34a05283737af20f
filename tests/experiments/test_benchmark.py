"""experiments/benchmark.py's pure parts: its arguments, its arithmetic and its table (nothing is measured).

The measuring processes are not run here: at test sizes they time nothing meaningful, and the
numbers come from running the script itself (experiments/results/benchmark.md).
"""

from __future__ import annotations

import json

import pytest

import _experiment_script as experiment_script


@pytest.fixture(scope="module")
def benchmark():
    return experiment_script.load("benchmark")


def test_arguments_take_backend_defaults_and_refuse_bad_counts(benchmark):
    cpu = benchmark.parse_args([])
    assert (cpu.templates, cpu.sizes, cpu.batch_size) == (list(benchmark.TEMPLATES), [112, 224], 16)
    assert (cpu.peak_tflops, cpu.roof_size, cpu.torch_channels_last) == (None, 2048, False)
    gpu = benchmark.parse_args(["--backend", "gpu", "--dtype", "bfloat16"])
    assert (gpu.peak_tflops, gpu.roof_size, gpu.torch_channels_last) == (989.0, 8192, True)
    for bad in (["--steps", "0"], ["--warmup", "-1"], ["--templates", "vgg"]):
        with pytest.raises(SystemExit):
            benchmark.parse_args(bad)


def test_bad_template_settings_are_refused_before_anything_runs(benchmark, capsys):
    assert benchmark.main(["--templates", "inception_bn", "--sizes", "40"]) == 2  # off the 16 px grid
    assert "image_size=40" in capsys.readouterr().err


def test_summaries_credit_both_sides_with_the_jax_flops(benchmark):
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


def test_a_failed_side_shows_its_error_in_the_table(benchmark):
    report = {"command": "c", "settings": {"backend": "gpu", "dtype": "bfloat16", "batch_size": 8, "steps": 3,
                                           "warmup": 1, "peak_tflops": 989.0},
              "machine": {"cpu": "a CPU", "cpu_count": 2, "cpus_usable": 2, "threads": 2, "versions": {},
                          "git_commit": None, "load_average_at_start": None},
              "roof": {"gflops": 100.0, "size": 64, "dtype": "bfloat16", "jax_start": None, "jax_end": None},
              "rows": [{"template": "resnext", "arch": "resnext101_32x8d", "image_size": 224,
                        "jax": {"error": "timed out after 60 s"}, "torch": {"error": "exit status 1"}}]}
    table = benchmark.markdown(report)
    assert "| % MFU |" in table and "MFU against 989 TFLOP/s" in table
    assert "| resnext | resnext101_32x8d | 224 | timed out after 60 s | - | exit status 1 | - | - |" in table


def test_the_committed_tables_are_what_the_committed_json_gives(benchmark):
    for name in ("benchmark", "benchmark_native_convs"):
        results = experiment_script.EXPERIMENTS / "results" / name
        report = json.loads(results.with_suffix(".json").read_text())
        assert benchmark.markdown(report) == results.with_suffix(".md").read_text(), name


def test_model_flops_count_convolutions_as_written_before_the_compiled_program(benchmark):
    """A 3x3 convolution of 2 images 9x9x3 into 7x7x5: 2*N*Ho*Wo*Cout*kh*kw*Cin = 26,460 FLOPs, the
    textbook count. And the lowered program's count wins over the compiled one's, which on GPU misses
    the convolutions (cuDNN custom calls): stand-in stages below."""
    import jax
    import jax.numpy as jnp
    from jax import lax

    conv = jax.jit(lambda x, w: lax.conv_general_dilated(x, w, (1, 1), "VALID",
                                                         dimension_numbers=("NHWC", "HWIO", "NHWC")))
    lowered = conv.lower(jnp.ones((2, 9, 9, 3)), jnp.ones((3, 3, 3, 5)))
    assert benchmark.flops_of(lowered) == 2 * 2 * 7 * 7 * 5 * 3 * 3 * 3
    assert benchmark.model_flops(lowered, lowered.compile()) == 26_460

    class Stage:
        def __init__(self, analysis):
            self.analysis = analysis

        def cost_analysis(self):
            return self.analysis

    gpu_compiled = Stage({"flops": 3.0})  # only the elementwise work around the custom calls
    assert benchmark.model_flops(Stage({"flops": 26_460.0}), gpu_compiled) == 26_460
    assert benchmark.model_flops(Stage(None), gpu_compiled) == 3.0  # no lowered analysis: the fallback
    assert benchmark.model_flops(Stage([{"flops": 7.0}]), gpu_compiled) == 7.0  # older JAX: a list
