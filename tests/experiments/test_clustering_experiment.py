"""experiments/clustering.py: its committed tables, and its clustering of images whose concepts raw
pixels separate by construction."""

import json
import os

import numpy as np
import pytest
from PIL import Image

import _experiment_script as experiment_script


@pytest.fixture(scope="module")
def script():
    return experiment_script.load("clustering")


@pytest.mark.parametrize("name", ["clustering_fashion_mnist", "clustering_omniglot", "clustering_digits"])
@pytest.mark.results
def test_the_committed_table_is_what_the_committed_json_gives(script, name):
    result, table = experiment_script.committed_result(name)
    assert script.markdown(result["rows"], result["command"]) == table
    assert result["command"].startswith("python experiments/clustering.py ")
    for row in result["rows"]:
        assert row["model"]["nmi"]["mean"] == pytest.approx(np.mean(row["model"]["nmi"]["seeds"]))


def write_squares(folder, corners: dict, per_concept: int = 4) -> None:
    """32x32 grey noise with a bright 16x16 square in each concept's own corner."""
    rng = np.random.default_rng(0)
    for concept, (y, x) in corners.items():
        os.makedirs(os.path.join(folder, concept))
        for i in range(per_concept):
            pixels = rng.integers(0, 30, (32, 32), dtype=np.uint8)
            pixels[y:y + 16, x:x + 16] = 220
            Image.fromarray(pixels).save(os.path.join(folder, concept, f"{i}.png"))


def test_raw_pixels_of_concepts_apart_by_construction_cluster_into_them(script, tiny_run, tmp_path, capsys):
    folder = str(tmp_path / "squares")
    write_squares(folder, {"a": (0, 0), "b": (0, 16), "c": (16, 0)})
    out = str(tmp_path / "clusters")
    assert script.main([tiny_run.workdir, "--images", folder, "--seeds", "2", "--out", out]) == 0
    [row] = json.loads((tmp_path / "clusters.json").read_text())["rows"]
    assert row["num_images"] == 12 and row["model"]["k"] == row["pixels"]["k"] == 3 and not row["whitening"]
    # Every seed's pixel clusters are the three concepts: the names stayed with their images.
    assert all(row["pixels"][score]["seeds"] == [1.0, 1.0] for score in script.SCORES)
    assert all(len(row["model"][score]["seeds"]) == 2 for score in script.SCORES)
    assert "python experiments/clustering.py" in (tmp_path / "clusters.md").read_text()
    with pytest.raises(SystemExit):
        script.main([tiny_run.workdir, "--images", folder, "--seeds", "0"])
    assert "--seeds 0: needs at least 1" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        script.main([tiny_run.workdir, "--images", str(tmp_path / "missing")])
    assert f"--images {tmp_path / 'missing'}: data source" in capsys.readouterr().err


def test_holdout_clusters_each_run_on_its_own_held_out_images(script, tiny_run, tmp_path, capsys):
    assert script.main([tiny_run.workdir, "--images", "holdout", "--seeds", "1", "--whitening",
                        "--out", str(tmp_path / "h")]) == 0
    [row] = json.loads((tmp_path / "h.json").read_text())["rows"]  # the tiny run has no whitening.npz
    assert row["images"] == "holdout" and row["num_images"] == tiny_run.summary["eval/num_images"]
    assert f"{tiny_run.workdir}: no whitening.npz, so no whitened row" in capsys.readouterr().err
