"""A classifier's embedding from an earlier block (`embedding_layer`, `embedding_pooling`; `models.taps`)."""

from __future__ import annotations

import json

import flax.linen as flax_nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from jaxembed.cli import embed as embed_cli
from jaxembed.cli import evaluate as evaluate_cli
from jaxembed.cli import export as export_cli
import tiny
import jaxembed
from jaxembed import models, tasks
from jaxembed.models import heads, inception_bn


def test_pooling_against_hand_values():
    # One channel at two positions holding 1 and 8: mean 4.5, max 8, generalised mean ((1 + 8^3) / 2)^(1/3).
    feature_map = jnp.array([1.0, 8.0]).reshape(1, 1, 2, 1)
    assert float(heads.pool(feature_map, "avg")[0, 0]) == 4.5  # exact in float32
    assert float(heads.pool(feature_map, "max")[0, 0]) == 8.0
    # float32 cube and cube root: a few ulps (1.2e-7 each) from the exact 6.3537...
    assert float(heads.pool(feature_map, "gem")[0, 0]) == pytest.approx(256.5 ** (1 / 3), rel=1e-6)
    with pytest.raises(ValueError, match="embedding_pooling='median'"):
        heads.pool(feature_map, "median")


def test_block_names_follow_the_architectures():
    assert models.block_names("inception_bn") == (
        "inception_3a", "inception_3b", "inception_3c", "inception_4a", "inception_4b", "inception_4c",
        "inception_4d", "inception_4e", "inception_5a", "inception_5b")
    resnet50 = models.block_names("resnet50")  # torchvision's layer1.0 ... layer4.2: 3 + 4 + 6 + 3 blocks
    assert (len(resnet50), resnet50[0], resnet50[-1]) == (16, "stage1_block0", "stage4_block2")
    assert len(models.block_names("resnext101_32x8d")) == 3 + 4 + 23 + 3
    if "blockless" not in models.registered_archs():
        models.register("blockless", lambda **options: flax_nn.Dense(4), 4)
    with pytest.raises(ValueError, match="'blockless' does not name its blocks"):
        models.block_names("blockless")


@pytest.mark.parametrize("pooling", ["avg", "max", "gem"])
def test_tapped_embedding_is_that_blocks_output_pooled_and_the_logits_are_unchanged(pooling):
    # float64, so the tapped model and the reference (the untapped model's intermediates, captured by
    # flax under the block's name, pooled by numpy) agree to rounding; tapping a neighbouring block
    # (inception_4c, the same width) or pooling another way is far outside the tolerance.
    with jax.enable_x64(True):
        config = tiny.config(arch="inception_bn", dtype="float64")
        plain = tasks.build_model(config, 5)
        tapped = tasks.build_model(config.replace(embedding_layer="inception_4d", embedding_pooling=pooling), 5)
        images = np.random.default_rng(0).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
        variables = plain.init(jax.random.key(0), images)
        outputs = tapped.apply(variables, images)  # the same variables: the tap adds none
        reference, state = plain.apply(variables, images, capture_intermediates=True, mutable=["intermediates"])
        block_map = np.asarray(state["intermediates"]["backbone"]["inception_4d"]["__call__"][0])
    assert block_map.shape == (2, 2, 2, 608)  # 32 px, ImageNet stem: 1/16 of the side in stage 4
    pooled = {"avg": block_map.mean(axis=(1, 2)), "max": block_map.max(axis=(1, 2)),
              "gem": np.mean(np.maximum(block_map, 1e-6) ** 3, axis=(1, 2)) ** (1 / 3)}[pooling]
    expected = pooled / np.linalg.norm(pooled, axis=1, keepdims=True)
    np.testing.assert_allclose(np.asarray(outputs["embedding"]), expected, rtol=1e-10, atol=1e-12)
    np.testing.assert_array_equal(np.asarray(outputs["logits"]), np.asarray(reference["logits"]))


def test_resnet_tap_returns_the_blocks_map():
    # stage3 ends at 1/16 of the side with 1024 channels (torchvision's layer3), whatever block of it.
    model = models.create("resnet50", tap="stage3_block5")
    x = jax.ShapeDtypeStruct((2, 64, 64, 3), jnp.float32)
    variables = jax.eval_shape(model.init, jax.random.key(0), x)
    features, block_map = jax.eval_shape(model.apply, variables, x)
    assert (features.shape, block_map.shape) == ((2, 2048), (2, 4, 4, 1024))


