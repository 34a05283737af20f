"""The CPU path for grouped convolutions equals XLA's grouped convolution, values and gradients."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from jaxembed.models import grouped_conv, resnet


def _native(x, w, strides, padding, groups, dimension_numbers, rhs_dilation=None):
    return lax.conv_general_dilated(x, w, strides, padding, rhs_dilation=rhs_dilation,
                                    dimension_numbers=dimension_numbers, feature_group_count=groups)


def _split(x, w, strides, padding, groups, dimension_numbers, rhs_dilation=None):
    return grouped_conv.split_grouped_conv(x, w, strides, padding, rhs_dilation=rhs_dilation,
                                           dimension_numbers=dimension_numbers, feature_group_count=groups)


def _split_kernel_grad(x, w, strides, padding, groups, dimension_numbers, rhs_dilation=None):
    return grouped_conv.grouped_conv_split_kernel_grad(
        x, w, strides, padding, rhs_dilation=rhs_dilation, dimension_numbers=dimension_numbers,
        feature_group_count=groups)


@pytest.mark.parametrize(
    "groups, in_per_group, out_per_group, stride, dilation",
    [(32, 4, 4, 1, 1), (32, 2, 2, 2, 1), (4, 3, 5, 1, 2), (2, 8, 1, 2, 1), (1, 6, 6, 1, 1)],
)
@pytest.mark.parametrize("layout", ["NHWC", "NCHW"])
@pytest.mark.parametrize("implementation", [_split, _split_kernel_grad], ids=["split", "split_kernel_grad"])
def test_cpu_forms_equal_native_values_and_gradients(groups, in_per_group, out_per_group, stride, dilation, layout,
                                                     implementation):
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
    actual = implementation(x, w, *args)
    np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=1e-5)

    # A random cotangent checks every output position and channel of the gradients.
    cotangent = rng.standard_normal(expected.shape).astype(np.float32)
    grads = [jax.grad(lambda x, w, f=f: jnp.vdot(f(x, w, *args), cotangent), argnums=(0, 1))(x, w)
             for f in (_native, implementation)]
    for native, split in zip(*grads):
        np.testing.assert_allclose(split, native, rtol=1e-4, atol=1e-4)


def test_resnext_is_the_same_function_with_either_implementation():
    """Whole-network values and gradients in train mode.

    Computed in float64: batch norm over a batch of 2 at 1x1 spatial size amplifies float32
    rounding by orders of magnitude, which would hide what is compared here.
    """
    with jax.enable_x64(True):
        x = np.random.default_rng(0).standard_normal((2, 32, 32, 3))
        native = resnet.ResNeXt50_32x4d(num_classes=5, grouped_conv="native", dtype=jnp.float64)
        split = resnet.ResNeXt50_32x4d(num_classes=5, grouped_conv="split_kernel_grad", dtype=jnp.float64)
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


def test_auto_splits_the_kernel_gradient_on_cpu_only():
    cpu_form = grouped_conv.grouped_conv_split_kernel_grad
    assert grouped_conv.for_backend("auto", backend="cpu") is cpu_form
    assert grouped_conv.for_backend("auto", backend="gpu") is None
    assert grouped_conv.for_backend("auto", backend="tpu") is None
    assert grouped_conv.for_backend("native", backend="cpu") is None
    assert grouped_conv.for_backend("split_kernel_grad", backend="tpu") is cpu_form


def test_unknown_implementation_is_named():
    with pytest.raises(ValueError, match="grouped_conv='fast'.*auto, native, split_kernel_grad"):
        grouped_conv.for_backend("fast")


def _kernel_grad_stablehlo(conv) -> str:
    x, w = jnp.ones((1, 8, 8, 16)), jnp.ones((3, 3, 2, 16))
    args = ((1, 1), "SAME", None, None, ("NHWC", "HWIO", "NHWC"))
    kernel_grad = jax.grad(lambda w, x: jnp.sum(conv(x, w, *args, feature_group_count=8)))
    return jax.jit(kernel_grad).lower(w, x).as_text()


def test_kernel_gradient_has_no_grouped_convolution():
    """What makes the CPU form fast: XLA's kernel gradient of a grouped conv is one convolution
    with batch_group_count (slow on CPU); the CPU form has eight ordinary convolutions instead."""
    native = _kernel_grad_stablehlo(lax.conv_general_dilated)
    cpu_form = _kernel_grad_stablehlo(grouped_conv.grouped_conv_split_kernel_grad)
    assert "batch_group_count = 8" in native
    assert native.count("stablehlo.convolution") == 1
    assert set(re.findall(r"group_count = (\d+)", cpu_form)) == {"1"}
    assert cpu_form.count("stablehlo.convolution") == 8
