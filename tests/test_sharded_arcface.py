"""Class-sharded ArcFace (`losses.arcface_loss(..., mesh=mesh)`) on the 8 fake CPU devices: equal to
the dense loss, padding left out of the softmax, and the centres stay sharded.

The equivalence is held to the issue's standard in float64 (`tiny.assert_same_state`: 1e-5 relative
per leaf of loss, embedding gradient and centre gradient), and each comparison is shown to catch a
deliberate one-image mistake (one row's target class wrong, what a shard's class offset bug does) and
a one-class mistake (one padding column let into the softmax). The float32 comparison is kept beside
it, as the loss is used in float32 in training.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

import tiny
from jaxembed import losses, parallel

MESHES = [(2, 4), (1, 8), (8, 1)]  # (data, model) on the 8 devices of conftest.py
SCALE, MARGIN = 64.0, 0.5


def inputs(batch=16, embed_dim=32, num_classes=64, seed=0, dtype=np.float32):
    """Random embeddings, centres and labels; rows 0 and 1 point away from their centres, so the
    target angle is past pi - margin and the loss takes ArcFace's fallback branch there."""
    rng = np.random.default_rng(seed)
    embeddings = rng.normal(size=(batch, embed_dim))
    centers = rng.normal(size=(embed_dim, num_classes))
    labels = rng.integers(0, num_classes, size=batch).astype(np.int32)
    embeddings[:2] = -3.0 * centers[:, labels[:2]].T
    return embeddings.astype(dtype), centers.astype(dtype), labels


def make_mesh(data, model):
    assert data * model == jax.device_count()
    return parallel.make_mesh(model_parallelism=model)


def place(mesh, embeddings, centers, labels):
    rows = NamedSharding(mesh, PartitionSpec(parallel.DATA_AXIS))
    return (jax.device_put(embeddings, rows), jax.device_put(centers, parallel.centers_sharding(mesh)),
            jax.device_put(labels, rows))


def sharded_value_and_grad(mesh, valid_classes=None):
    def loss(embeddings, centers, labels):
        return losses.arcface_loss(embeddings, centers, labels, scale=SCALE, margin=MARGIN, mesh=mesh,
                                   valid_classes=valid_classes)

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))


def dense_value_and_grad(embeddings, centers, labels):
    def loss(embeddings, centers):
        return losses.arcface_loss(embeddings, centers, labels, scale=SCALE, margin=MARGIN)

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(embeddings, centers)


def as_leaves(value_and_grad, num_classes=None) -> dict[str, np.ndarray]:
    """Loss and gradients as `tiny.assert_same_state` leaves (centre gradient cut to `num_classes` columns)."""
    loss, (d_embeddings, d_centers) = value_and_grad
    return {"loss": np.asarray(loss), "d_embeddings": np.asarray(d_embeddings),
            "d_centers": np.asarray(d_centers)[:, :num_classes]}


def worst(ours, reference) -> float:
    return max(tiny.relative_differences(ours, reference).values())


