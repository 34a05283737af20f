"""The trainer end to end on tiny settings: every template, resume, 8 devices vs 1, the embed API."""

import dataclasses
import json
import os
import shutil
import signal

import jax
import numpy as np
import pytest

import _same_step as same_step
import jaxembed
from jaxembed import data as data_lib
from jaxembed import parallel, templates, train

TINY = dict(image_size=32, batch_size=8, init_epochs=1, step_epochs=1, num_epochs=2, num_items_per_epoch=16,
            per_item_lrate=0.002)
# The smallest backbone each template allows, to keep compile times short on CPU.
TINY_ARCH = {"resnet_angular_margin": "resnet50", "inception_bn": "inception_bn", "resnext": "resnext50_32x4d"}


@pytest.fixture(scope="module")
def digits():
    """Every 10th image of the embedded default (180 real 8x8 digits, 10 concepts)."""
    full = data_lib.load_source(None)
    return full.subset(range(0, len(full), 10))


def tiny_config(name, **overrides):
    extra = {"angular_scale": 16} if name == "resnet_angular_margin" else {}
    return templates.get(name).config(**{"arch": TINY_ARCH[name], **TINY, **extra, **overrides})


OPTIONS = train.TrainOptions(progress=False, log_every=1, checkpoint_every=2, eval_batch_size=64)


def leaves(state):
    return [np.asarray(x) for x in jax.tree.leaves((state["params"], state["batch_stats"]))]


@pytest.fixture(scope="module")
def inception_run(digits, tmp_path_factory):
    """One finished tiny inception_bn run (4 steps, checkpoints at 2 and 4), shared by several tests."""
    workdir = str(tmp_path_factory.mktemp("inception_run"))
    summary = train.train_and_evaluate(tiny_config("inception_bn"), workdir, options=OPTIONS, data=digits)
    return workdir, summary


def check_run(workdir, summary, name, metric):
    assert summary["finished"] and summary["step"] == 4 == summary["total_steps"]
    assert np.isfinite(summary["train/loss"])
    assert 0 <= summary["eval/recall@1"] <= summary["eval/recall@5"] <= 1
    assert 0 <= summary[metric] <= 1
    records = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    steps = [r for r in records if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3]  # the last step is read after the loop, not logged
    assert steps[0]["learning_rate"] == pytest.approx(8 * 0.002)
    assert steps[-1]["learning_rate"] == pytest.approx(8 * 0.0002)  # decayed after init_epochs=1 (2 steps)
    assert any(metric in r for r in records)
    assert json.load(open(os.path.join(workdir, "summary.json")))["step"] == 4
    assert json.load(open(os.path.join(workdir, "label_map.json")))["concepts"]
    run = json.load(open(os.path.join(workdir, "run.json")))
    assert run["config"]["template"] == name and run["config"]["image_size"] == 32


def test_inception_bn_sigmoid_end_to_end(inception_run):
    assert jax.device_count() == 8  # the 8 fake devices of conftest.py: batches are sharded
    check_run(*inception_run, "inception_bn", "eval/mAP")


@pytest.mark.parametrize("name,overrides,metric", [
    ("resnet_angular_margin", {}, "eval/map@r"),
    ("resnext", {"logreg": 0}, "eval/top1"),
])
def test_other_templates_end_to_end(name, overrides, metric, digits, tmp_path):
    summary = train.train_and_evaluate(tiny_config(name, **overrides), str(tmp_path), options=OPTIONS, data=digits)
    check_run(str(tmp_path), summary, name, metric)


def _restore(workdir, step=None):
    import orbax.checkpoint as ocp

    with ocp.CheckpointManager(os.path.join(workdir, "checkpoints")) as manager:
        return manager.restore(step or manager.latest_step(), args=ocp.args.StandardRestore())


