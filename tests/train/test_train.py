"""The trainer end to end on the tiny backbone (tests/tiny.py): every task, resume, the NaN stop, 8
devices vs 1, the embed API, and that a short run learns."""

import dataclasses
import logging
import os
import shutil
import signal

import jax
import numpy as np
import pytest

from jaxembed.cli import train as train_cli
import jaxembed
import tiny
from jaxembed import data as data_lib
from jaxembed import parallel, rundir, train
from jaxembed.train import loop


@pytest.fixture(scope="module")
def digits():
    return tiny.digits()


def leaves(workdir, step=None):
    variables, _ = rundir.RunDir(workdir).variables(step)
    return [np.asarray(x) for x in jax.tree.leaves(variables)]


@pytest.fixture(scope="module")
def inception_run(digits, tmp_path_factory):
    """One finished tiny sigmoid run (4 steps, checkpoints at 2 and 4), shared by several tests."""
    workdir = str(tmp_path_factory.mktemp("inception_run"))
    summary = train.train_and_evaluate(tiny.config("inception_bn"), workdir, data=digits)
    return workdir, summary


def check_run(workdir, summary, name, metric):
    assert summary["finished"] and summary["step"] == tiny.NUM_STEPS == summary["total_steps"]
    assert np.isfinite(summary["train/loss"])
    assert 0 <= summary["eval/recall@1"] <= summary["eval/recall@5"] <= 1
    assert 0 <= summary[metric] <= 1
    run = rundir.RunDir(workdir)
    steps = [r for r in run.metrics() if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4]  # the last step too, read after the loop
    assert steps[0]["learning_rate"] == pytest.approx(8 * 0.002)
    assert steps[-1]["learning_rate"] == pytest.approx(8 * 0.0002)  # decayed after init_epochs=1 (2 steps)
    assert any(metric in r for r in run.metrics())
    assert run.summary() == summary
    assert run.concepts() and run.config().template.name == name and run.config().image_size == 32


def test_sigmoid_end_to_end(inception_run):
    assert jax.device_count() == 8  # the 8 fake devices of conftest.py: batches are sharded
    check_run(*inception_run, "inception_bn", "eval/mAP")


@pytest.mark.parametrize("name,overrides,metric", [
    ("resnet_angular_margin", {}, "eval/map@r"),
    ("resnext", {"logreg": 0}, "eval/top1"),
])
def test_other_tasks_end_to_end(name, overrides, metric, digits, tmp_path):
    summary = train.train_and_evaluate(tiny.config(name, **overrides), str(tmp_path), data=digits)
    check_run(str(tmp_path), summary, name, metric)
    if name == "resnet_angular_margin":  # the closest centres, by brute force over the saved centres
        run = rundir.RunDir(str(tmp_path))
        centres = np.asarray(run.variables()[0]["params"]["centers"], np.float64).T
        unit = centres / np.linalg.norm(centres, axis=1, keepdims=True)
        pairs = [(i, j) for i in range(len(unit)) for j in range(i + 1, len(unit))]
        first, second = max(pairs, key=lambda pair: unit[pair[0]] @ unit[pair[1]])
        assert summary["closest_centres"]["concepts"] == [run.concepts()[first], run.concepts()[second]]
        assert summary["closest_centres"]["cosine"] == pytest.approx(unit[first] @ unit[second], abs=1e-6)
    else:
        assert "closest_centres" not in summary


def test_closest_centres_ignore_padding_and_warn_when_two_coincide(caplog):
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(16, 4))  # (D, 3 concepts + 1 padding column)
    centres[:, 2] = 3 * centres[:, 0] + 0.1 * rng.normal(size=16)  # "c" 2 degrees from "a"
    centres[:, 3] = centres[:, 1]  # padding on top of "b": were it read, "b" would pair with it at cosine 1
    with caplog.at_level(logging.WARNING, "jaxembed.train"):
        closest = loop.closest_centres(("a", "b", "c"), jax.numpy.asarray(centres))["closest_centres"]
    assert closest["concepts"] == ["a", "c"] and loop.MERGED_CENTRES_COSINE < closest["cosine"] < 1
    assert "centres of 'a' and 'c' point the same way" in caplog.text
    assert "--angular_margin" in caplog.text and "--margin_warmup_epochs" in caplog.text  # the two remedies
    caplog.clear()
    with caplog.at_level(logging.WARNING, "jaxembed.train"):
        spread = loop.closest_centres(("a", "b"), jax.numpy.asarray(np.eye(4)[:, :3]))["closest_centres"]
    assert spread == {"concepts": ["a", "b"], "cosine": 0.0} and not caplog.text
    assert loop.closest_centres(("a",), jax.numpy.asarray(np.eye(4)[:, :1])) == {}


