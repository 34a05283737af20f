"""experiments/omniglot_gpu.py: its rows run omniglot.py's default command, and its table (no training)."""

import json
import shlex

import pytest

import _experiment_script as experiment_script

DEFAULT_ROW = ("inception_bn (inception_bn), 80 px, imagenet stem, 5 epochs, 4 rotations as concepts, "
               "mirrored copies as concepts, gem of inception_4c as the embedding")


@pytest.fixture(scope="module")
def gpu():
    return experiment_script.load("omniglot_gpu")


def test_rows_are_the_committed_cpu_default_command_in_bfloat16(gpu):
    """Reference: the command of the CPU default row in experiments/results/omniglot.json, which
    `python experiments/omniglot.py` ran; only the epochs (from the budget), the size and the dtype differ."""
    rows = json.loads((experiment_script.EXPERIMENTS / "results" / "omniglot.json").read_text())
    cpu = shlex.split(next(row["command"] for row in rows if row["method"] == DEFAULT_ROW))[3:]
    folder = cpu[cpu.index("--data") + 1]
    assert gpu.row_flags("inception_bn_80px", 5, folder) == cpu + ["--dtype", "bfloat16"]
    expected = list(cpu)
    expected[expected.index("--image_size") + 1] = "105"
    expected[expected.index("--num_epochs") + 1] = "23"
    expected += ["--dtype", "bfloat16", "--seed", "1"]
    assert gpu.row_flags("inception_bn_105px", 23, folder, trainer_flags="--seed 1") == expected


def _row(setting: str, one_shot: float) -> dict:
    return {"setting": setting, "template": "inception_bn", "arch": "inception_bn", "image_size": 80,
            "num_epochs": 20, "test": {"recall@1": 0.9, "recall@5": 0.97, "map@r": 0.6, "one_shot_20way": one_shot},
            "holdout": {"top1": 0.8}, "train_seconds": 150.4, "images_per_second_after_first_step": 6123.4,
            "largest_loss_spike": 1.44, "device": "NVIDIA H200", "command": f"python -m jaxembed.train ({setting})"}


def test_collect_orders_rows_as_the_settings_and_keeps_other_settings_rows(gpu, tmp_path):
    results = tmp_path / "omniglot_gpu"
    first, second = tmp_path / "first", tmp_path / "second"
    first.mkdir(), second.mkdir()
    (first / "inception_bn_105px.json").write_text(json.dumps(_row("inception_bn_105px", 0.81)))
    (first / "notes.json").write_text("{}")  # not a setting: ignored
    gpu.main(["--collect", str(first), "--results", str(results)])
    (second / "inception_bn_80px.json").write_text(json.dumps(_row("inception_bn_80px", 0.79)))
    gpu.main(["--collect", str(second), "--results", str(results)])
    rows = json.loads(results.with_suffix(".json").read_text())
    assert [row["setting"] for row in rows] == ["inception_bn_80px", "inception_bn_105px"]
    table = results.with_suffix(".md").read_text()
    assert table == gpu.markdown(rows)
    assert "| 0.900 | 0.970 | 0.600 | 0.790 | top1 0.800 | 150 s | 6,123 | 1.4x | NVIDIA H200 |" in table
    with pytest.raises(SystemExit, match="no <setting>.json"):
        gpu.main(["--collect", str(tmp_path), "--results", str(results)])
    with pytest.raises(SystemExit, match="--collect .*missing: no such folder"):
        gpu.main(["--collect", str(tmp_path / "missing"), "--results", str(results)])
