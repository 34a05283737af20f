"""The CPU forms of convolutions equal XLA's convolutions, in values and gradients.

Gradients are compared layer by layer (every form, stride, grouping and layout the networks use) and
block by block (a ResNeXt bottleneck, BN-Inception blocks); whole networks are compared on their values,
with random parameters under which every layer counts. A whole network's backward pass with the native
grouped convolutions takes minutes to compile and run on two CPU cores and adds little: the gradient of a
network is the composition of its layers' gradients.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tiny
from jax import lax

from jaxembed.models import conv_forms, inception_bn, resnet


# Every comparison is compiled once (op by op, each per-group slice and each layer would compile on its
# own), quickly (`tiny.compile_quickly`).


def _native(x, w, strides, padding, groups, dimension_numbers, rhs_dilation=None):
    return lax.conv_general_dilated(x, w, strides, padding, rhs_dilation=rhs_dilation,
                                    dimension_numbers=dimension_numbers, feature_group_count=groups)


def _split(x, w, strides, padding, groups, dimension_numbers, rhs_dilation=None):
    return conv_forms.split_grouped_conv(x, w, strides, padding, rhs_dilation=rhs_dilation,
                                           dimension_numbers=dimension_numbers, feature_group_count=groups)


@pytest.mark.parametrize(
    "groups, in_per_group, out_per_group, stride, dilation",
    [(32, 4, 4, 1, 1), (32, 2, 2, 2, 1), (4, 3, 5, 1, 2), (2, 8, 1, 2, 1), (1, 6, 6, 1, 1)],
)
@pytest.mark.parametrize("layout", ["NHWC", "NCHW"])
def test_split_grouped_conv_equals_native_values_and_gradients(groups, in_per_group, out_per_group, stride,
                                                              dilation, layout):
    rng = np.random.default_rng(groups * 100 + stride)
    channels_in, channels_out = groups * in_per_group, groups * out_per_group
    x = rng.standard_normal((2, 9, 7, channels_in)).astype(np.float32)
    w = rng.standard_normal((3, 3, in_per_group, channels_out)).astype(np.float32)
    if layout == "NCHW":
        x, w = x.transpose(0, 3, 1, 2), w.transpose(3, 2, 0, 1)
        numbers = ("NCHW", "OIHW", "NCHW")
    else:
        numbers = ("NHWC", "HWIO", "NHWC")
    args = ((stride, stride), ((1, 1), (2, 0)), groups, numbers, (dilation, dilation))

    # A random cotangent checks every output position and channel of the gradients.
    cotangent = rng.standard_normal(jax.eval_shape(lambda x, w: _native(x, w, *args), x, w).shape).astype(np.float32)

    def values_and_gradients(x, w, cotangent):
        return [(f(x, w, *args), jax.grad(lambda x, w: jnp.vdot(f(x, w, *args), cotangent), argnums=(0, 1))(x, w))
                for f in (_native, _split)]

    compiled = tiny.compile_quickly(values_and_gradients, x, w, cotangent)
    (expected, native_grads), (actual, split_grads) = compiled(x, w, cotangent)
    np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=1e-5)
    for native, split in zip(native_grads, split_grads):
        np.testing.assert_allclose(split, native, rtol=1e-4, atol=1e-4)


def _random_variables(abstract, seed=0):
    """float64 variables shaped like `abstract`, under which every layer counts: He-scaled kernels and
    random batch-norm scales (not the zero scale `zero_init_residual` gives the last BN of each ResNeXt
    block, which would hide its branch from the forward pass), biases and running statistics."""
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        name = path[-1].key
        if name == "kernel":
            return rng.normal(0.0, np.sqrt(2.0 / np.prod(leaf.shape[:-1])), leaf.shape)
        if name in ("scale", "var"):
            return rng.uniform(0.5, 1.5, leaf.shape)
        assert name in ("bias", "mean"), jax.tree_util.keystr(path)
        return rng.normal(0.0, 0.1, leaf.shape)

    return jax.tree_util.tree_map_with_path(draw, abstract)


@pytest.mark.parametrize("constructor", [resnet.ResNeXt50_32x4d, resnet.ResNet50, inception_bn.InceptionBN],
                         ids=["resnext50", "resnet50", "inception_bn"])
def test_networks_are_the_same_function_with_either_implementation(constructor):
    """Whole-network values in train mode; the gradients are compared block by block (below).

    Computed in float64: batch norm over a batch of 2 at 1x1 spatial size amplifies float32
    rounding by orders of magnitude, which would hide what is compared here. 48 px, not 32: at 32 px
    ResNeXt's stage 4 is 1x1, where train-mode batch norm of 2 samples leaves little but a sign.
    """
    with jax.enable_x64(True):
        x = np.random.default_rng(0).standard_normal((2, 48, 48, 3))
        native = constructor(num_classes=5, conv_impl="native", dtype=jnp.float64)
        split = constructor(num_classes=5, conv_impl="cpu", dtype=jnp.float64)
        abstract = jax.eval_shape(native.init, jax.random.key(0), x)
        # Same parameter tree: checkpoints and imported weights do not depend on the choice.
        assert jax.tree.structure(jax.eval_shape(split.init, jax.random.key(0), x)) == jax.tree.structure(abstract)
        variables = _random_variables(abstract)
        train_outputs = [
            lambda variables, x, m=module: m.apply(variables, x, train=True, mutable=["batch_stats"])[0]
            for module in (native, split)
        ]
        native_out, split_out = (tiny.compile_quickly(fn, variables, x)(variables, x) for fn in train_outputs)
    assert native_out.shape == (2, 5)
    np.testing.assert_allclose(split_out, native_out, rtol=1e-9, atol=1e-12)


# Blocks of the networks, as built there, whose convolutions take every form and configuration the
# networks use but the 7x7 stem (handed to XLA unchanged at any useful input size): 1x1 (stride 1 and 2,
# with and without bias) and 3x3 (stride 1 and 2; 32 groups of 4 and of 8 channels, and ungrouped), on
# outputs larger than SMALL_OUTPUT_SIDE (XLA's convolution) and not (the matrix product).
# Input (side, channels): the block's channels; a small odd side, so that stride 2 meets an edge.
_INCEPTION_SPECS = dict(inception_bn.INCEPTION_BLOCKS)
BLOCKS = {
    "resnext50_stage1_block1": (resnet.Bottleneck, dict(planes=64, groups=32, base_width=4), (5, 256)),
    "resnext50_stage2_block0": (resnet.Bottleneck, dict(planes=128, stride=2, groups=32, base_width=4), (5, 256)),
    "resnet50_stage3_block0": (resnet.Bottleneck, dict(planes=256, stride=2), (3, 512)),
    "resnet50_stage4_block1": (resnet.Bottleneck, dict(planes=512), (1, 2048)),
    "inception_3a": (inception_bn.InceptionBlock, dict(spec=_INCEPTION_SPECS["inception_3a"]), (5, 192)),
    "inception_3c": (inception_bn.InceptionBlock, dict(spec=_INCEPTION_SPECS["inception_3c"]), (5, 320)),
    "inception_5a": (inception_bn.InceptionBlock, dict(spec=_INCEPTION_SPECS["inception_5a"]), (2, 1024)),
}


@pytest.mark.parametrize("block", sorted(BLOCKS))
def test_blocks_have_the_same_values_and_gradients_with_either_implementation(block):
    """Train mode, float64; gradients with respect to every parameter and the input."""
    constructor, attributes, (side, channels) = BLOCKS[block]
    with jax.enable_x64(True):
        x = np.random.default_rng(1).standard_normal((2, side, side, channels))
        native, split = (constructor(**attributes, conv_impl=impl, dtype=jnp.float64) for impl in ("native", "cpu"))
        abstract = jax.eval_shape(lambda key, x: native.init(key, x, True), jax.random.key(0), x)
        variables = _random_variables(abstract, seed=2)

        def loss(params, x, module):
            outputs, _ = module.apply({**variables, "params": params}, x, True, mutable=["batch_stats"])
            return jnp.sum(jnp.sin(outputs)), outputs

        (native_out, native_grads), (split_out, split_grads) = (
            tiny.compile_quickly(
                lambda params, x, m=module: jax.grad(loss, argnums=(0, 1), has_aux=True)(params, x, m)[::-1],
                variables["params"],
                x,
            )(variables["params"], x)
            for module in (native, split)
        )
    np.testing.assert_allclose(split_out, native_out, rtol=1e-9, atol=1e-12)
    assert jax.tree.structure(split_grads) == jax.tree.structure(native_grads)
    for native_leaf, split_leaf in zip(jax.tree.leaves(native_grads), jax.tree.leaves(split_grads)):
        np.testing.assert_allclose(split_leaf, native_leaf, rtol=1e-7, atol=1e-10)


def test_auto_uses_the_cpu_forms_on_cpu_only():
    assert conv_forms.select("auto", backend="cpu") is conv_forms.cpu_conv
    for backend in ("gpu", "tpu"):
        assert conv_forms.select("auto", backend=backend) is None
    assert conv_forms.select("native", backend="cpu") is None
    assert conv_forms.select("cpu", backend="tpu") is conv_forms.cpu_conv


def test_unknown_implementation_is_named():
    with pytest.raises(ValueError, match="conv_impl='fast'.*auto, native, cpu"):
        conv_forms.select("fast")


# (kernel, stride, padding, dilation): 1x1 with stride, 3x3 with symmetric, asymmetric, negative and
# string padding, the 7x7 stem, a dilated 3x3 and a 2x3 kernel.
MATMUL_CASES = [
    (1, 1, ((0, 0), (0, 0)), 1), (1, 2, ((0, 0), (0, 0)), 1), (3, 1, ((1, 1), (1, 1)), 1),
    (3, 2, ((1, 1), (1, 1)), 1), (3, 2, ((2, 0), (0, 1)), 1), (3, 1, ((-1, 1), (1, 0)), 1), (3, 2, "SAME", 1),
    (3, 1, "VALID", 1), (7, 2, ((3, 3), (3, 3)), 1), (3, 1, ((2, 2), (2, 2)), 2), ((2, 3), 1, ((1, 0), (1, 1)), 1),
]


@pytest.mark.parametrize("kernel, stride, padding, dilation", MATMUL_CASES)
@pytest.mark.parametrize("layout", [("NHWC", "HWIO", "NHWC"), ("NCHW", "OIHW", "NCHW"), ("NHWC", "OIHW", "NCHW")])
def test_conv_as_matmul_equals_the_convolution(kernel, stride, padding, dilation, layout):
    """Values, input and kernel gradients against XLA's convolution, in float64 (no rounding to hide in)."""
    kernel_h, kernel_w = (kernel, kernel) if isinstance(kernel, int) else kernel
    rng = np.random.default_rng(kernel_h * 10 + stride)
    lhs_layout, rhs_layout, _ = layout
    with jax.enable_x64(True):
        x = rng.standard_normal((2, 9, 8, 5)).transpose([("NHWC").index(axis) for axis in lhs_layout])
        w = rng.standard_normal((kernel_h, kernel_w, 5, 3)).transpose([("HWIO").index(axis) for axis in rhs_layout])
        args = ((stride, stride), padding, None, (dilation, dilation), layout)
        expected_shape = jax.eval_shape(lambda x, w: lax.conv_general_dilated(x, w, *args), x, w).shape
        cotangent = rng.standard_normal(expected_shape)

        def values_and_gradients(x, w, cotangent):
            return [(f(x, w, *args), jax.grad(lambda x, w: jnp.vdot(f(x, w, *args), cotangent), argnums=(0, 1))(x, w))
                    for f in (lax.conv_general_dilated, conv_forms.conv_as_matmul)]

        (expected, native_grads), (actual, matmul_grads) = tiny.compile_quickly(
            values_and_gradients, x, w, cotangent)(x, w, cotangent)
    assert actual.shape == expected.shape == expected_shape
    np.testing.assert_allclose(actual, expected, rtol=1e-12, atol=1e-12)
    for native, matmul in zip(native_grads, matmul_grads):
        np.testing.assert_allclose(matmul, native, rtol=1e-12, atol=1e-12)