def test_the_split_is_saved_and_the_report_reads_the_same_images(inception_run, digits):
    run = rundir.RunDir(inception_run[0])
    heldout = run.heldout(digits)
    assert len(heldout) == inception_run[1]["eval/num_images"] == 18
    trained = set(digits.item_names) - set(heldout.item_names)
    assert len(trained) == 162 and not trained & set(heldout.item_names)
    with pytest.raises(ValueError, match="split.json does not match"):
        run.heldout(digits.subset(range(1, len(digits))))


def test_sigterm_saves_and_the_resumed_run_equals_the_uninterrupted_one(inception_run, digits, tmp_path, monkeypatch):
    straight_dir, straight = inception_run
    original = loop.training_batches

    def batches_then_sigterm(run, step):
        for count, batch in enumerate(original(run, step)):
            if count == 1:  # a preemption notice while the second step is under way
                os.kill(os.getpid(), signal.SIGTERM)
            yield batch

    monkeypatch.setattr(loop, "training_batches", batches_then_sigterm)
    first = train.train_and_evaluate(tiny.config("inception_bn"), str(tmp_path), data=digits)
    assert first["stopped_by"] == "SIGTERM" and not first["finished"] and first["step"] == 2
    assert train_cli.exit_status(first) == 143
    assert os.path.isdir(tmp_path / "checkpoints" / "2")
    monkeypatch.setattr(loop, "training_batches", original)
    second = train.train_and_evaluate(tiny.config("inception_bn"), str(tmp_path), data=digits)
    assert second["finished"] and second["step"] == 4
    for x, y in zip(leaves(straight_dir), leaves(str(tmp_path)), strict=True):
        np.testing.assert_array_equal(x, y)  # bitwise on CPU
    assert straight["train/loss"] == second["train/loss"]
    assert straight["eval/recall@1"] == second["eval/recall@1"]


def test_corrupted_newest_checkpoint_falls_back_to_the_previous(inception_run, digits, tmp_path, caplog):
    straight_dir, _ = inception_run
    for name in ("checkpoints", "run.json", "label_map.json", "split.json"):
        copy = shutil.copytree if name == "checkpoints" else shutil.copy
        copy(os.path.join(straight_dir, name), tmp_path / name)
    for root, _, files in os.walk(tmp_path / "checkpoints" / "4"):
        for name in files:
            if "ocdbt" in root or name.endswith("ocdbt"):
                with open(os.path.join(root, name), "r+b") as f:
                    f.write(b"garbage" * 8)
    with caplog.at_level("WARNING", logger="jaxembed.rundir"):
        summary = train.train_and_evaluate(tiny.config("inception_bn"), str(tmp_path), data=digits)
    assert "checkpoint at step 4 is unreadable" in caplog.text
    assert summary["finished"] and summary["step"] == 4  # steps 3 and 4 trained again from step 2
    assert os.listdir(tmp_path / "unreadable_checkpoints")
    for x, y in zip(leaves(straight_dir), leaves(str(tmp_path)), strict=True):
        np.testing.assert_array_equal(x, y)


def test_workdir_of_another_run_is_refused_field_by_field(inception_run, digits, tmp_path):
    with pytest.raises(ValueError, match=r"run.json belongs to a different run \(image_size: 32 -> 48, seed: 0 -> 1\)"):
        train.train_and_evaluate(tiny.config("inception_bn", image_size=48, seed=1), inception_run[0], data=digits)
    # What only changes how a run is watched or stopped may change on resume.
    shutil.copytree(inception_run[0], tmp_path / "run")
    again = train.train_and_evaluate(tiny.config("inception_bn", log_every=3, max_steps=4), str(tmp_path / "run"),
                                     data=digits)
    assert again["step"] == 4 and again["finished"]