def test_sigterm_saves_and_the_resumed_run_equals_the_uninterrupted_one(inception_run, digits, tmp_path, monkeypatch):
    straight_dir, straight = inception_run
    original = train._batches_from

    def batches_then_sigterm(run, step):
        for count, batch in enumerate(original(run, step)):
            if count == 1:  # a preemption notice while the second step is under way
                os.kill(os.getpid(), signal.SIGTERM)
            yield batch

    monkeypatch.setattr(train, "_batches_from", batches_then_sigterm)
    first = train.train_and_evaluate(tiny_config("inception_bn"), str(tmp_path), options=OPTIONS, data=digits)
    assert first["stopped_by"] == "SIGTERM" and not first["finished"] and first["step"] == 2
    assert os.path.isdir(tmp_path / "checkpoints" / "2")
    monkeypatch.setattr(train, "_batches_from", original)
    second = train.train_and_evaluate(tiny_config("inception_bn"), str(tmp_path), options=OPTIONS, data=digits)
    assert second["finished"] and second["step"] == 4
    for x, y in zip(leaves(_restore(straight_dir)), leaves(_restore(str(tmp_path))), strict=True):
        np.testing.assert_array_equal(x, y)  # bitwise on CPU
    assert straight["train/loss"] == second["train/loss"]
    assert straight["eval/recall@1"] == second["eval/recall@1"]


def test_corrupted_newest_checkpoint_falls_back_to_the_previous(inception_run, digits, tmp_path, caplog):
    straight_dir, _ = inception_run
    shutil.copytree(os.path.join(straight_dir, "checkpoints"), tmp_path / "checkpoints")
    shutil.copy(os.path.join(straight_dir, "run.json"), tmp_path / "run.json")
    for root, _, files in os.walk(tmp_path / "checkpoints" / "4"):
        for name in files:
            if "ocdbt" in root or name.endswith("ocdbt"):
                with open(os.path.join(root, name), "r+b") as f:
                    f.write(b"garbage" * 8)
    with caplog.at_level("WARNING", logger="jaxembed.train"):
        summary = train.train_and_evaluate(tiny_config("inception_bn"), str(tmp_path), options=OPTIONS, data=digits)
    assert "checkpoint at step 4 is unreadable" in caplog.text
    assert summary["finished"] and summary["step"] == 4  # steps 3 and 4 trained again from step 2
    assert os.listdir(tmp_path / "unreadable_checkpoints")
    for x, y in zip(leaves(_restore(straight_dir)), leaves(_restore(str(tmp_path))), strict=True):
        np.testing.assert_array_equal(x, y)


def test_workdir_of_another_run_is_refused(inception_run, digits):
    with pytest.raises(ValueError, match="image_size: 32 -> 48"):
        train.train_and_evaluate(tiny_config("inception_bn", image_size=48), inception_run[0], options=OPTIONS,
                                 data=digits)


def test_nan_stops_with_the_step_and_keeps_the_last_good_checkpoint(inception_run, digits, tmp_path):
    # Start from the shared run's step-2 checkpoint with an absurd learning rate.
    shutil.copytree(os.path.join(inception_run[0], "checkpoints", "2"), tmp_path / "checkpoints" / "2")
    good = leaves(_restore(str(tmp_path)))
    bad_config = tiny_config("inception_bn", per_item_lrate=1e30)
    with pytest.raises(train.TrainingStopped, match=r"non-finite values at step [23] .*checkpoint at step 2"):
        train.train_and_evaluate(bad_config, str(tmp_path), options=OPTIONS, data=digits)
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["2"]
    for x, y in zip(good, leaves(_restore(str(tmp_path))), strict=True):
        np.testing.assert_array_equal(x, y)


