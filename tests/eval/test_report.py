"""`jaxembed.report`: the pure helpers on small cases, and a PNG + HTML written for a real run."""

import json
import os
import pathlib
import shutil

import numpy as np
import pytest
from PIL import Image

from jaxembed.cli import report as report_cli
from jaxembed import metrics
from jaxembed.eval import report

pytest.importorskip("matplotlib")


@pytest.fixture
def run(tiny_run):
    """conftest.py's shared tiny inception_bn run: arch "tiny", template inception_bn, 18 held-out images."""
    return tiny_run


def test_pca_2d_finds_the_main_directions():
    rng = np.random.default_rng(0)
    # Spread 10 along one direction, 1 along another, nothing in the third: 100 / 101 of the variance.
    basis = np.linalg.qr(rng.normal(size=(3, 3)))[0]
    points = rng.normal(size=(200, 2)) * [10.0, 1.0] @ basis[:2]
    projected, explained = report.pca_2d(points + 5.0)
    assert projected.shape == (200, 2) and projected.dtype == np.float32
    assert explained[0] == pytest.approx(0.99, abs=0.01) and explained.sum() == pytest.approx(1.0)
    # The points lie in a plane, so projecting on it keeps every distance.
    def distances(x):
        return np.linalg.norm(x[:, None] - x[None], axis=-1)

    np.testing.assert_allclose(distances(projected), distances(points), rtol=1e-4, atol=1e-4)


def test_queries_cover_concepts_first_and_neighbours_exclude_the_query():
    labels = np.array(["a", "a", "a", "b", "b", "c"])  # c has no second image: never a query
    queries = report.pick_queries(labels, 3, seed=0)
    assert sorted(labels[queries][:2]) == ["a", "b"] and "c" not in labels[queries]
    embeddings = np.eye(3)[[0, 0, 1]] + [[0, 0, 0], [0.1, 0, 0], [0, 0, 0]]
    embeddings /= np.linalg.norm(embeddings, axis=1, keepdims=True)
    # The report's neighbours come from jaxembed.metrics (the one nearest-neighbour search).
    np.testing.assert_array_equal(metrics.nearest_others(embeddings, 2, np.array([0, 2])), [[1, 2], [0, 1]])


def test_held_out_split_is_recreated(run):
    images = report.heldout_images(run.workdir)
    recorded = json.loads(pathlib.Path(run.workdir, "run.json").read_text())
    split = json.loads(pathlib.Path(run.workdir, "split.json").read_text())
    assert len(images) == recorded["num_eval_images"] == 18
    # The very images the run never trained on, named relative to the data folder.
    assert [os.path.relpath(name, run.images) for name in images.item_names] == split["heldout_names"]


def test_held_out_images_are_found_after_the_data_folder_moves(run, tmp_path):
    workdir = shutil.copytree(run.workdir, tmp_path / "run", ignore=shutil.ignore_patterns(".lock"))
    moved = shutil.copytree(run.images, tmp_path / "moved" / "digits")
    record = json.loads((workdir / "run.json").read_text())
    (workdir / "run.json").write_text(json.dumps({**record, "data": str(moved)}))
    images = report.heldout_images(str(workdir))
    expected = report.heldout_images(run.workdir)
    assert [os.path.relpath(name, moved) for name in images.item_names] == \
        [os.path.relpath(name, run.images) for name in expected.item_names]
    assert images.items[0] != expected.items[0] and os.path.isfile(images.items[0])  # the moved files
    # A run from before relative names (split.json with absolute paths) still finds its data in place.
    split = json.loads((workdir / "split.json").read_text())
    (workdir / "run.json").write_text(json.dumps(record))
    (workdir / "split.json").write_text(json.dumps(
        {**split, "heldout_names": [os.path.join(run.images, name) for name in split["heldout_names"]]}))
    assert list(report.heldout_images(str(workdir)).item_names) == list(expected.item_names)


def test_report_refuses_data_that_no_longer_holds_the_held_out_images(run, tmp_path, capsys):
    # A copy of the run whose run.json names a copy of its data, one held-out image fewer.
    workdir = shutil.copytree(run.workdir, tmp_path / "run", ignore=shutil.ignore_patterns(".lock"))
    data = shutil.copytree(run.images, tmp_path / "digits")
    held_out = json.loads((workdir / "split.json").read_text())["heldout_names"][0]
    (data / held_out).unlink()
    record = json.loads((workdir / "run.json").read_text())
    (workdir / "run.json").write_text(json.dumps({**record, "data": str(data)}))
    with pytest.raises(ValueError, match="split.json does not match the data given"):
        report.heldout_images(str(workdir))
    assert report_cli.main(["--workdir", str(workdir)]) == 1
    assert "jaxembed.report: error: " in capsys.readouterr().err and not (workdir / "report").exists()


def check_outputs(paths):
    with Image.open(paths.png) as png:
        png.load()
        assert png.size == (1700, 1050)
        # Not a blank page: many distinct colours (curves, image tiles, green/red frames).
        assert len(png.convert("RGB").getcolors(1 << 20)) > 100
    page = pathlib.Path(paths.html).read_text(encoding="utf-8")
    assert page.startswith("<!doctype html>") and "data:image/png;base64," in page
    assert "Recall@1" in page and "inception_bn" in page
    assert os.path.getsize(paths.html) > os.path.getsize(paths.png)  # the PNG is inside it


def test_report_of_the_held_out_split_from_the_command_line(run, capsys):
    assert report_cli.main(["--workdir", run.workdir]) == 0
    paths = report.ReportFiles(*(os.path.join(run.workdir, "report", f"report.{e}") for e in ("png", "html")))
    assert capsys.readouterr().out.split() == ["wrote", paths.png, "wrote", paths.html]
    check_outputs(paths)
    page = pathlib.Path(paths.html).read_text(encoding="utf-8")
    assert "the run&#x27;s held-out split (18 images)" in page


def test_report_of_given_images(run, tmp_path):
    paths = report.write_report(run.workdir, images_source=run.images, out_dir=str(tmp_path), max_images=40)
    assert paths == report.ReportFiles(str(tmp_path / "report.png"), str(tmp_path / "report.html"))
    check_outputs(paths)
    assert "a random 40" in pathlib.Path(paths.html).read_text(encoding="utf-8")