def test_a_dead_data_worker_stops_training_with_every_finished_step_saved(inception_run, digits, tmp_path,
                                                                        monkeypatch):
    """The pipeline reports a dead worker before step 3 (`DataWorkerDied`, as tests/test_data.py provokes
    with a real kill): the trainer saves step 3, which no regular checkpoint (every 2) covers, names the
    worker and the step, and the same command resumes to the uninterrupted run's weights."""
    straight_dir, straight = inception_run
    original = loop.training_batches

    def worker_dies_before_step_3(run, step):
        batches = original(run, step)
        for _ in range(3 - step):
            yield next(batches)
        raise data_lib.DataWorkerDied("data worker 1 of 2 died before handing over batch 3 of this pipeline (exit "
                                      "code -9, SIGKILL)", worker=1, batch=3)

    monkeypatch.setattr(loop, "training_batches", worker_dies_before_step_3)
    with pytest.raises(train.TrainingStopped, match=r"before step 3: data worker 1 of 2 died .* checkpoint is at "
                                                    r"step 3; the same command resumes"):
        train.train_and_evaluate(tiny.config("inception_bn"), str(tmp_path), data=digits)
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["2", "3"]
    monkeypatch.setattr(loop, "training_batches", original)
    resumed = train.train_and_evaluate(tiny.config("inception_bn"), str(tmp_path), data=digits)
    assert resumed["finished"] and resumed["train/loss"] == straight["train/loss"]
    for x, y in zip(leaves(straight_dir), leaves(str(tmp_path)), strict=True):
        np.testing.assert_array_equal(x, y)  # bitwise on CPU


def test_nan_stops_with_the_step_and_keeps_the_last_good_checkpoint(inception_run, digits, tmp_path):
    # Start from the shared run's step-2 checkpoint with an absurd learning rate.
    shutil.copytree(os.path.join(inception_run[0], "checkpoints", "2"), tmp_path / "checkpoints" / "2")
    shutil.copy(os.path.join(inception_run[0], "label_map.json"), tmp_path / "label_map.json")
    good = leaves(str(tmp_path))
    bad_config = tiny.config("inception_bn", per_item_lrate=1e30)
    with pytest.raises(train.TrainingStopped, match=r"non-finite values at step [23] .*checkpoint at step 2"):
        train.train_and_evaluate(bad_config, str(tmp_path), data=digits)
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["2"]
    for x, y in zip(good, leaves(str(tmp_path)), strict=True):
        np.testing.assert_array_equal(x, y)


def one_step(run, devices, batch):
    """The trainer's compiled step on `devices`: `(loss, state leaves before, state leaves after)`."""
    mesh_run = dataclasses.replace(run, mesh=parallel.make_mesh(devices))
    steps = train.compile_steps(mesh_run)
    state = steps.init(jax.random.PRNGKey(0))
    before = tiny.state_leaves(state)
    state, step_metrics = steps.train(state, parallel.global_batch(batch, mesh_run.mesh))
    return float(step_metrics["loss"]), before, tiny.state_leaves(state)


@pytest.mark.parametrize("template", ["inception_bn", "resnet_angular_margin"])
def test_eight_devices_give_the_same_step_as_one(template, digits):
    """In float64 on the smooth backbone the layouts differ only in summation order: 1e-5 per leaf holds
    with room, while one image of the 8 replaced by another (a device reading the wrong rows) breaks it."""
    with jax.enable_x64(True):
        run = train.prepare_run(tiny.config(template, dtype="float64"), digits)
        batch = next(data_lib.train_batches(run.train_data, image_size=32, batch_size=8, seed=0))
        wrong_batch = {name: rows[[0, 1, 2, 3, 4, 5, 6, 0]] for name, rows in batch.items()}
        loss1, start, one = one_step(run, jax.devices()[:1], batch)
        loss8, start8, eight = one_step(run, jax.devices()[:8], batch)
        _, _, wrong = one_step(run, jax.devices()[:8], wrong_batch)
    assert loss1 == pytest.approx(loss8, rel=1e-12)
    tiny.assert_same_state(start8, start, rtol=0)  # the same initial state
    tiny.assert_same_state(eight, one, context=" on 8 devices")
    with pytest.raises(AssertionError, match="relative apart"):
        tiny.assert_same_state(wrong, one)


