"""Tests of jaxembed.models: parameter counts, shapes at every image size,
real small forward/train steps in float32 and bfloat16, remat, grouped convs.

Big models are only ever traced abstractly (`jax.eval_shape`, symbolic image
sizes for the sweep over every size); real
computation uses 32-64 px images, batch 2, and variables drawn with NumPy
(a real `init` of a deep model compiles slowly on CPU).
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tiny
from jax import export

from jaxembed import models
from jaxembed.models import heads, inception_bn, resnet

# torchvision's / the BN-Inception port's trainable parameter counts with a 1000-way classifier.
EXPECTED_PARAMS_1000 = {
    "resnet50": 25_557_032,
    "resnet101": 44_549_160,
    "resnet152": 60_192_808,
    "resnext50_32x4d": 25_028_904,
    "resnext101_32x8d": 88_791_336,
    "resnext101_64x4d": 83_455_272,
    "inception_bn": 11_295_240,
}

IMAGE_SIZES = tuple(range(32, 1024 + 1, 16))


def _abstract_variables(module, image_size=64, dtype=jnp.float32):
    """Shapes/dtypes of module.init(...) without allocating anything."""
    images = jax.ShapeDtypeStruct((1, image_size, image_size, 3), dtype)
    return jax.eval_shape(module.init, jax.random.key(0), images)


@functools.lru_cache(maxsize=None)
def _arch_variables(arch: str, num_classes: int | None = None):
    """`_abstract_variables(models.create(arch, num_classes=num_classes))`, traced once for all the tests
    that read it (they must not change it)."""
    return _abstract_variables(models.create(arch, num_classes=num_classes))


def _num_params(variables) -> int:
    return sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(variables["params"]))


def _random_images(batch=2, size=32, seed=0):
    """Raw uint8 RGB pixels (batch, size, size, 3)."""
    return jax.random.randint(jax.random.key(seed), (batch, size, size, 3), 0, 256).astype(jnp.uint8)


# ---------------------------------------------------------------- registry


def test_archs_and_feature_dims():
    assert models.ARCHS == (
        "resnet50",
        "resnet101",
        "resnet152",
        "resnext50_32x4d",
        "resnext101_32x8d",
        "resnext101_64x4d",
        "inception_bn",
    )
    for arch in models.ARCHS:
        assert models.feature_dim(arch) == (1024 if arch == "inception_bn" else 2048)


def test_unknown_arch_raises_value_error_naming_it():
    with pytest.raises(ValueError, match="nope") as excinfo:
        models.create("nope")
    assert "resnet50" in str(excinfo.value)  # lists the valid names
    with pytest.raises(ValueError, match="nope"):
        models.feature_dim("nope")


# ---------------------------------------------------------------- parameter counts


@pytest.mark.parametrize("arch", models.ARCHS)
def test_parameter_count_matches_torch(arch):
    variables = _arch_variables(arch, 1000)
    assert set(variables) == {"params", "batch_stats"}
    assert _num_params(variables) == EXPECTED_PARAMS_1000[arch]


def test_inception_bn_parameter_count_100_classes():
    variables = _arch_variables("inception_bn", 100)
    assert _num_params(variables) == 10_372_740


def test_backbone_has_no_classifier_and_zero_init_residual_keeps_count():
    for arch in ("resnet50", "inception_bn"):
        backbone = _arch_variables(arch)
        classifier = (models.feature_dim(arch) + 1) * 1000
        assert _num_params(backbone) == EXPECTED_PARAMS_1000[arch] - classifier
    plain = _abstract_variables(resnet.ResNet50(num_classes=1000, zero_init_residual=False))
    assert _num_params(plain) == EXPECTED_PARAMS_1000["resnet50"]


def test_resnet_parameter_names_follow_torchvision():
    params = _arch_variables("resnet50", 1000)["params"]
    expected_blocks = {f"stage{s}_block{b}" for s, n in zip((1, 2, 3, 4), (3, 4, 6, 3)) for b in range(n)}
    assert set(params) == {"stem_conv", "stem_bn", "classifier"} | expected_blocks
    assert params["stem_conv"]["kernel"].shape == (7, 7, 3, 64)
    # Only the first block of each stage projects its shortcut.
    for name in expected_blocks:
        assert ("downsample_conv" in params[name]) == name.endswith("block0"), name
    block = params["stage2_block0"]
    assert set(block) == {"conv1", "bn1", "conv2", "bn2", "conv3", "bn3", "downsample_conv", "downsample_bn"}
    assert block["conv2"]["kernel"].shape == (3, 3, 128, 128)


def test_resnext_grouped_conv_shapes():
    params = _arch_variables("resnext101_32x8d", 1000)["params"]
    # width = int(64 * 8 / 64) * 32 = 256, 32 groups -> 8 input channels per group.
    assert params["stage1_block0"]["conv2"]["kernel"].shape == (3, 3, 8, 256)
    assert params["stage4_block0"]["conv2"]["kernel"].shape == (3, 3, 64, 2048)


def test_inception_bn_parameter_names_follow_port():
    params = _arch_variables("inception_bn", 1000)["params"]
    stem_and_head = {"conv1_7x7_s2", "conv2_3x3_reduce", "conv2_3x3", "last_linear"}
    assert set(params) == stem_and_head | {name for name, _ in inception_bn.INCEPTION_BLOCKS}
    assert set(params["inception_3a"]) == {
        "1x1", "3x3_reduce", "3x3", "double_3x3_reduce", "double_3x3_1", "double_3x3_2", "pool_proj"
    }
    # Reduction blocks have no 1x1 branch and no pool projection.
    assert set(params["inception_3c"]) == set(params["inception_3a"]) - {"1x1", "pool_proj"}
    assert set(params["conv1_7x7_s2"]) == {"conv", "bn"}
    assert set(params["conv1_7x7_s2"]["conv"]) == {"kernel", "bias"}


def test_params_stay_float32_under_bfloat16():
    model = heads.ArcFaceModel(models.create("resnet50", dtype=jnp.bfloat16), 512, 100, dtype=jnp.bfloat16)
    variables = _abstract_variables(model, dtype=jnp.uint8)
    assert {leaf.dtype for leaf in jax.tree.leaves(variables)} == {jnp.dtype(jnp.float32)}
    assert variables["params"]["centers"].shape == (512, 100)


# One backbone of each family: ResNet, ResNeXt (grouped 3x3 convolutions), BN-Inception.
FAMILIES = ("resnet50", "resnext50_32x4d", "inception_bn")
# The stem's first convolution: name and kernel with each stem (the rest of the network is the same).
STEM_CONVS = {
    "resnet": {"imagenet": ("stem_conv", (7, 7, 3, 64)), "small": ("stem_conv", (3, 3, 3, 64)),
               "small_s2": ("stem_conv", (3, 3, 3, 64))},
    "inception_bn": {"imagenet": ("conv1_7x7_s2", (7, 7, 3, 64)), "small": ("conv1_3x3_s1", (3, 3, 3, 64)),
                     "small_s2": ("conv1_3x3_s2", (3, 3, 3, 64))},
}


@pytest.mark.parametrize("arch", FAMILIES)
def test_every_stem_builds_at_32px(arch):
    """create(stem=...): the small stems replace the stem's 7x7 convolution by a 3x3 one, the rest is unchanged.

    Shapes only (jax.eval_shape); the resolutions each stem gives are checked in test_recipe.py.
    """
    images = jax.ShapeDtypeStruct((2, 32, 32, 3), jnp.float32)
    params = {}
    for stem in models.STEMS:
        model = models.create(arch, stem=stem)
        features, variables = jax.eval_shape(
            functools.partial(model.init_with_output, train=False), jax.random.key(0), images
        )
        assert (features.shape, features.dtype) == ((2, models.feature_dim(arch)), jnp.float32)
        name, kernel_shape = STEM_CONVS["inception_bn" if arch == "inception_bn" else "resnet"][stem]
        stem_conv = variables["params"][name]
        assert (stem_conv["conv"] if arch == "inception_bn" else stem_conv)["kernel"].shape == kernel_shape
        params[stem] = {key: value for key, value in variables["params"].items() if key != name}
    shapes = [jax.tree.map(lambda leaf: leaf.shape, params[stem]) for stem in models.STEMS]
    assert shapes[0] == shapes[1] == shapes[2]
    with pytest.raises(ValueError, match="stem='tiny'.*imagenet, small, small_s2"):
        models.create(arch, stem="tiny")


# ---------------------------------------------------------------- every image size

# The three template models and their embedding sizes.
TEMPLATES = {
    "arcface_resnet101": (
        lambda: heads.ArcFaceModel(models.create("resnet101"), embeddings_size=512, num_classes=100),
        512,
    ),
    "classifier_inception_bn": (
        lambda: heads.ClassifierModel(models.create("inception_bn"), num_classes=100),
        1024,
    ),
    "classifier_resnext101_32x8d": (
        lambda: heads.ClassifierModel(models.create("resnext101_32x8d"), num_classes=100),
        2048,
    ),
}

# Image sides 32 * j + offset for j in [j_min, j_max]. Together they are every
# legal size 32..1024 step 16 (checked below).
#
# Why symbolic: a concrete abstract trace costs ~0.3 s of Python per model and
# size (~55 s of CPU for 3 models x 63 sizes). Traced with a symbolic side,
# jax checks every shape rule for all j at once and raises when it cannot
# prove two shapes equal (e.g. the branches of a concatenation), so one trace
# per family covers every size. Two families because BN-Inception's reduction
# blocks concatenate a "SAME" stride-2 max pool, of side ceil(k / 2), with
# stride-2 convs, of side floor((k - 1) / 2) + 1: equal for every integer k,
# but jax's symbolic arithmetic proves it only once the parity of k is fixed.
SIZE_FAMILIES = {"32*j": (0, 1, 32), "32*j + 16": (16, 1, 31)}  # name: (offset, j_min, j_max)
# Concrete spot checks of the symbolic traces: both smallest sizes, the size
# pretrained weights were made at, both largest sizes.
SPOT_CHECK_SIZES = (32, 48, 224, 1008, 1024)


def _symbolic_images(family: str) -> jax.ShapeDtypeStruct:
    """Batch of one uint8 image whose side is the symbolic expression `family`."""
    _, j_min, j_max = SIZE_FAMILIES[family]
    shape = export.symbolic_shape(f"1, {family}, {family}, 3", constraints=(f"j >= {j_min}", f"j <= {j_max}"))
    return jax.ShapeDtypeStruct(shape, jnp.uint8)


def test_size_families_cover_every_legal_size():
    covered = [32 * j + offset for offset, j_min, j_max in SIZE_FAMILIES.values() for j in range(j_min, j_max + 1)]
    assert sorted(covered) == list(IMAGE_SIZES)


def _assert_template_outputs(outputs, embedding_dim):
    """ClassifierModel: embedding + 100 logits; ArcFaceModel: embedding + features."""
    assert outputs["embedding"].shape == (1, embedding_dim)
    if "logits" in outputs:
        assert outputs["logits"].shape == (1, 100)
    else:
        assert outputs["features"].shape == (1, embedding_dim)
    assert {value.dtype for value in outputs.values()} == {jnp.dtype(jnp.float32)}


@pytest.mark.parametrize("template", sorted(TEMPLATES))
def test_template_traces_at_every_image_size(template):
    make_model, embedding_dim = TEMPLATES[template]
    model = make_model()
    # Init once, reuse for every size; init runs the model (train=False) too: the first spot check.
    images = jax.ShapeDtypeStruct((1, SPOT_CHECK_SIZES[0], SPOT_CHECK_SIZES[0], 3), jnp.uint8)
    outputs, variables = jax.eval_shape(model.init_with_output, jax.random.key(0), images)
    _assert_template_outputs(outputs, embedding_dim)
    apply = functools.partial(model.apply, train=False)
    for family in SIZE_FAMILIES:
        _assert_template_outputs(jax.eval_shape(apply, variables, _symbolic_images(family)), embedding_dim)
    for size in SPOT_CHECK_SIZES[1:]:
        images = jax.ShapeDtypeStruct((1, size, size, 3), jnp.uint8)
        _assert_template_outputs(jax.eval_shape(apply, variables, images), embedding_dim)


def test_symbolic_size_check_catches_the_ceil_mode_bug(monkeypatch):
    """The symbolic trace fails exactly where concrete sizes fail.

    The PyTorch port pools with ceil_mode, i.e. pads (0, 1) at every size; at
    sides 16 mod 32 its reduction blocks then cannot concatenate.
    """
    monkeypatch.setattr(
        inception_bn, "_max_pool_s2", lambda x: nn.max_pool(x, (3, 3), strides=(2, 2), padding=((0, 1), (0, 1)))
    )
    model = models.create("inception_bn")
    variables = _abstract_variables(model)
    apply = functools.partial(model.apply, train=False)
    jax.eval_shape(apply, variables, _symbolic_images("32*j"))
    jax.eval_shape(apply, variables, jax.ShapeDtypeStruct((1, 64, 64, 3), jnp.float32))
    for images in (_symbolic_images("32*j + 16"), jax.ShapeDtypeStruct((1, 48, 48, 3), jnp.float32)):
        with pytest.raises(TypeError, match="concatenate"):
            jax.eval_shape(apply, variables, images)


# ---------------------------------------------------------------- real small computation


def _synthetic_variables(abstract_variables, seed=0):
    """Concrete variables with the given shapes, drawn with NumPy.

    Much faster than a real `init` of a deep model on CPU (no per-shape RNG
    compilation), and non-trivial: He-scaled kernels, random BN affine
    parameters and running statistics.
    """
    rng = np.random.default_rng(seed)
    leaves, treedef = jax.tree.flatten_with_path(abstract_variables)
    values = []
    for path, leaf in leaves:
        name = path[-1].key  # e.g. "kernel", "scale", "var"
        if name == "kernel":
            fan_in = int(np.prod(leaf.shape[:-1]))
            value = rng.normal(0.0, np.sqrt(2.0 / fan_in), leaf.shape)
        elif name in ("scale", "var"):
            value = rng.uniform(0.5, 1.5, leaf.shape)
        elif name in ("bias", "mean"):
            value = rng.normal(0.0, 0.1, leaf.shape)
        elif name == "centers":
            value = rng.normal(0.0, 0.01, leaf.shape)
        else:
            raise AssertionError(f"unexpected variable {jax.tree_util.keystr(path)}")
        values.append(jnp.asarray(value, leaf.dtype))
    return jax.tree.unflatten(treedef, values)


SMALL_TEMPLATES = {
    "arcface_resnet50": lambda dtype: heads.ArcFaceModel(
        models.create("resnet50", dtype=dtype), embeddings_size=64, num_classes=10, dtype=dtype
    ),
    "classifier_inception_bn": lambda dtype: heads.ClassifierModel(
        models.create("inception_bn", dtype=dtype), num_classes=10, dtype=dtype
    ),
}


def _assert_unit_norm(embedding):
    np.testing.assert_allclose(np.linalg.norm(np.asarray(embedding), axis=-1), 1.0, rtol=1e-5)


@pytest.mark.parametrize("template", sorted(SMALL_TEMPLATES))
def test_small_forward_and_train_mode(template):
    variables = _synthetic_variables(_abstract_variables(SMALL_TEMPLATES[template](jnp.float32), 32, jnp.uint8))
    images = _random_images(batch=2, size=32, seed=1)
    embeddings = {}
    for dtype in (jnp.float32, jnp.bfloat16):
        model = SMALL_TEMPLATES[template](dtype)

        def eval_and_train(variables, images):
            train_outputs, updates = model.apply(
                variables, images, train=True, mutable=["batch_stats"], rngs={"dropout": jax.random.key(2)}
            )
            return model.apply(variables, images), train_outputs, updates

        outputs, train_outputs, updates = tiny.compile_quickly(eval_and_train, variables, images)(variables, images)
        for out in (outputs, train_outputs):
            assert set(out) == ({"embedding", "logits"} if "classifier" in template else {"embedding", "features"})
            for value in out.values():
                assert value.dtype == jnp.float32 and value.shape[0] == 2
                assert np.all(np.isfinite(value))
            _assert_unit_norm(out["embedding"])
        old_stats, new_stats = jax.tree.leaves(variables["batch_stats"]), jax.tree.leaves(updates["batch_stats"])
        assert len(old_stats) == len(new_stats)
        assert all(new.dtype == jnp.float32 and np.all(np.isfinite(new)) for new in new_stats)
        assert all(np.any(old != new) for old, new in zip(old_stats, new_stats))
        embeddings[dtype] = np.asarray(outputs["embedding"])

    # bfloat16 keeps ~3 significant digits; the embeddings should still point the same way.
    cosine = np.sum(embeddings[jnp.float32] * embeddings[jnp.bfloat16], axis=-1)
    assert np.all(cosine > 0.99), cosine


def test_remat_gives_identical_outputs_and_gradients():
    """A tiny ResNeXt-style ArcFace model, one training step with and without remat.

    Two stages of (2, 1) blocks: a block with a stride-1 projection shortcut, one with an identity
    shortcut and one with a stride-2 projection, each with a grouped 3x3 convolution; more stages
    would repeat these (and double the compilation).
    """
    tiny_backbone = functools.partial(resnet.ResNet, stage_sizes=(2, 1), groups=2, base_width=32)
    plain, rematted = (
        heads.ArcFaceModel(tiny_backbone(remat=remat), embeddings_size=16, num_classes=10)
        for remat in (False, True)
    )
    images = _random_images(batch=2, size=64, seed=3)
    abstract = _abstract_variables(plain, 64, jnp.uint8)
    assert jax.tree.structure(abstract) == jax.tree.structure(_abstract_variables(rematted, 64, jnp.uint8))
    variables = _synthetic_variables(abstract)  # BN scales non-zero, so every residual branch contributes

    def step(module, params):
        outputs, updates = module.apply(
            {"params": params, "batch_stats": variables["batch_stats"]},
            images,
            train=True,
            mutable=["batch_stats"],
            rngs={"dropout": jax.random.key(1)},
        )
        return jnp.sum(outputs["features"] ** 2), (outputs, updates)

    # Both compiled the same way: op-by-op execution of one against a compiled
    # checkpoint of the other could differ in rounding.
    (grads_plain, aux_plain), (grads_remat, aux_remat) = (
        tiny.compile_quickly(
            jax.grad(functools.partial(step, module), has_aux=True), variables["params"], options=tiny.UNOPTIMISED_COMPILE
        )(variables["params"])
        for module in (plain, rematted)
    )
    assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(grads_plain))
    assert all(np.any(g != 0) for g in jax.tree.leaves(grads_plain["backbone"]))
    jax.tree.map(np.testing.assert_array_equal, aux_plain, aux_remat)
    jax.tree.map(np.testing.assert_array_equal, grads_plain, grads_remat)


def _remat_calls(fn, *args):
    """Number of top-level rematerialised calls in fn's jaxpr (traced abstractly), and fn's output shapes."""
    remat_name = jax.make_jaxpr(jax.checkpoint(jnp.sin))(1.0).eqns[0].primitive.name  # differs across jax versions
    jaxpr, out_shapes = jax.make_jaxpr(fn, return_shape=True)(*args)
    return sum(eqn.primitive.name == remat_name for eqn in jaxpr.eqns), out_shapes


@pytest.mark.parametrize("arch", ["resnet50", "inception_bn"])
def test_remat_wraps_every_block(arch):
    plain, rematted = (models.create(arch, remat=remat) for remat in (False, True))
    variables = _abstract_variables(plain)
    images = jax.ShapeDtypeStruct((2, 64, 64, 3), jnp.float32)
    train_step = [
        functools.partial(module.apply, train=True, mutable=["batch_stats"]) for module in (plain, rematted)
    ]
    (plain_calls, plain_outputs), (remat_calls, remat_outputs) = (
        _remat_calls(fn, variables, images) for fn in train_step
    )
    assert jax.tree.map(lambda x: (x.shape, x.dtype), plain_outputs) == jax.tree.map(
        lambda x: (x.shape, x.dtype), remat_outputs
    )
    num_blocks = 3 + 4 + 6 + 3 if arch == "resnet50" else len(inception_bn.INCEPTION_BLOCKS)
    assert plain_calls == 0
    assert remat_calls == num_blocks


# ---------------------------------------------------------------- grouped convolutions


def _conv_reference(x, kernel, stride, padding):
    """Plain (ungrouped) NHWC/HWIO convolution with symmetric torch padding."""
    return jax.lax.conv_general_dilated(
        x,
        kernel,
        window_strides=(stride, stride),
        padding=((padding, padding), (padding, padding)),
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
        precision=jax.lax.Precision.HIGHEST,
    )


def _grouped_conv_reference(x, kernel, stride, padding, groups):
    """Grouped conv as `groups` ordinary convs on channel slices, concatenated."""
    in_per_group, out_per_group = x.shape[-1] // groups, kernel.shape[-1] // groups
    assert kernel.shape[2] == in_per_group
    outputs = [
        _conv_reference(
            x[..., g * in_per_group : (g + 1) * in_per_group],
            kernel[..., g * out_per_group : (g + 1) * out_per_group],
            stride,
            padding,
        )
        for g in range(groups)
    ]
    return jnp.concatenate(outputs, axis=-1)


def _bn_reference(x, params, stats):
    return (x - stats["mean"]) / jnp.sqrt(stats["var"] + 1e-5) * params["scale"] + params["bias"]


@pytest.mark.parametrize("stride", [1, 2])
def test_resnext_block_matches_per_group_reference(stride):
    groups, planes, base_width = 4, 16, 8  # width = int(16 * 8 / 64) * 4 = 8, 2 channels per group
    block = resnet.Bottleneck(planes=planes, stride=stride, groups=groups, base_width=base_width)
    x = jax.random.normal(jax.random.key(0), (2, 7, 7, 12))  # odd size; 12 != 64 channels: projection shortcut
    abstract = jax.eval_shape(lambda key, x: block.init(key, x, False), jax.random.key(1), x)
    variables = _synthetic_variables(abstract, seed=2)
    params, stats = variables["params"], variables["batch_stats"]
    assert params["conv2"]["kernel"].shape == (3, 3, 2, 8)

    def conv_bn(index, y, stride=1, padding=0, groups=1):
        y = _grouped_conv_reference(y, params[f"conv{index}"]["kernel"], stride, padding, groups)
        return _bn_reference(y, params[f"bn{index}"], stats[f"bn{index}"])

    def reference(x):
        y = jax.nn.relu(conv_bn(1, x))
        y = jax.nn.relu(conv_bn(2, y, stride=stride, padding=1, groups=groups))
        y = conv_bn(3, y)
        shortcut = _conv_reference(x, params["downsample_conv"]["kernel"], stride, 0)
        shortcut = _bn_reference(shortcut, params["downsample_bn"], stats["downsample_bn"])
        return jax.nn.relu(y + shortcut)

    # Each compiled once (op by op, every per-group slice and convolution would compile on its own).
    expected = tiny.compile_quickly(reference, x)(x)
    with jax.default_matmul_precision("highest"):
        actual = tiny.compile_quickly(lambda variables, x: block.apply(variables, x, False), variables, x)(variables, x)
    side = 4 if stride == 2 else 7
    assert actual.shape == (2, side, side, 64)
    np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- heads helpers


def test_normalize_images():
    images = jnp.array([[[[0, 128, 255]]]], jnp.uint8)
    expected = (np.array([0, 128, 255]) / 255 - np.array([0.485, 0.456, 0.406])) / np.array([0.229, 0.224, 0.225])
    np.testing.assert_allclose(heads.normalize_images(images)[0, 0, 0], expected, rtol=1e-5)
    np.testing.assert_allclose(heads.normalize_images(images.astype(jnp.float32))[0, 0, 0], expected, rtol=1e-5)
    assert heads.normalize_images(images, jnp.bfloat16).dtype == jnp.bfloat16


def test_l2_normalize_is_safe_at_zero():
    # The heads normalise `as_float(x)`: bfloat16 features give float32 embeddings (l2_normalize itself
    # keeps its input's dtype, so float64 checks stay float64).
    x = jnp.array([[3.0, 4.0], [0.0, 0.0]], jnp.bfloat16)
    y = heads.l2_normalize(heads.as_float(x))
    assert y.dtype == jnp.float32
    np.testing.assert_allclose(y, [[0.6, 0.8], [0.0, 0.0]], rtol=1e-6)
    grad = jax.grad(lambda v: jnp.sum(heads.l2_normalize(v)))(jnp.zeros((2, 3)))
    assert np.all(np.isfinite(grad))