@pytest.mark.parametrize("data,model", MESHES)
def test_loss_and_gradients_equal_the_dense_loss(data, model):
    """float32, as in training."""
    embeddings, centers, labels = inputs()
    cos_first = np.sum(embeddings[0] * centers[:, labels[0]]) / (
        np.linalg.norm(embeddings[0]) * np.linalg.norm(centers[:, labels[0]]))
    assert cos_first < np.cos(np.pi - MARGIN)  # the fallback branch is exercised
    mesh = make_mesh(data, model)
    loss, (d_embeddings, d_centers) = sharded_value_and_grad(mesh)(*place(mesh, embeddings, centers, labels))
    dense_loss, (dense_d_embeddings, dense_d_centers) = dense_value_and_grad(embeddings, centers, labels)
    assert loss.dtype == jnp.float32
    assert float(loss) == pytest.approx(float(dense_loss), rel=1e-5)
    # Gradients of a mean over 16 rows are ~1e-2 here; float32 rounding of the sharded sums is ~1e-7.
    np.testing.assert_allclose(d_embeddings, dense_d_embeddings, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(d_centers, dense_d_centers, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("data,model", MESHES)
def test_float64_loss_and_gradients_equal_the_dense_loss_and_a_wrong_target_class_does_not(data, model):
    """In float64 the layouts differ only in summation order (measured 1e-16 relative): 1e-5 per leaf
    holds with room, while one row's target class moved to the neighbouring column breaks it."""
    with jax.enable_x64(True):
        embeddings, centers, labels = inputs(dtype=np.float64)
        mesh = make_mesh(data, model)
        sharded = sharded_value_and_grad(mesh)
        ours = as_leaves(sharded(*place(mesh, embeddings, centers, labels)))
        reference = as_leaves(dense_value_and_grad(embeddings, centers, labels))
        wrong_labels = labels.copy()
        wrong_labels[5] = (labels[5] + 1) % centers.shape[1]  # one image, the next class's column
        wrong = as_leaves(sharded(*place(mesh, embeddings, centers, wrong_labels)))
    assert ours["loss"].dtype == np.float64
    tiny.assert_same_state(ours, reference, context=f" on the {data} x {model} mesh")
    assert worst(ours, reference) < 1e-12  # what 1e-5 leaves room for: rounding only
    with pytest.raises(AssertionError, match="relative apart"):
        tiny.assert_same_state(wrong, reference)


@pytest.mark.parametrize("data,model", MESHES)
def test_centres_and_their_gradient_stay_sharded(data, model):
    embeddings, centers, labels = inputs()
    mesh = make_mesh(data, model)
    placed = place(mesh, embeddings, centers, labels)
    _, (_, d_centers) = sharded_value_and_grad(mesh)(*placed)
    for array in (placed[1], d_centers):
        assert array.sharding.is_equivalent_to(parallel.centers_sharding(mesh), array.ndim)
        shards = array.addressable_shards
        assert len(shards) == data * model
        assert {shard.data.shape for shard in shards} == {(32, 64 // model)}
        # Each block of classes lives on the `data` devices of one model column, no more.
        columns = [shard.index[1].start or 0 for shard in shards]
        assert sorted(columns) == sorted(list(range(0, 64, 64 // model)) * data)
    np.testing.assert_array_equal(np.asarray(placed[1]), centers)


def _collectives(hlo_text: str) -> list[tuple[str, int]]:
    """(kind, number of elements of its result) for every all-gather / all-reduce / ... in compiled HLO."""
    found = []
    for line in hlo_text.splitlines():
        match = re.search(r"= (.+?) (all-gather|all-reduce|reduce-scatter|all-to-all|collective-permute)(-start)?\(",
                          line)
        if match:
            sizes = [int(np.prod([int(d) for d in dims.split(",") if d])) for dims in re.findall(r"\[([\d,]*)\]",
                                                                                               match.group(1))]
            found.append((match.group(2), sum(sizes)))
    return found


@pytest.mark.parametrize("data,model", [(2, 4), (1, 8)])
def test_a_compiled_sgd_step_never_gathers_the_centres(data, model):
    """Compiled (not run) at a size where a gathered copy of the centres would stand out."""
    batch, embed_dim, num_classes = 32, 64, 64_000
    mesh = make_mesh(data, model)
    rows = NamedSharding(mesh, PartitionSpec(parallel.DATA_AXIS))

    def step(centers, embeddings, labels):
        d_centers = jax.grad(losses.arcface_loss, argnums=1)(
            embeddings, centers, labels, scale=SCALE, margin=MARGIN, mesh=mesh)
        return centers - 0.1 * d_centers

    compiled = jax.jit(step, out_shardings=parallel.centers_sharding(mesh), donate_argnums=0).lower(
        jax.ShapeDtypeStruct((embed_dim, num_classes), jnp.float32, sharding=parallel.centers_sharding(mesh)),
        jax.ShapeDtypeStruct((batch, embed_dim), jnp.float32, sharding=rows),
        jax.ShapeDtypeStruct((batch,), jnp.int32, sharding=rows),
    ).compile()
    shard_elements = embed_dim * num_classes // model
    collectives = _collectives(compiled.as_text())
    # Only the embeddings are gathered (over `model`), and only (batch,) vectors reduced over it; the
    # one centre-sized all-reduce is the gradient's over `data`, present only when data > 1.
    assert all(size <= batch * embed_dim for kind, size in collectives if kind == "all-gather")
    big = [(kind, size) for kind, size in collectives if size > batch * embed_dim]
    assert [kind for kind, _ in big] == (["all-reduce"] if data > 1 else [])
    assert all(size <= shard_elements + 1 for _, size in big)
    assert not any(kind in ("all-to-all", "collective-permute") for kind, _ in collectives)
    # Per device: the centre shard comes in (donated), and the temporaries are a few shard-sized
    # buffers (gradient, normalised centres, the all-reduce's) and small logits: measured 2 shards on
    # 1 x 8 and 3 on 2 x 4, against 8 and 4 for a gathered centre matrix.
    memory = compiled.memory_analysis()
    assert memory.argument_size_in_bytes < 1.01 * 4 * (shard_elements + batch // data * (embed_dim + 1))
    assert memory.temp_size_in_bytes < 4 * shard_elements * 3.5


def padded_inputs(dtype):
    """66 classes, and the same centres padded with 6 random columns to 72 (a multiple of 4 and of 8)."""
    embeddings, centers, labels = inputs(num_classes=66, dtype=dtype)
    padding = np.random.default_rng(1).normal(size=(32, 6)).astype(dtype)
    return embeddings, centers, labels, np.concatenate([centers, padding], axis=1)


def test_padded_classes_are_left_out_of_the_softmax():
    """66 classes padded to 72 for a model size of 4 (and 8): the loss of the 66, padding untouched (float32)."""
    embeddings, centers, labels, padded = padded_inputs(np.float32)
    dense_loss, (dense_d_embeddings, dense_d_centers) = dense_value_and_grad(embeddings, centers, labels)
    for data, model in ((2, 4), (1, 8)):
        mesh = make_mesh(data, model)
        value, (d_embeddings, d_centers) = sharded_value_and_grad(mesh, valid_classes=66)(
            *place(mesh, embeddings, padded, labels))
        assert float(value) == pytest.approx(float(dense_loss), rel=1e-5)
        np.testing.assert_allclose(d_embeddings, dense_d_embeddings, rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(d_centers[:, :66], dense_d_centers, rtol=1e-4, atol=1e-6)
        np.testing.assert_array_equal(d_centers[:, 66:], 0.0)


def test_float64_padded_classes_equal_the_dense_loss_and_one_unmasked_padding_column_does_not():
    with jax.enable_x64(True):
        embeddings, centers, labels, padded = padded_inputs(np.float64)
        reference = as_leaves(dense_value_and_grad(embeddings, centers, labels))
        for data, model in ((2, 4), (1, 8)):
            mesh = make_mesh(data, model)
            placed = place(mesh, embeddings, padded, labels)
            ours = sharded_value_and_grad(mesh, valid_classes=66)(*placed)
            np.testing.assert_array_equal(ours[1][1][:, 66:], 0.0)
            ours = as_leaves(ours, 66)
            tiny.assert_same_state(ours, reference, context=f" on the {data} x {model} mesh")
            assert worst(ours, reference) < 1e-12
            # The mistake: valid_classes one too high, so the first padding column is a class of the softmax.
            wrong = as_leaves(sharded_value_and_grad(mesh, valid_classes=67)(*placed), 66)
            with pytest.raises(AssertionError, match="relative apart"):
                tiny.assert_same_state(wrong, reference)


def test_sizes_that_do_not_divide_over_the_mesh_are_refused():
    embeddings, centers, labels = inputs(num_classes=66)
    mesh = make_mesh(2, 4)
    with pytest.raises(ValueError, match=r"num_classes=66 must be divisible by the mesh's model size \(4\)"):
        losses.arcface_loss(embeddings, centers, labels, scale=SCALE, margin=MARGIN, mesh=mesh)
    with pytest.raises(ValueError, match=r"batch=11 must be divisible by the mesh's data size \(2\)"):
        losses.arcface_loss(embeddings[:11], centers[:, :64], labels[:11], scale=SCALE, margin=MARGIN, mesh=mesh)
    with pytest.raises(ValueError, match=r"model_parallelism=3 must divide the number of devices \(8\)"):
        parallel.make_mesh(model_parallelism=3)
