"""experiments/runner.py's workdir handling: a fresh run never destroys a finished one."""

import os

import _experiment_script as experiment_script


def test_a_finished_run_is_moved_aside_and_an_unfinished_one_removed(tmp_path):
    runner = experiment_script.load("runner")
    workdir = tmp_path / "run"
    assert runner.set_aside(str(workdir)) is None  # nothing there
    for number in (1, 2):  # two finished runs in turn: neither is lost
        workdir.mkdir()
        (workdir / "summary.json").write_text(f'{{"run": {number}}}')
        assert runner.set_aside(str(workdir)) == f"{workdir}.previous-{number}"
        assert not workdir.exists()
    assert (tmp_path / "run.previous-1" / "summary.json").read_text() == '{"run": 1}'
    assert (tmp_path / "run.previous-2" / "summary.json").read_text() == '{"run": 2}'
    workdir.mkdir()
    (workdir / "train.log").write_text("killed")  # no summary.json: it never finished
    assert runner.set_aside(str(workdir)) is None
    assert sorted(os.listdir(tmp_path)) == ["run.previous-1", "run.previous-2"]