def test_bad_embedding_settings_are_named():
    images = np.zeros((1, 32, 32, 3), np.uint8)
    with pytest.raises(ValueError, match="embedding_layer='inception_9z' is not a block of inception_bn; its blocks: "
                                         "inception_3a"):
        tasks.build_model(tiny.config(arch="inception_bn", embedding_layer="inception_9z"), 3)
    module = inception_bn.InceptionBN(tap="inception_9z")  # built directly: the module checks when it runs
    with pytest.raises(ValueError, match="embedding_layer='inception_9z' is not a block of inception_bn"):
        jax.eval_shape(module.init, jax.random.key(0), images)
    model = tasks.build_model(tiny.config(embedding_pooling="gem"), 3)
    with pytest.raises(ValueError, match="embedding_pooling='gem' pools a block's map"):
        model.init(jax.random.key(0), images)
    with pytest.raises(ValueError, match="ArcFace template"):
        tasks.for_config(tiny.config("resnet_angular_margin", arch="resnet50", embedding_layer="stage3_block5"))


def test_a_run_trains_with_a_tapped_embedding_and_load_reads_it_from_another_block(tmp_path):
    run = tiny.train_digits_run(str(tmp_path), embedding_layer="conv", embedding_pooling="gem")
    assert 0 <= run.summary["eval/recall@1"] <= 1  # the trainer's held-out retrieval ran on the tapped embedding
    images = np.random.default_rng(0).integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    tapped = jaxembed.load(run.workdir)  # as trained: run.json holds the two settings
    assert (tapped.config.embedding_layer, tapped.config.embedding_pooling) == ("conv", "gem")
    last = jaxembed.load(run.workdir, embedding_layer=None, embedding_pooling="avg")
    tapped_outputs, last_outputs = tapped.apply_fn(tapped.variables, images), last.apply_fn(last.variables, images)
    assert tapped_outputs["embedding"].shape == (4, tiny.CHANNELS)  # the map's channels, pooled over positions
    assert last_outputs["embedding"].shape == (4, tiny.FEATURES)
    # Two compiled float32 programs (one also returns the map) may fuse the same sums differently: 1 ulp.
    np.testing.assert_allclose(tapped_outputs["logits"], last_outputs["logits"], rtol=1e-6)
    with pytest.raises(TypeError, match="load\\(\\) got embedding_size; it takes embedding_layer, embedding_pooling"):
        jaxembed.load(run.workdir, embedding_size=3)


def test_the_tools_read_a_run_from_another_block_and_name_a_bad_one(tiny_run, tmp_path, capsys):
    from jaxembed.inference import embed
    from jaxembed.eval import evaluate
    from jaxembed.inference import export

    out, tapped_flags = str(tmp_path / "digits.npz"), ["--embedding_layer", "conv", "--embedding_pooling", "gem"]
    assert embed_cli.main(["--workdir", tiny_run.workdir, "--images", tiny_run.images, "--out", out, *tapped_flags]) == 0
    with np.load(out) as saved:
        written, paths = saved["embeddings"], saved["paths"]
    tapped = jaxembed.load(tiny_run.workdir, embedding_layer="conv", embedding_pooling="gem")
    expected = tapped([np.asarray(Image.open(path).convert("RGB")) for path in paths])
    assert written.shape == (len(paths), tiny.CHANNELS)  # the run's own embedding has tiny.FEATURES
    np.testing.assert_array_equal(written, expected)  # the same compiled batch shape (64): the same bits

    # evaluate embeds with the same settings: its metrics equal those of the .npz embed wrote.
    from_npz, from_run = str(tmp_path / "from_npz.json"), str(tmp_path / "from_run.json")
    assert evaluate_cli.main(["--embeddings", out, "--out", from_npz]) == 0
    assert evaluate_cli.main(["--workdir", tiny_run.workdir, "--images", tiny_run.images, "--out", from_run,
                          *tapped_flags]) == 0
    with open(from_npz) as a, open(from_run) as b:
        npz_metrics, run_metrics = json.load(a), json.load(b)
    for name in ("recall@1", "recall@5", "map@r"):
        assert npz_metrics[name] == run_metrics[name], name
    with pytest.raises(SystemExit):
        evaluate_cli.main(["--embeddings", out, "--embedding_layer", "conv"])
    assert "--embedding_layer needs --workdir" in capsys.readouterr().err

    assert export_cli.main(["--workdir", tiny_run.workdir, "--out", str(tmp_path / "exported"), *tapped_flags]) == 0
    assert export.load_exported(str(tmp_path / "exported")).meta["embedding_size"] == tiny.CHANNELS

    capsys.readouterr()
    assert embed_cli.main(["--workdir", tiny_run.workdir, "--images", tiny_run.images, "--out", out,
                       "--embedding_layer", "conv9"]) == 1
    assert "jaxembed.embed: error: embedding_layer='conv9' is not a block of tiny; its blocks: conv" in capsys.readouterr().err
    with pytest.raises(ValueError, match="embedding_pooling.*median"):
        jaxembed.load(tiny_run.workdir, embedding_pooling="median")
