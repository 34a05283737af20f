"""Model parallelism in the trainer (`model_parallelism`), on the 8 fake CPU devices of conftest.py.

The ArcFace template's class centres and their momentum are split over the mesh's `model` axis, and
the loss is `losses.arcface_loss(..., mesh=mesh)`. Whatever the split, training must be the same
computation as on a plain data-parallel mesh: these tests run the tiny ArcFace configuration
(tests/tiny.py: the one-block smooth backbone, in float64) with model_parallelism 1, 2 and 4, on 8
training classes (divisible) and on 7 (padded to 8), for all 4 steps of the run.

In float64 on the smooth backbone the layouts differ only in summation order, so the states after 4
steps are held to the issue's 1e-5 relative per leaf (`tiny.assert_same_state`), and each comparison
is shown to catch a deliberate mistake: one image of the first batch labelled with another class, and
the padding class column let into the softmax.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest

from jaxembed.cli import train as train_cli
import jaxembed
import tiny
from jaxembed import data as data_lib
from jaxembed import parallel, rundir, tasks, train
from jaxembed.train import loop

NUM_STEPS = tiny.NUM_STEPS  # 2 epochs of 16 images in batches of 8
EMBEDDING = tiny.ARCFACE["embeddings_size"]


@pytest.fixture(scope="module", autouse=True)
def float64():
    with jax.enable_x64(True):
        yield
    _COMPILED.clear()


@pytest.fixture(scope="module")
def digits():
    """Every 10th image of the embedded default: 10 concepts, of which the ArcFace split trains on 8."""
    return tiny.digits()


@pytest.fixture(scope="module")
def nine_digits(digits):
    """The same without the 9s: 9 concepts, 7 of them for training, which 2 and 4 do not divide."""
    return digits.subset([i for i, label in enumerate(digits.labels) if label != (9,)]).with_own_concepts()


def config(model_parallelism: int = 1, **overrides):
    # Checkpoints only where the run stops (max_steps) and at the end.
    overrides = {"checkpoint_every": 100, **overrides}
    return tiny.config("resnet_angular_margin", dtype="float64", model_parallelism=model_parallelism, **overrides)


class PaddingInTheSoftmax(tasks.ArcFace):
    """The deliberate one-class mistake: the loss is not told which centre columns are padding."""

    def loss_fn(self, *, mesh=None, num_classes=None, steps_per_epoch=None):
        return super().loss_fn(mesh=mesh, num_classes=None, steps_per_epoch=steps_per_epoch)


def wrong_label(batch):
    """The deliberate one-image mistake: the first image labelled with the next class."""
    label = batch["label"].copy()
    label[0] = (label[0] + 1) % batch["labels"].shape[1]
    return {**batch, "label": label}


_COMPILED: dict[tuple, tuple] = {}  # (data, model_parallelism, padding_in_softmax) -> (run, steps): compiled once


def compiled(data, model_parallelism: int, padding_in_softmax: bool = False):
    """`(run, steps)`: the prepared run of `config(model_parallelism)` on `data` and its compiled steps."""
    key = (id(data), model_parallelism, padding_in_softmax)
    if key not in _COMPILED:
        run = train.prepare_run(config(model_parallelism), data)
        if padding_in_softmax:
            task = run.task
            run.task = PaddingInTheSoftmax(scale=task.scale, margin=task.margin, embeddings_size=task.embeddings_size)
        _COMPILED[key] = (data, run, train.compile_steps(run))  # `data` kept alive, so its id stays its own
    return _COMPILED[key][1:]


def train_steps(data, model_parallelism: int, *, mistake=None, padding_in_softmax: bool = False):
    """`(run, losses, start, state)`: the trainer's compiled init and step, run for `NUM_STEPS` on the
    trainer's batches (`mistake` applied to the first); `start` holds the initial state's leaves."""
    run, steps = compiled(data, model_parallelism, padding_in_softmax)
    state = steps.init(jax.random.PRNGKey(run.config.seed))
    start = tiny.state_leaves(state)
    batches = loop.training_batches(run, 0)
    losses = []
    for step in range(NUM_STEPS):
        batch = next(batches)
        if mistake is not None and step == 0:
            batch = mistake(batch)
        state, metrics = steps.train(state, parallel.global_batch(batch, run.mesh))
        losses.append(float(metrics["loss"]))
    return run, losses, start, state


def unpadded(leaves: dict[str, np.ndarray], num_classes: int) -> dict[str, np.ndarray]:
    """The leaves with the centre columns past `num_classes` (padding) cut off."""
    return {name: leaf[:, :num_classes] if "centers" in name else leaf for name, leaf in leaves.items()}


def centres_momentum(state):
    """The SGD momentum of the centres, wherever optax keeps it in the optimiser state."""
    found = [leaf for path, leaf in jax.tree_util.tree_leaves_with_path(state.opt_state)
             if "trace" in jax.tree_util.keystr(path) and "centers" in jax.tree_util.keystr(path)]
    assert len(found) == 1, found
    return found[0]


def assert_same_training(ours, reference, num_classes: int, context: str = ""):
    """Parameters, batch-norm statistics and optimiser state after `NUM_STEPS` steps, within 1e-5 relative per leaf."""
    tiny.assert_same_state(unpadded(tiny.state_leaves(ours), num_classes),
                           unpadded(tiny.state_leaves(reference), num_classes),
                           context=f" after {NUM_STEPS} steps{context}")


def assert_same_losses(losses, reference_losses):
    # Rounding only (measured 1e-15 relative); 1e-5 was the float32 limit of the first step.
    np.testing.assert_allclose(losses, reference_losses, rtol=1e-12)


@pytest.fixture(scope="module")
def data_parallel_reference(digits):
    """`train_steps` with model_parallelism=1 on `digits`."""
    return train_steps(digits, 1)


@pytest.fixture(scope="module")
def data_parallel_reference_7_classes(nine_digits):
    """`train_steps` with model_parallelism=1 on `nine_digits`."""
    return train_steps(nine_digits, 1)


@pytest.mark.parametrize("model_parallelism", [2, 4])
def test_sharded_centres_train_like_replicated_ones(digits, data_parallel_reference, model_parallelism):
    reference_run, reference_losses, reference_start, reference_state = data_parallel_reference
    run, losses, start, state = train_steps(digits, model_parallelism)
    assert run.num_classes == reference_run.num_classes == 8 == run.model.num_classes
    assert dict(run.mesh.shape) == {"data": 8 // model_parallelism, "model": model_parallelism}
    centres = state.params["centers"]
    assert centres.dtype == np.float64
    assert {shard.data.shape for shard in centres.addressable_shards} == {(EMBEDDING, 8 // model_parallelism)}
    assert centres_momentum(state).sharding.is_equivalent_to(centres.sharding, 2)
    tiny.assert_same_state(start, reference_start, rtol=0)  # the same initial state
    # The state keeps its dtypes (float64 batch-norm statistics from the start: one compiled step).
    assert {name: leaf.dtype for name, leaf in tiny.state_leaves(state).items()} == {
        name: leaf.dtype for name, leaf in start.items()}
    assert_same_losses(losses, reference_losses)
    assert_same_training(state, reference_state, 8)


@pytest.mark.parametrize("model_parallelism", [2, 4])
def test_one_image_with_a_wrong_class_is_caught(digits, data_parallel_reference, model_parallelism):
    """The control of the test above: the same comparison fails when one label of the first batch is wrong."""
    _, _, _, wrong = train_steps(digits, model_parallelism, mistake=wrong_label)
    with pytest.raises(AssertionError, match="relative apart"):
        assert_same_training(wrong, data_parallel_reference[3], 8)


@pytest.fixture(scope="module")
def model_parallel_workdir(nine_digits, tmp_path_factory):
    """A model_parallelism=4 run on 7 classes, stopped at step 2 (max_steps) and resumed to the end."""
    workdir = str(tmp_path_factory.mktemp("model_parallel"))
    first = train.train_and_evaluate(config(4, max_steps=2), workdir, data=nine_digits)
    assert not first["finished"] and first["step"] == 2
    second = train.train_and_evaluate(config(4), workdir, data=nine_digits)
    return workdir, first, second


def restore_on_mesh(workdir: str, data, model_parallelism: int):
    """`(run, steps, state, saved_steps)`: the newest checkpoint of `workdir`, restored with the shardings
    the trainer gives the state for `model_parallelism` on the 8 devices."""
    run, steps = compiled(data, model_parallelism)
    abstract_state = jax.eval_shape(steps.init, jax.random.PRNGKey(0))  # shapes and shardings, nothing allocated
    run_dir = rundir.RunDir(workdir)
    with run_dir.checkpoint_manager() as manager:
        state, step = run_dir.restore_latest(manager, abstract_state)
        assert step == manager.latest_step()
        return run, steps, state, manager.all_steps()


def test_indivisible_class_count_is_padded_and_trains_like_the_unpadded_run(nine_digits, model_parallel_workdir,
                                                                           data_parallel_reference_7_classes):
    workdir, first, summary = model_parallel_workdir
    reference_run, reference_losses, _, reference_state = data_parallel_reference_7_classes
    assert reference_run.num_classes == 7 == reference_run.model.num_classes
    assert summary["finished"] and summary["step"] == NUM_STEPS and np.isfinite(summary["eval/map@r"])

    run, _, state, saved_steps = restore_on_mesh(workdir, nine_digits, 4)
    assert run.num_classes == 7 and run.model.num_classes == 8  # one zero column pads 7 to 2 per device
    assert sorted(saved_steps) == [2, NUM_STEPS]  # the stop at max_steps and the end, each saved once
    centres = state.params["centers"]
    assert centres.shape == (EMBEDDING, 8)
    assert {shard.data.shape for shard in centres.addressable_shards} == {(EMBEDDING, 2)}
    np.testing.assert_array_equal(np.asarray(centres)[:, 7:], 0.0)  # the padding never moves
    np.testing.assert_array_equal(np.asarray(centres_momentum(state))[:, 7:], 0.0)

    logged = {r["step"]: r["loss"] for r in rundir.RunDir(workdir).metrics() if "loss" in r}
    assert sorted(logged) == list(range(1, NUM_STEPS + 1))  # each step once, across the stop
    assert (logged[2], logged[NUM_STEPS]) == (first["train/loss"], summary["train/loss"])
    assert_same_losses([logged[s] for s in sorted(logged)], reference_losses)
    assert_same_training(state, reference_state, 7, " (stopped at step 2 and resumed)")


def test_padding_let_into_the_softmax_is_caught(nine_digits, data_parallel_reference_7_classes):
    """The control of the test above: the padded run differs from the unpadded one when the loss does not
    mask the padding column (the step the padded run equals it by)."""
    _, _, start, wrong = train_steps(nine_digits, 4, padding_in_softmax=True)
    tiny.assert_same_state(unpadded(start, 7), unpadded(data_parallel_reference_7_classes[2], 7), rtol=0)
    with pytest.raises(AssertionError, match="relative apart"):
        assert_same_training(wrong, data_parallel_reference_7_classes[3], 7)


def test_embed_load_reads_a_model_parallel_run_on_one_device(model_parallel_workdir, nine_digits):
    workdir = model_parallel_workdir[0]
    embedder = jaxembed.load(workdir)
    centres = embedder.variables["params"]["centers"]
    assert centres.shape == (EMBEDDING, 7)  # the padding column dropped
    assert all(leaf.sharding.device_set == {jax.local_devices()[0]} for leaf in jax.tree.leaves(embedder.variables))

    # The same embeddings as the trainer's own evaluation step on the 8-device, 2 x 4 mesh.
    run, steps, state, _ = restore_on_mesh(workdir, nine_digits, 4)
    np.testing.assert_array_equal(np.asarray(state.params["centers"])[:, :7], np.asarray(centres))
    images = next(data_lib.eval_batches(nine_digits, image_size=32, batch_size=8))["image"]  # uint8 (8, 32, 32, 3)
    on_mesh = steps.evaluate(state.variables, parallel.global_batch({"image": images}, run.mesh)["image"])
    on_one_device = jax.jit(embedder.embed_fn)(embedder.variables, images)
    # float64: rounding only (measured 2e-16 apart; float32 batch-norm statistics in the restored state were 2e-8).
    np.testing.assert_allclose(np.asarray(on_one_device), np.asarray(on_mesh["embedding"]), rtol=1e-9, atol=1e-12)


def test_invalid_model_parallelism_is_refused_naming_the_flag(digits, capsys):
    with pytest.raises(ValueError, match=r"model_parallelism=0 is out of range"):
        config(0)
    with pytest.raises(ValueError, match=r"model_parallelism=3 must divide the number of devices \(8\)"):
        train.prepare_run(config(3), digits)
    inception = tiny.config("inception_bn", model_parallelism=2)
    with pytest.raises(ValueError, match=r"model_parallelism=2 shards the ArcFace class centres.*inception_bn"):
        train.prepare_run(inception, digits)
    with pytest.raises(SystemExit):
        train_cli.main(["--template", "resnet_angular_margin", "--help"])
    assert "--model_parallelism" in capsys.readouterr().out
