"""Convolutions written in forms XLA:CPU computes fast; identical values and gradients.

**1x1 convolutions as matrix products.** XLA:CPU's 1x1 convolution and especially its gradients are
slower than the same contraction written as a `dot_general` (Eigen's matmul): on a ResNet bottleneck
1x1 layer (batch 16, 28x28, 1024 -> 256 channels) the train-mode forward and backward took about
340 ms as a convolution and about 100 ms as a matrix product. A 1x1 conv with stride s is a strided
slice followed by that product (`pointwise_conv_as_matmul`).

**Grouped convolutions as one convolution per group.** XLA:CPU has no fast kernel for
`feature_group_count > 1`. On ResNeXt's grouped 3x3 layers (32 groups) the same layer written as 32
ordinary convolutions whose outputs are concatenated was 2.5-9x faster forwards and for the input
gradient, and 90-190x faster for the forward pass plus kernel gradient
(`experiments/conv_forms_speed.py`). GPUs and TPUs have native grouped kernels and keep them (`select`).

Both forms have the signature of `lax.conv_general_dilated`, so they plug into
`flax.linen.Conv(conv_general_dilated=...)` and the parameters keep their usual grouped shape
(kh, kw, in / groups, out): checkpoints and imported torch weights are the same either way.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax import lax

IMPLEMENTATIONS = ("auto", "native", "cpu")


def split_grouped_conv(
    lhs: jax.Array,
    rhs: jax.Array,
    window_strides,
    padding,
    lhs_dilation=None,
    rhs_dilation=None,
    dimension_numbers=None,
    feature_group_count: int = 1,
    **kwargs,
) -> jax.Array:
    """`lax.conv_general_dilated`, computed group by group.

    Group g convolves input channels [g*Ci, (g+1)*Ci) with output channels
    [g*Co, (g+1)*Co) of the kernel, exactly the definition of a grouped convolution.
    """
    convolve = lambda x, w, groups: lax.conv_general_dilated(
        x, w, window_strides, padding, lhs_dilation, rhs_dilation, dimension_numbers,
        feature_group_count=groups, **kwargs,
    )
    if feature_group_count == 1:
        return convolve(lhs, rhs, 1)
    numbers = lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
    lhs_feature_axis = numbers.lhs_spec[1]
    rhs_output_axis = numbers.rhs_spec[0]
    out_feature_axis = numbers.out_spec[1]
    inputs = jnp.split(lhs, feature_group_count, axis=lhs_feature_axis)
    kernels = jnp.split(rhs, feature_group_count, axis=rhs_output_axis)
    return jnp.concatenate([convolve(x, w, 1) for x, w in zip(inputs, kernels)], axis=out_feature_axis)


def _is_pointwise(rhs_shape, numbers, padding, lhs_dilation, rhs_dilation, feature_group_count) -> bool:
    spatial_kernel = [rhs_shape[axis] for axis in numbers.rhs_spec[2:]]
    no_padding = not isinstance(padding, str) and all(tuple(pad) == (0, 0) for pad in padding)
    undilated = all(d == 1 for d in (lhs_dilation or ())) and all(d == 1 for d in (rhs_dilation or ()))
    return all(k == 1 for k in spatial_kernel) and no_padding and undilated and feature_group_count == 1


def pointwise_conv_as_matmul(lhs: jax.Array, rhs: jax.Array, window_strides, padding, lhs_dilation=None,
                             rhs_dilation=None, dimension_numbers=None, feature_group_count: int = 1,
                             precision=None, preferred_element_type=None, **kwargs) -> jax.Array:
    """`lax.conv_general_dilated` for 1x1 kernels as a strided slice and a `dot_general`.

    Any other convolution (larger kernels, padding, dilation, groups) is passed to
    `lax.conv_general_dilated` unchanged.
    """
    numbers = lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
    if not _is_pointwise(rhs.shape, numbers, padding, lhs_dilation, rhs_dilation, feature_group_count):
        return lax.conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation,
                                        dimension_numbers, feature_group_count=feature_group_count,
                                        precision=precision, preferred_element_type=preferred_element_type,
                                        **kwargs)
    # A 1x1 kernel with stride s reads every s-th position and nothing else.
    strides = [1] * lhs.ndim
    for axis, stride in zip(numbers.lhs_spec[2:], window_strides):
        strides[axis] = stride
    if any(stride != 1 for stride in strides):
        lhs = lax.slice(lhs, [0] * lhs.ndim, lhs.shape, strides)
    # Contract the input features; the result has lhs's other axes in order, then the output features.
    kernel = jnp.squeeze(rhs, axis=tuple(numbers.rhs_spec[2:]))  # (in, out) or (out, in)
    in_axis_of_kernel = 0 if numbers.rhs_spec[1] < numbers.rhs_spec[0] else 1
    product = lax.dot_general(lhs, kernel, (((numbers.lhs_spec[1],), (in_axis_of_kernel,)), ((), ())),
                              precision=precision, preferred_element_type=preferred_element_type)
    lhs_order = [axis for axis in range(lhs.ndim) if axis != numbers.lhs_spec[1]] + [numbers.lhs_spec[1]]
    # Axis i of `product` holds lhs axis lhs_order[i]; put each where out_spec wants that role.
    role_of_lhs_axis = {axis: role for role, axis in enumerate(numbers.lhs_spec)}
    position_of_role = {role: axis for role, axis in enumerate(numbers.out_spec)}
    permutation = [0] * lhs.ndim
    for index, lhs_axis in enumerate(lhs_order):
        permutation[position_of_role[role_of_lhs_axis[lhs_axis]]] = index
    return jnp.transpose(product, permutation)


def select(implementation: str, *, groups: int = 1, backend: str | None = None) -> Callable | None:
    """The convolution function to give `flax.linen.Conv` (its `conv_general_dilated`).

    Args:
      implementation: "native" (XLA's convolutions throughout), "cpu" (the forms of this module)
        or "auto": "cpu" on CPU, "native" on GPU and TPU, which have fast native kernels.
      groups: the layer's feature_group_count.
      backend: the platform to decide for; default `jax.default_backend()`.

    Returns:
      For "cpu": `split_grouped_conv` for grouped layers, else `pointwise_conv_as_matmul`
      (which passes anything but a 1x1 conv to XLA). For "native": None, which makes flax use
      `lax.conv_general_dilated`.
    """
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"conv_impl={implementation!r} is invalid: expected one of {', '.join(IMPLEMENTATIONS)}")
    if implementation == "auto":
        implementation = "cpu" if (backend or jax.default_backend()) == "cpu" else "native"
    if implementation == "native":
        return None
    return split_grouped_conv if groups > 1 else pointwise_conv_as_matmul
