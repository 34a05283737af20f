"""experiments/loss_spikes.py: the replay feeds each logged window the batches the run trained on.

The independent reference: a run at learning rate 0 never changes its weights, so its frozen replay must
give every logged window's mean and largest step loss again. Only the compiled program differs (the
training step's value_and_grad against a forward pass), so the run is in float64, where that reordering
costs ~1e-15 relative, and the bound 1e-10 is far below any real mistake (a batch off by one step: 1e-2)."""

import json

import jax
import numpy as np
import pytest

import _experiment_script as experiment_script
import tiny
from jaxembed.train import loop


@pytest.fixture(scope="module")
def script():
    return experiment_script.load("loss_spikes")


@pytest.mark.parametrize("template", ["inception_bn", "resnet_angular_margin"])  # ArcFace: dropout in its head
def test_a_run_that_never_moves_replays_its_logged_windows(script, tmp_path, template):
    images = tiny.write_digits_folder(str(tmp_path / "digits"))
    # 12 steps in windows of 3; warmup (which a rate of 0 makes moot) leaves out the first window.
    config = tiny.config(template, per_item_lrate=0.0, num_epochs=6, init_epochs=6, log_every=3,
                         checkpoint_every=100, warmup_epochs=1.5, dtype="float64")
    with jax.enable_x64(True):
        loop.train_and_evaluate(config, str(tmp_path / "run"), data_spec=images)
        script.main([str(tmp_path / "run"), "--out", str(tmp_path / "out")])
    result = json.loads((tmp_path / "out.json").read_text())["runs"][0]
    windows = result["windows"]
    assert [w["step"] for w in windows] == [6, 9, 12] and result["final_step"] == 12
    for window in windows:
        np.testing.assert_allclose(window["frozen_mean"], window["logged_mean"], rtol=1e-10)
        np.testing.assert_allclose(window["frozen_max"], window["logged_max"], rtol=1e-10)
    # The batches differ (augmentation), so the windows' losses do too: a replay of the wrong batches shows.
    assert len({round(w["logged_mean"], 4) for w in windows}) == 3
    assert "frozen: largest step / mean" in (tmp_path / "out.md").read_text()


def test_the_committed_table_is_what_the_committed_json_gives(script):
    committed, table = experiment_script.committed_result("loss_spikes")
    assert script.markdown(committed["runs"], committed["command"]) == table
