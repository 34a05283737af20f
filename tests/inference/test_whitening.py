"""jaxembed.whitening: the learned whitening against its defining properties and Fisher's discriminant
(float64, so the bounds are rounding, ~1e-12), and `python -m jaxembed.whitening` + `jaxembed.load(whitening=)`
on the shared tiny run against the same projection done by hand in numpy."""

import os
import shutil

import numpy as np
import pytest

from jaxembed.cli import embed as embed_cli
from jaxembed.cli import whitening as whitening_cli
import jaxembed
from jaxembed.inference import embed as embed_lib
from jaxembed.inference import whitening


def gaussian_concepts(rng, sizes=(40, 55, 70), dims=5):
    """Gaussian concepts with one shared, correlated within-concept covariance and spread-out centres."""
    mixing = rng.normal(size=(dims, dims))
    centres = rng.normal(scale=3.0, size=(len(sizes), dims))
    features = np.concatenate([centre + rng.normal(size=(size, dims)) @ mixing for centre, size in zip(centres, sizes)])
    concepts = np.repeat([f"c{i}" for i in range(len(sizes))], sizes)
    return features, concepts


def test_it_whitens_within_concepts_and_orders_axes_by_variance():
    features, concepts = gaussian_concepts(np.random.default_rng(1))
    fitted = whitening.fit(features, concepts, shrinkage=0.0, dims=None)
    projected = (features - fitted.mean) @ fitted.projection
    centres = {name: projected[concepts == name].mean(0) for name in np.unique(concepts)}
    within = projected - np.stack([centres[name] for name in concepts])
    np.testing.assert_allclose(within.T @ within / len(within), np.eye(5), atol=1e-12)
    total = projected.T @ projected / len(projected)
    np.testing.assert_allclose(total, np.diag(np.diag(total)), atol=1e-12)  # uncorrelated axes
    # Total = within (now I) + between, whose rank is concepts - 1 = 2: those two axes first, then variance 1.
    variances = np.diag(total)
    assert variances[0] > variances[1] > 1 + 1e-3
    np.testing.assert_allclose(variances[2:], 1.0, atol=1e-12)
    kept = whitening.fit(features, concepts, shrinkage=0.0, dims=2)
    np.testing.assert_allclose(kept.projection, fitted.projection[:, :2], atol=1e-12)
    assert kept.fitted_on == {"dims": 2, "shrinkage": 0.0, "concepts": 3, "images": 165}


def test_with_two_concepts_it_leads_with_fishers_discriminant():
    """For two concepts the leading axis is Fisher's w = S_w^-1 (mu_1 - mu_0) (up to scale and sign)."""
    features, concepts = gaussian_concepts(np.random.default_rng(2), sizes=(60, 80))
    projection = whitening.fit(features, concepts, shrinkage=0.0, dims=1).projection
    first, second = features[concepts == "c0"], features[concepts == "c1"]
    scatter = (first - first.mean(0)).T @ (first - first.mean(0)) + (second - second.mean(0)).T @ (second - second.mean(0))
    fisher = np.linalg.solve(scatter, second.mean(0) - first.mean(0))
    cosine = projection[:, 0] @ fisher / np.linalg.norm(projection[:, 0]) / np.linalg.norm(fisher)
    assert abs(cosine) == pytest.approx(1.0, abs=1e-12)


def test_shrinkage_adds_its_share_of_the_mean_eigenvalue():
    features, _ = gaussian_concepts(np.random.default_rng(3))
    centred = features - features.mean(0)
    plain = whitening.shrunk_covariance(centred, 0.0)
    np.testing.assert_allclose(plain, np.cov(features, rowvar=False, bias=True), atol=1e-12)
    shrunk = whitening.shrunk_covariance(centred, 0.5)
    np.testing.assert_allclose(shrunk - plain, 0.5 * np.linalg.eigvalsh(plain).mean() * np.eye(5), atol=1e-12)


def test_it_refuses_what_it_cannot_fit():
    features, concepts = gaussian_concepts(np.random.default_rng(4))
    with pytest.raises(ValueError, match="two or more concepts with two or more images each"):
        whitening.fit(features[:40], concepts[:40])
    with pytest.raises(ValueError, match="--dims 6: must be between 1 and the embedding's dimension 5"):
        whitening.fit(features, concepts, dims=6)