def _stablehlo(conv, side, kernel, groups=1) -> str:
    x, w = jnp.ones((2, side, side, 8)), jnp.ones((kernel, kernel, 8 // groups, 8))
    args = ((1, 1), "SAME", None, None, ("NHWC", "HWIO", "NHWC"))
    grad = jax.grad(lambda x, w: jnp.sum(conv(x, w, *args, feature_group_count=groups)), argnums=(0, 1))
    return jax.jit(grad).lower(x, w).as_text()


@pytest.mark.parametrize("side, kernel, uses_matmul", [
    (8, 1, True), (3, 1, True), (conv_forms.SMALL_OUTPUT_SIDE, 3, True), (1, 3, True),
    (conv_forms.SMALL_OUTPUT_SIDE + 1, 3, False), (8, 3, False)])
def test_cpu_conv_picks_the_matmul_for_1x1_kernels_and_small_outputs(side, kernel, uses_matmul):
    """XLA:CPU's 3x3 convolution and its gradients are 3-50x slower than the matmul on 1x1 and 2x2 outputs
    with 128-1024 channels, and as fast or faster from 4x4 up (experiments/conv_forms_speed.py)."""
    text = _stablehlo(conv_forms.cpu_conv, side, kernel)
    assert ("stablehlo.convolution" not in text) == uses_matmul
    assert ("stablehlo.dot_general" in text) == uses_matmul


@pytest.mark.parametrize("kernel, stride", [(3, 1), (3, 2), (1, 2)])
def test_cpu_conv_traces_with_symbolic_sides(kernel, stride):
    """Shape-polymorphic tracing (jax.export; the models' size checks): a symbolic side has no size to
    choose a form by, so a 3x3 layer takes XLA's convolution; the shape is the native one either way."""
    from jax import export

    (side,) = export.symbolic_shape("h", constraints=("h >= 1",))
    x = jax.ShapeDtypeStruct((2, side, side, 8), jnp.float32)
    w = jax.ShapeDtypeStruct((kernel, kernel, 8, 4), jnp.float32)
    args = ((stride, stride), ((kernel // 2, kernel // 2),) * 2, None, None, ("NHWC", "HWIO", "NHWC"))
    expected = jax.eval_shape(lambda x, w: lax.conv_general_dilated(x, w, *args), x, w)
    assert jax.eval_shape(lambda x, w: conv_forms.cpu_conv(x, w, *args), x, w).shape == expected.shape


def _kernel_grad_stablehlo(conv) -> str:
    x, w = jnp.ones((1, 8, 8, 16)), jnp.ones((3, 3, 2, 16))
    args = ((1, 1), "SAME", None, None, ("NHWC", "HWIO", "NHWC"))
    kernel_grad = jax.grad(lambda w, x: jnp.sum(conv(x, w, *args, feature_group_count=8)))
    return jax.jit(kernel_grad).lower(w, x).as_text()


def test_kernel_gradient_has_no_grouped_convolution():
    """What makes the CPU form fast: XLA's kernel gradient of a grouped conv is one convolution
    with batch_group_count (slow on CPU); the CPU form has eight ordinary convolutions instead."""
    native = _kernel_grad_stablehlo(lax.conv_general_dilated)
    cpu_form = _kernel_grad_stablehlo(conv_forms.split_grouped_conv)
    assert "batch_group_count = 8" in native
    assert native.count("stablehlo.convolution") == 1
    assert set(re.findall(r"group_count = (\d+)", cpu_form)) == {"1"}
    assert cpu_form.count("stablehlo.convolution") == 8
