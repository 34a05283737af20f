"""experiments/omniglot_whitening.py: its own candidate projections against their defining properties
(float64, so the bounds are rounding, ~1e-13), and its committed table (no training here). The learned
whitening it scores is jaxembed.whitening's (tests/inference/test_whitening.py)."""


import numpy as np
import pytest

import _experiment_script as experiment_script
from jaxembed.inference import whitening
from inference.test_whitening import gaussian_concepts


@pytest.fixture(scope="module")
def script():
    return experiment_script.load("omniglot_whitening")


def test_pca_whitening_gives_identity_covariance(script):
    features, _ = gaussian_concepts(np.random.default_rng(0))
    mean, projection = script.pca_whitening(features, shrinkage=0.0)
    projected = (features - mean) @ projection
    np.testing.assert_allclose(projected.T @ projected / len(projected), np.eye(5), atol=1e-12)


def test_a_run_that_did_not_finish_is_refused_by_name(script, tmp_path, capsys):
    with pytest.raises(SystemExit):
        script.main([str(tmp_path), "--out", str(tmp_path / "out")])
    assert f"{tmp_path}: no summary.json, not a finished run" in capsys.readouterr().err


@pytest.mark.results
def test_the_committed_table_is_what_the_committed_json_gives(script):
    result, table = experiment_script.committed_result("omniglot_whitening")
    assert script.markdown(result) == table
    unprojected = [row for row in result["rows"] if row["projection"] == "none"]
    assert len(unprojected) == len({row["run"] for row in result["rows"]}) >= 1
    # The choice is the table's best, and what `python -m jaxembed.whitening` and `whitening.fit` default to.
    assert result["chosen"] == script.chosen(result["rows"]) == {"shrinkage": whitening.SHRINKAGE, "dims": whitening.DIMS}


def test_principal_axes_are_the_leading_eigenvectors_unscaled(script):
    features, _ = gaussian_concepts(np.random.default_rng(4))
    mean, axes = script.principal_axes(features, dims=2)
    np.testing.assert_allclose(axes.T @ axes, np.eye(2), atol=1e-12)  # a rotation: no whitening
    _, _, right = np.linalg.svd(features - features.mean(0))  # rows: principal axes, largest first
    np.testing.assert_allclose(np.abs(axes.T @ right[:2].T), np.eye(2), atol=1e-12)


def test_the_choice_is_the_setting_whose_smallest_gain_is_largest(script):
    """A setting that helps one run a lot and hurts another loses to one that helps both a little."""
    def row(run, projection, map_at_r, settings):
        return {"run": run, "projection": projection, "map@r": map_at_r, "whitening": settings}

    rows = [row("a", "none", 0.70, {}), row("b", "none", 0.60, {}),
            row("a", "bold", 0.76, {"shrinkage": 0.1, "dims": 32}), row("b", "bold", 0.59, {"shrinkage": 0.1, "dims": 32}),
            row("a", "steady", 0.72, {"shrinkage": 1.0, "dims": 64}), row("b", "steady", 0.61, {"shrinkage": 1.0, "dims": 64})]
    assert script.chosen(rows) == {"shrinkage": 1.0, "dims": 64}  # the best mean (bold: 0.675 > 0.665) is not chosen