def test_the_command_fits_the_run_and_load_projects_by_it(tiny_run, tmp_path, capsys):
    path = str(tmp_path / "whitening.npz")
    assert whitening_cli.main(["--workdir", tiny_run.workdir, "--images", tiny_run.images, "--out", path, "--dims", "4"]) == 0
    assert f"wrote {path}: 180 images of 10 concepts" in capsys.readouterr().out
    saved = whitening.load(path)
    assert saved.fitted_on["step"] == tiny_run.summary["step"] and saved.projection.shape[1] == 4

    images = np.random.default_rng(0).integers(0, 256, (6, 20, 20, 3), dtype=np.uint8)
    plain = jaxembed.load(tiny_run.workdir)(images)
    whitened = jaxembed.load(tiny_run.workdir, whitening=path)(images)
    by_hand = (plain.astype(np.float64) - saved.mean) @ saved.projection
    # The loaded whitening projects in float32 inside jit, the hand in float64: unit vectors whose float32 ulp
    # near 1 is 1.2e-7; 1.5e-7 was measured, the bound is 4 ulps.
    np.testing.assert_allclose(whitened, by_hand / np.linalg.norm(by_hand, axis=1, keepdims=True), rtol=0, atol=5e-7)

    npz = str(tmp_path / "embeddings.npz")
    assert embed_cli.main(["--workdir", tiny_run.workdir, "--images", tiny_run.images, "--out", npz,
                           "--whitening", path]) == 0
    with np.load(npz) as written:
        assert written["embeddings"].shape == (180, 4)


def test_load_refuses_a_whitening_fitted_on_other_embeddings(tiny_run, tmp_path, capsys):
    path = str(tmp_path / "whitening.npz")
    assert whitening_cli.main(["--workdir", tiny_run.workdir, "--out", path]) == 0
    # By default it fits on what the run trained on: its 180 images less the 18 held out.
    assert f"wrote {path}: 162 images of 10 concepts" in capsys.readouterr().out
    with pytest.raises(ValueError, match=rf"{path} was fitted on other embeddings than .*embedding_layer None "
                                         rf"\(now 'conv'\); embedding_pooling 'avg' \(now 'gem'\).*"
                                         rf"python -m jaxembed.whitening --workdir"):
        jaxembed.load(tiny_run.workdir, whitening=path, embedding_layer="conv", embedding_pooling="gem")
    with pytest.raises(FileNotFoundError, match="missing.npz: no such whitening file"):
        jaxembed.load(tiny_run.workdir, whitening=str(tmp_path / "missing.npz"))
    np.savez(tmp_path / "other.npz", embeddings=np.zeros((2, 3)))
    with pytest.raises(ValueError, match="other.npz: not a whitening written by python -m jaxembed.whitening"):
        jaxembed.load(tiny_run.workdir, whitening=str(tmp_path / "other.npz"))


def test_the_command_refuses_bad_dims_and_too_few_concepts_before_embedding(tiny_run, tmp_path, capsys, monkeypatch):
    path = tmp_path / "whitening.npz"
    dim = jaxembed.load(tiny_run.workdir).embedding_dim

    def forward_pass(*args, **kwargs):
        raise AssertionError("the images were embedded before the settings were checked")

    monkeypatch.setattr(embed_lib, "embed_dataset", forward_pass)
    assert whitening_cli.main(["--workdir", tiny_run.workdir, "--out", str(path), "--dims", str(dim + 1)]) == 1
    assert f"jaxembed.whitening: error: --dims {dim + 1}: must be between 1 and the embedding's dimension {dim}" \
        in capsys.readouterr().err
    one_concept = tmp_path / "one_concept"
    shutil.copytree(os.path.join(tiny_run.images, sorted(os.listdir(tiny_run.images))[0]), one_concept / "only")
    assert whitening_cli.main(["--workdir", tiny_run.workdir, "--out", str(path), "--images", str(one_concept)]) == 1
    assert "two or more concepts with two or more images each (got 1 concepts, 1 with" in capsys.readouterr().err
    assert not path.exists()  # nothing half-written
