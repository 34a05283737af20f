"""Model parallelism in the trainer (`--model_parallelism`), on the 8 fake CPU devices of conftest.py.

The ArcFace template's class centres and their momentum are split over the mesh's `model` axis; the
loss is then `sharded_arcface_loss`. Whatever the split, training must be the same computation as on
a plain data-parallel mesh: these tests run the tiny ArcFace configuration of tests/test_train.py
with model_parallelism 1, 2 and 4, on 8 training classes (divisible) and on 7 (padded to 8).

The backbone plays no part in how the centres are split, so `models.create` is swapped for a one-block
ResNet (stem + one bottleneck, 256-d features) while this module runs: resnet50 would take a minute
per compile on a shared 2-core CPU, this takes seconds. Everything else is the trainer's own code.
"""

from __future__ import annotations

import dataclasses
import json
import os

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

import _same_step as same_step
import jaxembed
from jaxembed import data as data_lib
from jaxembed import models, parallel, templates, train
from jaxembed.models import resnet

TINY = dict(arch="resnet50", image_size=32, batch_size=8, init_epochs=1, step_epochs=1, num_epochs=2,
            num_items_per_epoch=16, per_item_lrate=0.002, angular_scale=16)
NUM_STEPS = 4  # 2 epochs of 16 images in batches of 8
OPTIONS = train.TrainOptions(progress=False, log_every=1, checkpoint_every=100, eval_batch_size=64)


