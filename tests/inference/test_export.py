"""The exported artefact: same embeddings as the Embedder, any batch size, loadable without model code."""

import dataclasses
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from jaxembed.cli import export as export_cli
from jaxembed.cli import whitening as whitening_cli
import jaxembed
import tiny
from jaxembed.inference import export


@pytest.fixture(scope="module")
def embedder(tiny_run):
    """The shared tiny inception_bn run (conftest.py) as an Embedder: `tiny.FEATURES`-d embeddings."""
    # Batches of 8 rather than 64: the reference embeddings of these few images come quicker on a CPU.
    return dataclasses.replace(jaxembed.load(tiny_run.workdir), batch_size=8)


@pytest.fixture(scope="module")
def artefact(tiny_run, tmp_path_factory):
    """Written by the command line, with a symbolic batch dimension."""
    path = str(tmp_path_factory.mktemp("export") / "inception_bn")
    assert export_cli.main(["--workdir", tiny_run.workdir, "--out", path]) == 0
    return path


def random_images(count, size=32, seed=0):
    return np.random.default_rng(seed).integers(0, 256, size=(count, size, size, 3), dtype=np.uint8)


def test_exported_equals_embedder_for_any_batch_size(embedder, artefact):
    embed = export.load_exported(artefact)
    assert embed.meta["batch_size"] is None and embed.meta["image_size"] == 32
    assert embed.meta["embedding_size"] == tiny.FEATURES and embed.meta["concepts"] == list(embedder.concepts)
    # The classifier is not needed for embeddings and is left out of the artefact.
    assert embed.meta["left_out"] == ["['params']['classifier']['bias']", "['params']['classifier']['kernel']"]
    for count in (1, 5):
        images = random_images(count, seed=count)
        got = embed(images)
        assert got.shape == (count, tiny.FEATURES) and got.dtype == np.float32
        # Two compilations of one float32 computation: unit vectors within a few ulps (1.2e-7 near 1; 1.9e-8
        # measured).
        np.testing.assert_allclose(got, embedder(images), rtol=0, atol=1e-6)


def test_fixed_batch_size_pads_and_splits(embedder, tmp_path):
    export.export_embedder(embedder, str(tmp_path), batch_size=4, platforms=("cpu",))
    embed = export.load_exported(str(tmp_path))
    assert embed.meta["batch_size"] == 4 and embed.meta["platforms"] == ["cpu"]
    images = random_images(6)  # one full batch and one padded
    np.testing.assert_allclose(embed(images), embedder(images), rtol=1e-5, atol=1e-5)
    assert embed(images[:0]).shape == (0, tiny.FEATURES)


def test_wrong_images_are_refused(artefact):
    embed = export.load_exported(artefact)
    with pytest.raises(ValueError, match=r"shape \(B, 32, 32, 3\), got uint8 \(2, 48, 48, 3\)"):
        embed(random_images(2, size=48))
    with pytest.raises(ValueError, match="float32"):
        embed(random_images(2).astype(np.float32))


def test_loads_in_a_fresh_process_without_model_code(embedder, artefact, tmp_path):
    images = random_images(3, seed=7)
    np.save(tmp_path / "images.npy", images)
    script = textwrap.dedent(f"""
        import json, sys
        import numpy as np
        from jaxembed.inference.export import load_exported
        embed = load_exported({artefact!r})
        np.save({str(tmp_path / "out.npy")!r}, embed(np.load({str(tmp_path / "images.npy")!r})))
        print(json.dumps(sorted(sys.modules)))
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                            cwd=str(tmp_path), env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
    assert result.returncode == 0, result.stderr
    modules = json.loads(result.stdout.strip().splitlines()[-1])
    assert not [m for m in modules if m.split(".")[0] in ("flax", "optax", "orbax", "tensorflow")]
    assert [m for m in modules if m.startswith("jaxembed")] == ["jaxembed", "jaxembed.inference", "jaxembed.inference.export"]
    np.testing.assert_allclose(np.load(tmp_path / "out.npy"), embedder(images), rtol=1e-5, atol=1e-5)


def test_an_export_cut_short_over_an_old_artefact_refuses_to_load(embedder, tmp_path, monkeypatch):
    """meta.json goes first and comes back last: a crash while overwriting an artefact (here while
    writing its variables) leaves one that fails to load naming meta.json, never the new function
    under the old artefact's metadata and variables."""
    path = str(tmp_path / "artefact")
    export.export_embedder(embedder, path, batch_size=4, platforms=("cpu",))
    export.load_exported(path)  # whole

    def crash(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(export.np, "savez", crash)
    with pytest.raises(KeyboardInterrupt):
        export.export_embedder(embedder, path, batch_size=2, platforms=("cpu",))
    assert sorted(os.listdir(path)) == ["embed.stablehlo", "variables.npz"]  # no temporary file left behind
    with pytest.raises(FileNotFoundError, match=r"meta\.json not found: .* is not a whole export_embedder"):
        export.load_exported(path)


def test_an_export_with_a_whitening_gives_the_whitened_embeddings(tiny_run, tmp_path):
    from jaxembed.inference import whitening

    fitted = str(tmp_path / "whitening.npz")
    assert whitening_cli.main(["--workdir", tiny_run.workdir, "--out", fitted, "--dims", "4"]) == 0
    path = str(tmp_path / "whitened")
    assert export_cli.main(["--workdir", tiny_run.workdir, "--out", path, "--whitening", fitted]) == 0
    embed = export.load_exported(path)
    assert embed.meta["embedding_size"] == 4
    images = random_images(3, seed=7)
    # As the test above: two compilations of the same float32 computation (equal to the bit, measured).
    np.testing.assert_allclose(embed(images), jaxembed.load(tiny_run.workdir, whitening=fitted)(images),
                               rtol=0, atol=1e-6)