def test_eight_devices_give_the_same_step_as_one(digits):
    config = tiny_config("inception_bn")
    run = train.prepare_run(config, OPTIONS, digits)
    batch = next(data_lib.train_batches(run.train_data, image_size=32, batch_size=8, seed=0))
    # One image of the 8 replaced by another: what a device reading the wrong rows would train on.
    wrong_batch = {name: rows[[0, 1, 2, 3, 4, 5, 6, 0]] for name, rows in batch.items()}
    steps = {}
    for devices, fed_batches in ((jax.devices()[:1], {"one device": batch, "one device, wrong batch": wrong_batch}),
                                 (jax.devices()[:8], {"eight devices": batch})):
        mesh_run = dataclasses.replace(run, mesh=parallel.make_mesh(devices))
        init, step, _ = train.compile_steps(mesh_run)
        for name, fed in fed_batches.items():
            state = init(jax.random.PRNGKey(0))
            start = same_step.state_leaves(state)
            state, metrics = step(state, parallel.global_batch(fed, mesh_run.mesh))
            steps[name] = (float(metrics["loss"]), start, same_step.state_leaves(state))
    (loss1, start, one), (loss8, _, eight) = steps["one device"], steps["eight devices"]
    assert loss1 == pytest.approx(loss8, rel=1e-5)  # the same forward pass, summed in another order
    same_step.assert_same_step(eight, one, start, " on 8 devices")  # see tests/_same_step.py
    # The measure tells rounding from a real mistake.
    wrong = same_step.difference(steps["one device, wrong batch"][2], one, start, "params")
    assert wrong > 3 * same_step.STEP_TOLERANCE


def test_batch_size_must_divide_over_devices(digits):
    with pytest.raises(ValueError, match="batch_size=6 must be divisible by the number of devices \\(8\\)"):
        train.prepare_run(tiny_config("inception_bn", batch_size=6), OPTIONS, digits)


def test_embedder_on_a_trained_run(inception_run):
    embedder = jaxembed.load(inception_run[0])
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, size=(40 + 7 * i, 50, 3), dtype=np.uint8) for i in range(3)]
    batch = embedder(images)
    assert batch.shape == (3, 1024) and batch.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(batch, axis=1), 1.0, rtol=1e-5)
    alone = embedder(images[1])
    np.testing.assert_allclose(alone[0], batch[1], rtol=1e-5, atol=1e-6)
    direct = jax.jit(embedder.embed_fn)(embedder.variables, embedder.preprocess(images))
    np.testing.assert_allclose(np.asarray(direct), batch, rtol=1e-5, atol=1e-6)
    probabilities = embedder.predict(images)
    assert probabilities.shape == (3, 10) and np.all((probabilities >= 0) & (probabilities <= 1))
    assert embedder.concepts == tuple(str(d) for d in range(10))


def test_command_line_errors_name_the_flag(capsys):
    assert train.main(["--template", "inception_bn", "--image_size", "40", "--no_progress"]) == 2
    assert "image_size=40" in capsys.readouterr().err


def test_init_from_pretrained_backbone(digits, tmp_path):
    from safetensors.numpy import save_file

    from jaxembed.models import pretrained

    rng = np.random.default_rng(0)
    shapes = pretrained.state_dict_shapes("inception_bn")
    weights = {name: rng.normal(0, 0.05, size=shape).astype(np.float32) for name, shape in shapes.items()}
    for name in weights:
        if name.endswith("running_var"):
            weights[name] = np.abs(weights[name]) + 0.5
    path = str(tmp_path / "weights.safetensors")
    save_file(weights, path)
    expected = pretrained.load_pretrained("inception_bn", path)["params"]
    config = tiny_config("inception_bn", per_item_lrate=0.0)  # a zero learning rate keeps the loaded weights
    options = dataclasses.replace(OPTIONS, init_from=path, max_steps=1)
    train.train_and_evaluate(config, str(tmp_path / "run"), options=options, data=digits)
    params = _restore(str(tmp_path / "run"))["params"]
    for x, y in zip(jax.tree.leaves(expected), jax.tree.leaves(params["backbone"]), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    assert "classifier" in params  # the head is new, not from the file


@pytest.mark.parametrize("name,overrides", [("inception_bn", {"logreg": 0}), ("resnet_angular_margin", {})])
def test_single_concept_data_is_refused_where_the_loss_needs_two(name, overrides, digits):
    zeros = digits.subset([i for i, label in enumerate(digits.labels) if label == (0,)]).with_own_concepts()
    with pytest.raises(ValueError, match=r"needs at least 2 concepts.*has 1: \['0'\]"):
        train.prepare_run(tiny_config(name, **overrides), OPTIONS, zeros)
