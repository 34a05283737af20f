"""experiments/omniglot_embeddings.py: the validation alphabet is left out of training and is all that
is scored; its table (no training here: the choice itself is measured by the script on real runs)."""

import json
import os

import numpy as np
import pytest
from PIL import Image

import _experiment_script as experiment_script


@pytest.fixture(scope="module")
def script():
    return experiment_script.load("omniglot_embeddings")


def _folder(root, alphabets=("Balinese", "Korean", "Latin"), characters=2, drawings=2):
    for alphabet in alphabets:
        for character in range(1, characters + 1):
            folder = root / alphabet / f"character{character:02d}"
            folder.mkdir(parents=True)
            for drawing in range(drawings):
                Image.fromarray(np.full((8, 8), 40 * character, np.uint8)).save(folder / f"{drawing}.png")
    return str(root)


def test_the_validation_alphabet_is_left_out_of_training_and_alone_scored(script, tmp_path):
    folder = _folder(tmp_path / "small1")
    training = script.without_alphabet(folder, "Korean")
    assert sorted(os.listdir(training)) == ["Balinese", "Latin"]
    assert script.without_alphabet(folder, "Korean") == training  # made once, then reused
    validation = script.alphabet_images(folder, "Korean")
    assert validation.concepts == ("Korean/character01", "Korean/character02") and len(validation) == 4
    with pytest.raises(ValueError, match="--validation_alphabet Klingon: not an alphabet of .*Balinese, Korean, Latin"):
        script.without_alphabet(folder, "Klingon")


def test_a_test_run_that_did_not_finish_is_refused_by_name(script, tmp_path, capsys):
    with pytest.raises(SystemExit):
        script.main([str(tmp_path), "--out", str(tmp_path / "out")])
    assert f"{tmp_path}: no summary.json, not a finished run" in capsys.readouterr().err


@pytest.mark.parametrize("name", sorted(path.name.removesuffix(".json") for path in
                                         (experiment_script.EXPERIMENTS / "results").glob("omniglot_embeddings*.json")))
@pytest.mark.results
def test_the_committed_table_is_what_the_committed_json_gives(script, name):
    result, table = experiment_script.committed_result(name)
    assert script.markdown(result) == table
    candidates = result["validation"]["candidates"]
    best = max(candidates, key=lambda row: row["map@r"])
    assert result["validation"]["chosen"] == {"embedding_layer": best["embedding_layer"],
                                              "embedding_pooling": best["embedding_pooling"]}


@pytest.mark.parametrize("setting", [[], ["--rotations", "8", "--trainer_flags=--per_item_lrate 0.0004"]])
def test_a_training_setting_is_validated_by_the_default_command_with_its_flags(script, tmp_path, setting):
    _folder(tmp_path / "images_background_small1")
    label = "_rotations_8_trainer_flags_per_item_lrate_0.0004" if setting else ""
    workdir = tmp_path / f"run_validation_without_Korean{label}"
    workdir.mkdir()
    (workdir / "summary.json").write_text("{}")  # a finished run: reused, so nothing trains here
    args = script.argparse.Namespace(workdir=str(tmp_path), validation_alphabet="Korean", setting=setting)
    run = script.validation_run(args)
    assert run.workdir == str(workdir) and run.seconds == 0.0
    committed = json.loads((experiment_script.EXPERIMENTS / "results" / "omniglot_embeddings.json").read_text())
    default = committed["validation"]["command"].replace("/tmp/jaxembed-omniglot", str(tmp_path))
    expected = (default.replace("_rot4_", "_rot8_").replace("--per_item_lrate 0.0008", "--per_item_lrate 0.0004")
                if setting else default)
    assert run.command == expected
    if setting:  # trained on the setting's copies: 16 per character
        assert sorted(os.listdir(tmp_path / "images_background_small1_without_Korean_rot8_mirror" / "Latin")) == sorted(
            f"character0{n}{m}{f'_r{d}' if d else ''}" for n in (1, 2) for m in ("", "_m") for d in range(0, 360, 45))


def test_a_setting_that_does_not_change_the_training_is_refused_by_name(script, tmp_path, capsys, monkeypatch):
    _folder(tmp_path / "images_background_small1")  # so that a regression reaches training fast, and fails there

    def train(flags, workdir):
        raise AssertionError(f"a refused setting was trained: {flags}")

    monkeypatch.setattr(script.runner, "train", train)
    for setting, message in (("--templates resnext", "--templates do not change the training"),
                             ("--rotations 3", "not flags of experiments/omniglot.py")):
        with pytest.raises(SystemExit):
            script.main([f"--setting={setting}", "--workdir", str(tmp_path), "--out", str(tmp_path / "out")])
        assert message in capsys.readouterr().err