def test_batch_size_must_divide_over_devices(digits):
    with pytest.raises(ValueError, match="batch_size=6 must be divisible by the number of devices \\(8\\)"):
        train.prepare_run(tiny.config("inception_bn", batch_size=6), digits)


def test_embedder_on_a_trained_run(inception_run):
    embedder = jaxembed.load(inception_run[0])
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, size=(40 + 7 * i, 50, 3), dtype=np.uint8) for i in range(3)]
    batch = embedder(images)
    assert batch.shape == (3, tiny.FEATURES) and batch.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(batch, axis=1), 1.0, rtol=1e-5)
    alone = embedder(images[1])
    np.testing.assert_allclose(alone[0], batch[1], rtol=1e-5, atol=1e-6)
    direct = jax.jit(embedder.embed_fn)(embedder.variables, embedder.preprocess(images))
    np.testing.assert_allclose(np.asarray(direct), batch, rtol=1e-5, atol=1e-6)
    probabilities = embedder.predict(images)
    assert probabilities.shape == (3, 10) and np.all((probabilities >= 0) & (probabilities <= 1))
    assert embedder.concepts == tuple(str(d) for d in range(10))


def test_command_line_errors_name_the_flag(capsys):
    assert train_cli.main(["--template", "inception_bn", "--image_size", "40", "--no_progress"]) == 2
    assert "image_size=40" in capsys.readouterr().err
    assert train_cli.main(["--template", "inception_bn", "--optimizer", "adam", "--no_progress"]) == 2
    assert "optimizer='adam' is invalid: expected one of sgd, adamw" in capsys.readouterr().err
    assert train_cli.main(["--template", "inception_bn", "--data_workers", "-1", "--no_progress"]) == 2
    assert "data_workers=-1" in capsys.readouterr().err


def test_init_from_pretrained_backbone(digits, tmp_path):
    """The one trainer test on a real backbone: torchvision-layout weights reach BN-Inception's parameters."""
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
    # A zero learning rate keeps the loaded weights.
    config = tiny.config("inception_bn", arch="inception_bn", per_item_lrate=0.0, init_from=path, max_steps=1)
    train.train_and_evaluate(config, str(tmp_path / "run"), data=digits)
    params = rundir.RunDir(str(tmp_path / "run")).variables()[0]["params"]
    for x, y in zip(jax.tree.leaves(expected), jax.tree.leaves(params["backbone"]), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    assert "classifier" in params  # the head is new, not from the file


@pytest.mark.parametrize("name,overrides", [("inception_bn", {"logreg": 0}), ("resnet_angular_margin", {})])
def test_single_concept_data_is_refused_where_the_loss_needs_two(name, overrides, digits):
    zeros = digits.subset([i for i, label in enumerate(digits.labels) if label == (0,)]).with_own_concepts()
    with pytest.raises(ValueError, match=r"needs at least 2 concepts.*has 1: \['0'\]"):
        train.prepare_run(tiny.config(name, **overrides), zeros)


def test_a_short_run_learns(tmp_path):
    """120 steps of softmax training on 900 digits. The untrained classifier is at chance (top-1 about 0.1
    for ten balanced concepts); trained, it classifies most held-out digits (0.7-0.8 measured across
    learning rates 0.003-0.01 per item), and its embedding retrieves far above chance (Recall@1 0.1) and
    no worse than the untrained one's: the one-block backbone's random features already retrieve digits
    well (0.91), so retrieval alone would not show learning."""
    data = tiny.digits(step=2)
    config = tiny.config("inception_bn", logreg=0, num_epochs=12, init_epochs=10, num_items_per_epoch=320,
                         batch_size=32, per_item_lrate=0.003, min_crop_area=0.7, checkpoint_every=1000,
                         log_every=20)
    untrained = train.train_and_evaluate(config.replace(per_item_lrate=0.0), str(tmp_path / "untrained"), data=data)
    trained = train.train_and_evaluate(config, str(tmp_path / "trained"), data=data)
    assert untrained["eval/num_images"] == trained["eval/num_images"] == 90
    assert untrained["eval/top1"] < 0.3
    assert trained["eval/top1"] >= 0.6
    assert trained["eval/recall@1"] >= max(0.8, untrained["eval/recall@1"] - 0.05)
