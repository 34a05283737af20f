"""Flip averaging (`jaxembed.load(flip_average=True)`, the tools' `--flip_average`): each image's outputs
averaged with those of its mirror image, against the same average done by hand in numpy from the plain
embedder's outputs for the images and for their width-reversed copies."""

from __future__ import annotations

import numpy as np
import pytest

from jaxembed.cli import embed as embed_cli
from jaxembed.cli import export as export_cli
from jaxembed.cli import whitening as whitening_cli
import jaxembed
from jaxembed.inference import embed as embed_lib
from jaxembed.inference import export
from jaxembed.inference import whitening


def mirrored(images: np.ndarray) -> np.ndarray:
    """(B, H, W, C) images with their width reversed (a horizontal flip), by numpy."""
    return images[:, :, ::-1]


def random_images(count: int, seed: int = 0) -> np.ndarray:
    # Noise: no image is its own mirror, so a flip of the wrong axis (or none) changes every output.
    return np.random.default_rng(seed).integers(0, 256, (count, 32, 32, 3), dtype=np.uint8)


def by_hand(plain: jaxembed.Embedder, images: np.ndarray) -> dict[str, np.ndarray]:
    """The plain embedder's outputs for `images` and their mirror images, averaged in float64."""
    views = [plain.apply_fn(plain.variables, view) for view in (images, mirrored(images))]
    embedding = (np.float64(views[0]["embedding"]) + views[1]["embedding"]) / 2
    return {"embedding": embedding / np.linalg.norm(embedding, axis=1, keepdims=True),
            "logits": (np.float64(views[0]["logits"]) + views[1]["logits"]) / 2}


# The flip-averaged program computes the model on a batch of 12, the reference on two batches of 6 (float32,
# differently compiled), then averages in float32 where the hand does float64. Measured: embeddings 3.0e-8
# apart (their components' float32 ulp is at most 6e-8), logits equal. Bounds: 2 ulps of an embedding
# component, and 2 of the largest logit (2.4, ulp 2.4e-7). An unflipped, a height-flipped or an
# un-normalised average is off by more than 1e-2 (the second test shows how far apart the views are).
EMBEDDING_ATOL, LOGITS_ATOL = 1.2e-7, 5e-7


def test_it_averages_the_outputs_of_the_image_and_its_mirror_image(tiny_run):
    plain = jaxembed.load(tiny_run.workdir)
    flipped = jaxembed.load(tiny_run.workdir, flip_average=True)
    assert (plain.flip_average, flipped.flip_average) == (False, True)
    images = random_images(6)
    outputs = flipped.apply_fn(flipped.variables, images)
    expected = by_hand(plain, images)
    np.testing.assert_allclose(outputs["embedding"], expected["embedding"], rtol=0, atol=EMBEDDING_ATOL)
    np.testing.assert_allclose(outputs["logits"], expected["logits"], rtol=0, atol=LOGITS_ATOL)
    # The Embedder's own entry points read the same outputs: embeddings, and the task's probabilities
    # (a sigmoid's slope is at most 1/4, so its error is under the logits').
    np.testing.assert_allclose(flipped(images), expected["embedding"], rtol=0, atol=EMBEDDING_ATOL)
    sigmoid = 1 / (1 + np.exp(-expected["logits"]))  # the tiny run trains sigmoid units (logreg=1)
    np.testing.assert_allclose(flipped.predict(images), sigmoid, rtol=0, atol=LOGITS_ATOL)


def test_an_image_and_its_mirror_image_get_one_embedding(tiny_run):
    plain = jaxembed.load(tiny_run.workdir)
    flipped = jaxembed.load(tiny_run.workdir, flip_average=True)
    images = random_images(4, seed=1)
    # Not so without the average: the views the average joins are far apart.
    assert np.max(np.abs(plain(images) - plain(mirrored(images)))) > 1e-2
    upside_down = images[:, ::-1]
    assert np.max(np.abs(flipped(images) - flipped(upside_down))) > 1e-2  # only the width is reversed
    np.testing.assert_allclose(flipped(mirrored(images)), flipped(images), rtol=0, atol=EMBEDDING_ATOL)


def test_the_tools_embed_export_and_whiten_with_it(tiny_run, tmp_path, capsys):
    flipped = jaxembed.load(tiny_run.workdir, flip_average=True)
    npz = str(tmp_path / "flipped.npz")
    assert embed_cli.main(["--workdir", tiny_run.workdir, "--images", tiny_run.images, "--out", npz,
                           "--flip_average"]) == 0
    with np.load(npz) as saved:
        written, paths = saved["embeddings"], saved["paths"]
    from PIL import Image

    expected = flipped([np.asarray(Image.open(path).convert("RGB")) for path in paths])
    np.testing.assert_array_equal(written, expected)  # the same compiled batch shape (64): the same bits

    path = str(tmp_path / "exported")
    assert export_cli.main(["--workdir", tiny_run.workdir, "--out", path, "--flip_average"]) == 0
    exported = export.load_exported(path)
    assert exported.meta["flip_average"] is True
    images = random_images(3, seed=2)
    # Two compilations of the same float32 computation (the export test's bound).
    np.testing.assert_allclose(exported(images), flipped(images), rtol=0, atol=1e-6)

    # A whitening records whether it was fitted on flip-averaged embeddings, and load checks it.
    fitted = str(tmp_path / "whitening.npz")
    assert whitening_cli.main(["--workdir", tiny_run.workdir, "--out", fitted, "--dims", "4", "--flip_average"]) == 0
    assert whitening.load(fitted).fitted_on["flip_average"] is True
    assert jaxembed.load(tiny_run.workdir, whitening=fitted, flip_average=True)(images).shape == (3, 4)
    with pytest.raises(ValueError, match=r"fitted on other embeddings than .*flip_average True \(now False\).*"
                                         r"--flip_average"):
        jaxembed.load(tiny_run.workdir, whitening=fitted)


def test_a_whitening_from_before_the_option_counts_as_fitted_without_it(tmp_path):
    path = str(tmp_path / "old.npz")
    whitening.save(whitening.Whitening(np.zeros(3), np.eye(3), {"step": 4, "embedding_layer": None}), path)
    assert whitening.load(path).fitted_on == {"flip_average": False, "step": 4, "embedding_layer": None}


def test_false_is_the_run_s_own_embedding_and_is_not_recorded(tiny_run):
    from jaxembed.search import index

    config = jaxembed.load(tiny_run.workdir).config
    assert embed_lib.embedding_changes(config, {"flip_average": False}) == {}
    assert embed_lib.embedding_changes(config, {"flip_average": True}) == {"flip_average": True}
    with pytest.raises(TypeError, match=r"load\(\) got flip_average='false'; it takes True or False"):
        jaxembed.load(tiny_run.workdir, flip_average="false")
    _, run = index.load_run(tiny_run.workdir, flip_average=False)
    assert run.embedding == {}
