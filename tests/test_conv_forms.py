"""The CPU forms of convolutions equal XLA's convolutions, in values and gradients."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from jaxembed.models import conv_forms, inception_bn, resnet


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

    expected = _native(x, w, *args)
    actual = _split(x, w, *args)
    np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=1e-5)

    # A random cotangent checks every output position and channel of the gradients.
    cotangent = rng.standard_normal(expected.shape).astype(np.float32)
    grads = [jax.grad(lambda x, w, f=f: jnp.vdot(f(x, w, *args), cotangent), argnums=(0, 1))(x, w)
             for f in (_native, _split)]
    for native, split in zip(*grads):
        np.testing.assert_allclose(split, native, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("constructor", [resnet.ResNeXt50_32x4d, inception_bn.InceptionBN], ids=["resnext50", "inception_bn"])
def test_networks_are_the_same_function_with_either_implementation(constructor):
    """Whole-network values and gradients in train mode.

    Computed in float64: batch norm over a batch of 2 at 1x1 spatial size amplifies float32
    rounding by orders of magnitude, which would hide what is compared here.
    """
    with jax.enable_x64(True):
        x = np.random.default_rng(0).standard_normal((2, 48, 48, 3))
        native = constructor(num_classes=5, conv_impl="native", dtype=jnp.float64)
        split = constructor(num_classes=5, conv_impl="cpu", dtype=jnp.float64)
        variables = native.init(jax.random.key(0), x)
        # Same parameter tree: checkpoints and imported weights do not depend on the choice.
        assert jax.tree.structure(split.init(jax.random.key(0), x)) == jax.tree.structure(variables)
        params = jax.tree.map(lambda leaf: leaf.astype(jnp.float64), variables["params"])

        def loss(params, module):
            outputs, _ = module.apply({**variables, "params": params}, x, train=True, mutable=["batch_stats"])
            return jnp.sum(jnp.sin(outputs)), outputs

        native_out, native_grads = jax.value_and_grad(loss, has_aux=True)(params, native)
        split_out, split_grads = jax.value_and_grad(loss, has_aux=True)(params, split)
    np.testing.assert_allclose(split_out[1], native_out[1], rtol=1e-9, atol=1e-12)
    assert jax.tree.structure(split_grads) == jax.tree.structure(native_grads)
    for native_leaf, split_leaf in zip(jax.tree.leaves(native_grads), jax.tree.leaves(split_grads)):
        np.testing.assert_allclose(split_leaf, native_leaf, rtol=1e-7, atol=1e-10)


def test_auto_uses_the_cpu_forms_on_cpu_only():
    assert conv_forms.select("auto", groups=32, backend="cpu") is conv_forms.split_grouped_conv
    assert conv_forms.select("auto", backend="cpu") is conv_forms.pointwise_conv_as_matmul
    for backend in ("gpu", "tpu"):
        assert conv_forms.select("auto", groups=32, backend=backend) is None
        assert conv_forms.select("auto", backend=backend) is None
    assert conv_forms.select("native", groups=32, backend="cpu") is None
    assert conv_forms.select("cpu", backend="tpu") is conv_forms.pointwise_conv_as_matmul


def test_unknown_implementation_is_named():
    with pytest.raises(ValueError, match="conv_impl='fast'.*auto, native, cpu"):
        conv_forms.select("fast")


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("layout", [("NHWC", "HWIO", "NHWC"), ("NCHW", "OIHW", "NCHW"), ("NHWC", "OIHW", "NCHW")])
def test_pointwise_as_matmul_equals_the_convolution(stride, layout):
    rng = np.random.default_rng(stride)
    lhs_layout, rhs_layout, _ = layout
    x = rng.standard_normal((2, 7, 6, 5)).astype(np.float32)  # NHWC
    w = rng.standard_normal((1, 1, 5, 3)).astype(np.float32)  # HWIO
    x = x.transpose([("NHWC").index(axis) for axis in lhs_layout])
    w = w.transpose([("HWIO").index(axis) for axis in rhs_layout])
    args = ((stride, stride), ((0, 0), (0, 0)), None, None, layout)
    expected = lax.conv_general_dilated(x, w, *args)
    actual = conv_forms.pointwise_conv_as_matmul(x, w, *args)
    assert actual.shape == expected.shape
    np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=1e-5)
    cotangent = rng.standard_normal(expected.shape).astype(np.float32)
    grads = [jax.grad(lambda x, w, f=f: jnp.vdot(f(x, w, *args), cotangent), argnums=(0, 1))(x, w)
             for f in (lax.conv_general_dilated, conv_forms.pointwise_conv_as_matmul)]
    for native, matmul in zip(*grads):
        np.testing.assert_allclose(matmul, native, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kernel, padding", [(3, ((1, 1), (1, 1))), (1, ((1, 0), (0, 0))), (1, "SAME")])
def test_pointwise_form_passes_other_convolutions_to_xla(kernel, padding):
    x = jnp.asarray(np.random.default_rng(0).standard_normal((1, 6, 6, 4)), jnp.float32)
    w = jnp.ones((kernel, kernel, 4, 2))
    args = ((1, 1), padding, None, None, ("NHWC", "HWIO", "NHWC"))
    np.testing.assert_allclose(conv_forms.pointwise_conv_as_matmul(x, w, *args),
                               lax.conv_general_dilated(x, w, *args), rtol=1e-6)
    text = jax.jit(lambda x, w: conv_forms.pointwise_conv_as_matmul(x, w, *args)).lower(x, w).as_text()
    assert "stablehlo.convolution" in text


def test_pointwise_form_is_a_dot_not_a_convolution():
    x, w = jnp.ones((2, 8, 8, 16)), jnp.ones((1, 1, 16, 32))
    args = ((2, 2), ((0, 0), (0, 0)), None, None, ("NHWC", "HWIO", "NHWC"))
    text = jax.jit(jax.grad(lambda w: jnp.sum(conv_forms.pointwise_conv_as_matmul(x, w, *args)))).lower(w).as_text()
    assert "stablehlo.convolution" not in text
    assert "stablehlo.dot_general" in text


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