@pytest.fixture(scope="module", autouse=True)
def one_block_backbone():
    def create(arch, **kwargs):
        assert arch == "resnet50", arch
        return resnet.ResNet(stage_sizes=(1,), **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(models, "create", create)
        yield


@pytest.fixture(scope="module")
def digits():
    """Every 10th image of the embedded default: 10 concepts, of which the ArcFace split trains on 8."""
    full = data_lib.load_source(None)
    return full.subset(range(0, len(full), 10))


@pytest.fixture(scope="module")
def nine_digits(digits):
    """The same without the 9s: 9 concepts, 7 of them for training, which 2 and 4 do not divide."""
    return digits.subset([i for i, label in enumerate(digits.labels) if label != (9,)]).with_own_concepts()


def config():
    return templates.get("resnet_angular_margin").config(**TINY)


def options(model_parallelism, **changes):
    return dataclasses.replace(OPTIONS, model_parallelism=model_parallelism, **changes)


def train_steps(data, model_parallelism: int, num_steps: int = NUM_STEPS):
    """`(run, losses, start, state)`: the trainer's compiled init and step, run on the trainer's batches;
    `start` holds the initial state's leaves (`same_step.state_leaves`)."""
    run = train.prepare_run(config(), options(model_parallelism), data)
    init, step_fn, _ = train.compile_steps(run)
    state = init(jax.random.PRNGKey(0))
    start = same_step.state_leaves(state)
    batches = train._batches_from(run, 0)
    losses = []
    for _ in range(num_steps):
        state, metrics = step_fn(state, parallel.global_batch(next(batches), run.mesh))
        losses.append(float(metrics["loss"]))
    return run, losses, start, state


def unpadded(leaves: dict[str, np.ndarray], num_classes: int) -> dict[str, np.ndarray]:
    """The leaves with the centre columns past `num_classes` (padding) cut off."""
    return {name: leaf[:, :num_classes] if "centers" in name else leaf for name, leaf in leaves.items()}


def assert_same_training(ours, reference, start: dict, num_classes: int):
    """Parameters, batch-norm statistics and optimiser state after `NUM_STEPS` steps, compared by how far
    the reference moved from `start` (tests/_same_step.py: float32 rounding between mesh layouts can put
    a ReLU on the other side of zero in these tiny runs, which no float tolerance covers)."""
    same_step.assert_same_step(unpadded(same_step.state_leaves(ours), num_classes),
                               unpadded(same_step.state_leaves(reference), num_classes),
                               unpadded(start, num_classes), f" after {NUM_STEPS} steps")


def assert_same_losses(losses, reference_losses):
    # The first step starts from the same state: only the summation order differs. Later ones inherit
    # the rounding of the steps before (see assert_same_training); measured 4e-5 apart at step 4.
    assert losses[0] == pytest.approx(reference_losses[0], rel=1e-5)
    np.testing.assert_allclose(losses, reference_losses, rtol=1e-3)


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
    reference_run, reference_losses, start, reference_state = data_parallel_reference
    run, losses, _, state = train_steps(digits, model_parallelism)
    assert run.num_classes == reference_run.num_classes == 8 == run.model.num_classes
    assert dict(run.mesh.shape) == {"data": 8 // model_parallelism, "model": model_parallelism}
    centres = state.params["centers"]
    assert {shard.data.shape for shard in centres.addressable_shards} == {(512, 8 // model_parallelism)}
    momentum = state.opt_state[1][0].trace["centers"]  # add_decayed_weights, then sgd's momentum trace
    assert momentum.sharding.is_equivalent_to(centres.sharding, 2)
    assert_same_losses(losses, reference_losses)
    assert_same_training(state, reference_state, start, 8)


@pytest.fixture(scope="module")
def model_parallel_workdir(nine_digits, tmp_path_factory):
    """A model_parallelism=4 run on 7 classes, stopped at step 2 (max_steps) and resumed to the end."""
    workdir = str(tmp_path_factory.mktemp("model_parallel"))
    first = train.train_and_evaluate(config(), workdir, options=options(4, max_steps=2), data=nine_digits)
    assert not first["finished"] and first["step"] == 2
    second = train.train_and_evaluate(config(), workdir, options=options(4), data=nine_digits)
    return workdir, first, second


def restore_on_mesh(workdir: str, data, model_parallelism: int):
    """`(run, evaluate_batch, state, saved_steps)`: the newest checkpoint of `workdir`, restored with
    the shardings the trainer gives the state for `model_parallelism` on the 8 devices."""
    run = train.prepare_run(config(), options(model_parallelism), data)
    init, _, evaluate_batch = train.compile_steps(run)
    abstract_state = jax.eval_shape(init, jax.random.PRNGKey(0))  # shapes and shardings, nothing allocated
    with ocp.CheckpointManager(os.path.join(workdir, "checkpoints")) as manager:
        state = manager.restore(manager.latest_step(), args=ocp.args.StandardRestore(abstract_state))
        return run, evaluate_batch, state, manager.all_steps()


def test_indivisible_class_count_is_padded_and_trains_like_the_unpadded_run(nine_digits, model_parallel_workdir,
                                                                           data_parallel_reference_7_classes):
    workdir, first, summary = model_parallel_workdir
    reference_run, reference_losses, start, reference_state = data_parallel_reference_7_classes
    assert reference_run.num_classes == 7 == reference_run.model.num_classes
    assert summary["finished"] and summary["step"] == NUM_STEPS and np.isfinite(summary["eval/map@r"])

    run, _, state, saved_steps = restore_on_mesh(workdir, nine_digits, 4)
    assert run.num_classes == 7 and run.model.num_classes == 8  # one zero column pads 7 to 2 per device
    assert sorted(saved_steps) == [2, NUM_STEPS]  # the stop at max_steps and the end, each saved once
    centres = state.params["centers"]
    assert centres.shape == (512, 8)
    assert {shard.data.shape for shard in centres.addressable_shards} == {(512, 2)}
    np.testing.assert_array_equal(np.asarray(centres)[:, 7:], 0.0)  # the padding never moves
    np.testing.assert_array_equal(np.asarray(state.opt_state[1][0].trace["centers"])[:, 7:], 0.0)

    logged = {r["step"]: r["loss"] for r in map(json.loads, open(os.path.join(workdir, "metrics.jsonl")))
              if "loss" in r}
    # The last step of each run is read after its loop, not logged.
    logged.update({2: first["train/loss"], NUM_STEPS: summary["train/loss"]})
    assert sorted(logged) == list(range(1, NUM_STEPS + 1))
    assert_same_losses([logged[s] for s in sorted(logged)], reference_losses)
    assert_same_training(state, reference_state, start, 7)


def test_embed_load_reads_a_model_parallel_run_on_one_device(model_parallel_workdir, nine_digits):
    workdir = model_parallel_workdir[0]
    embedder = jaxembed.load(workdir)
    centres = embedder.variables["params"]["centers"]
    assert centres.shape == (512, 7)  # the padding column dropped
    assert all(leaf.sharding.device_set == {jax.local_devices()[0]} for leaf in jax.tree.leaves(embedder.variables))

    # The same embeddings as the trainer's own evaluation step on the 8-device, 2 x 4 mesh.
    run, evaluate_batch, state, _ = restore_on_mesh(workdir, nine_digits, 4)
    np.testing.assert_array_equal(np.asarray(state.params["centers"])[:, :7], np.asarray(centres))
    images = next(data_lib.eval_batches(nine_digits, image_size=32, batch_size=8))["image"]  # uint8 (8, 32, 32, 3)
    on_mesh = evaluate_batch({"params": state.params, "batch_stats": state.batch_stats},
                             parallel.global_batch({"image": images}, run.mesh)["image"])
    on_one_device = jax.jit(embedder.embed_fn)(embedder.variables, images)
    np.testing.assert_allclose(np.asarray(on_one_device), np.asarray(on_mesh["embedding"]), rtol=1e-5, atol=1e-6)


def test_invalid_model_parallelism_is_refused_naming_the_flag(digits, capsys):
    with pytest.raises(ValueError, match=r"model_parallelism=0 must be >= 1"):
        options(0)
    with pytest.raises(ValueError, match=r"model_parallelism=3 must divide the number of devices \(8\)"):
        train.prepare_run(config(), options(3), digits)
    inception = templates.get("inception_bn").config(arch="inception_bn", image_size=32, batch_size=8)
    with pytest.raises(ValueError, match=r"model_parallelism=2 shards the ArcFace class centres.*inception_bn"):
        train.prepare_run(inception, options(2), digits)
    with pytest.raises(SystemExit):
        train.main(["--template", "resnet_angular_margin", "--help"])
    assert "--model_parallelism" in capsys.readouterr().out
