"""experiments/omniglot_noise.py: which runs count as seeds of one command, its table, bad workdirs
(no scoring: that needs trained runs)."""

import statistics

import pytest

import _experiment_script as experiment_script


@pytest.fixture(scope="module")
def noise():
    return experiment_script.load("omniglot_noise")


def _row(run: str, seed: int, one_shot: float, **config) -> dict:
    return {"run": run, "config": {"image_size": 80, "seed": seed, **config}, "one_shot_table_episodes": one_shot,
            "episode_draws": [one_shot, one_shot + 0.002], "episode_draw_sd": 0.0014, "episodes": 20_000,
            "one_shot": one_shot}


def test_runs_differing_only_in_seed_form_a_group_with_their_spread(noise):
    rows = [_row("a", 0, 0.78, random_erasing=0.0), _row("b", 1, 0.77, random_erasing=0.0),
            _row("c", 2, 0.76, random_erasing=0.0), _row("d", 0, 0.75, random_erasing=0.25),
            _row("e", 0, 0.70, image_size=64, random_erasing=0.0),
            _row("f", 1, 0.74, image_size=64, random_erasing=0.0)]  # e's seed 1
    group, other = noise.seed_groups(rows)  # d and e changed a setting: not seeds of a's command
    assert group["runs"] == ["a", "b", "c"] and group["seeds"] == [0, 1, 2]
    assert other["runs"] == ["e", "f"] and other["mean"] == pytest.approx(0.72)
    assert group["mean"] == pytest.approx(0.77) and group["sd"] == pytest.approx(statistics.stdev([0.78, 0.77, 0.76]))
    assert group["sd"] == pytest.approx(0.01)
    table = noise.markdown(rows)
    assert "| a | 0 | 0.780 | 0.0014 | 0.780 |" in table
    assert "- a, b, c (seeds 0, 1, 2): one-shot mean 0.770, sd 0.010 over 20,000 episodes each" in table
    assert "no runs of one command" in noise.markdown(rows[3:5])


def test_a_run_from_before_an_option_reads_with_its_default(noise, tmp_path):
    """Seeds of one command must group even when one run predates an option (seeds 0-1 of the Omniglot
    default have no margin_warmup_epochs in run.json, seed 2 has 0.0): `run_config` fills the default."""
    from jaxembed import fileio, templates

    config = templates.get("inception_bn").config(seed=1, margin_warmup_epochs=0.0)
    recorded = {"template": "inception_bn", **config}
    older = {k: v for k, v in recorded.items() if k != "margin_warmup_epochs"}
    fileio.write_json(str(tmp_path / "run.json"), {"config": older})
    assert noise.run_config(str(tmp_path)) == recorded


def test_a_workdir_without_a_finished_run_is_refused_by_name(noise, tmp_path, capsys):
    with pytest.raises(SystemExit):
        noise.main([str(tmp_path), "--out", str(tmp_path / "noise")])
    assert f"{tmp_path}: no summary.json, not a finished run" in capsys.readouterr().err


def test_the_committed_table_is_what_the_committed_json_gives(noise):
    rows, table = experiment_script.committed_result("omniglot_noise")
    assert noise.markdown(rows) == table
    assert all(row["episode_draws"][0] == row["one_shot_table_episodes"] for row in rows)
