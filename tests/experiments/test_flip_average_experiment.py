"""experiments/flip_average.py: its committed table, and its scores of the shared tiny run against the
trainer's own held-out metrics (another path to the same plain embeddings)."""

import json

import pytest

import _experiment_script as experiment_script


@pytest.fixture(scope="module")
def script():
    return experiment_script.load("flip_average")


@pytest.mark.parametrize("name", ["flip_average", "flip_average_digits", "flip_average_arcface"])
@pytest.mark.results
def test_the_committed_table_is_what_the_committed_json_gives(script, name):
    result, table = experiment_script.committed_result(name)
    assert script.markdown(result["rows"], result["command"]) == table
    assert result["command"].startswith("python experiments/flip_average.py ")
    assert "holdout" in {row["split"] for row in result["rows"]}


def test_it_scores_the_held_out_images_plain_as_the_trainer_did(script, tiny_run, tmp_path, capsys):
    out = str(tmp_path / "flip")
    assert script.main([tiny_run.workdir, "--out", out]) == 0
    [row] = json.loads((tmp_path / "flip.json").read_text())["rows"]  # no --test: the holdout only
    assert row["split"] == "holdout" and row["plain"]["num_test_images"] == 18
    # The trainer embedded its held-out digits with its eval step; the script through jaxembed.load.
    for name in ("recall@1", "map@r"):
        assert row["plain"][name] == pytest.approx(tiny_run.summary[f"eval/{name}"]), name
    assert row["flip_averaged"]["recall@1"] != row["plain"]["recall@1"] or \
        row["flip_averaged"]["map@r"] != row["plain"]["map@r"]  # digits' mirror images are other shapes
    with pytest.raises(SystemExit):
        script.main([str(tmp_path)])
    assert "no summary.json, not a finished run" in capsys.readouterr().err
