"""Convolutions written in forms XLA:CPU computes fast; identical values and gradients.

`cpu_conv` picks one of three forms per layer from its shapes (`select("cpu")` gives it to flax):

**Matrix products for 1x1 kernels and small outputs** (`conv_as_matmul`). XLA:CPU's convolution and
especially its gradients are slower than the same contraction written as a `dot_general` (Eigen's
matmul) for 1x1 kernels: on a ResNet bottleneck 1x1 layer (batch 16, 28x28, 1024 -> 256 channels) the
train-mode forward and backward took about 340 ms as a convolution and about 100 ms as a matrix
product. For 3x3 kernels the same holds on outputs of at most 2x2, which is where a 32 px image's last
stages run: forward and both gradients of a 3x3 layer on a 2x2 map, 512 channels, batch 128 took
~2,200 ms as XLA's convolution and ~40 ms as the kh*kw shifted slices stacked into one matrix product
(im2col); from 4x4 outputs up XLA's convolution is as fast or faster and is kept.

**Grouped convolutions as one convolution per group** (`split_grouped_conv`). XLA:CPU has no fast
kernel for `feature_group_count > 1`. On ResNeXt's grouped 3x3 layers (32 groups) the same layer
written as 32 ordinary convolutions whose outputs are concatenated was 2.5-9x faster forwards and for
the input gradient, and 90-190x faster for the forward pass plus kernel gradient.

Timings: `experiments/conv_forms_speed.py`. GPUs and TPUs have fast native kernels and keep them
(`select`). Every form has the signature of `lax.conv_general_dilated`, so it plugs into
`flax.linen.Conv(conv_general_dilated=...)` and the parameters keep their usual shape (kh, kw,
in / groups, out): checkpoints and imported torch weights are the same either way.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax import lax

IMPLEMENTATIONS = ("auto", "native", "cpu")

# Outputs up to this side (every spatial axis) are computed as a matrix product whatever the kernel.
SMALL_OUTPUT_SIDE = 2


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


def _spatial_kernel(rhs_shape, numbers) -> list[int]:
    return [rhs_shape[axis] for axis in numbers.rhs_spec[2:]]


def _output_sides(lhs_shape, rhs_shape, numbers, window_strides, padding, rhs_dilation) -> list[int]:
    """The output's spatial sides (what `lax.conv_general_dilated` would return)."""
    window = _spatial_kernel(rhs_shape, numbers)
    dilation = tuple(rhs_dilation or (1,) * len(window))
    sides = [lhs_shape[axis] for axis in numbers.lhs_spec[2:]]
    pads = _explicit_padding(sides, window, dilation, window_strides, padding)
    return [(side + low + high - (k - 1) * d - 1) // s + 1
            for side, (low, high), k, d, s in zip(sides, pads, window, dilation, window_strides)]


def _explicit_padding(sides, window, dilation, window_strides, padding) -> list[tuple[int, int]]:
    if isinstance(padding, str):
        dilated_window = [(k - 1) * d + 1 for k, d in zip(window, dilation)]
        return lax.padtype_to_pads(sides, dilated_window, window_strides, padding)
    return [tuple(pad) for pad in padding]


def conv_as_matmul(lhs: jax.Array, rhs: jax.Array, window_strides, padding, lhs_dilation=None,
                   rhs_dilation=None, dimension_numbers=None, feature_group_count: int = 1,
                   precision=None, preferred_element_type=None, **kwargs) -> jax.Array:
    """`lax.conv_general_dilated` as one matrix product over the kernel's taps (im2col).

    Each of the kh*kw kernel taps reads a strided slice of the padded input; the slices are stacked
    along the feature axis, tap-major, and contracted with the kernel reshaped to (kh*kw*in, out). A 1x1
    kernel is a single slice. Grouped and input-dilated (transposed) convolutions are passed to
    `lax.conv_general_dilated` unchanged.
    """
    if feature_group_count != 1 or any(d != 1 for d in (lhs_dilation or ())) or kwargs:
        return lax.conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation,
                                        dimension_numbers, feature_group_count=feature_group_count,
                                        precision=precision, preferred_element_type=preferred_element_type,
                                        **kwargs)
    numbers = lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
    spatial_axes, feature_axis = numbers.lhs_spec[2:], numbers.lhs_spec[1]
    window = _spatial_kernel(rhs.shape, numbers)
    dilation = tuple(rhs_dilation or (1,) * len(window))
    pads = _explicit_padding([lhs.shape[axis] for axis in spatial_axes], window, dilation, window_strides, padding)
    config = [(0, 0, 0)] * lhs.ndim
    for axis, (low, high) in zip(spatial_axes, pads):
        config[axis] = (low, high, 0)
    padded = lax.pad(lhs, jnp.zeros((), lhs.dtype), config)  # negative padding crops, as in XLA
    out_sides = [(padded.shape[axis] - (k - 1) * d - 1) // stride + 1
                 for axis, k, d, stride in zip(spatial_axes, window, dilation, window_strides)]
    taps = []
    for offsets in itertools.product(*(range(k) for k in window)):
        start, limit, strides = [0] * lhs.ndim, list(padded.shape), [1] * lhs.ndim
        for axis, offset, d, stride, side in zip(spatial_axes, offsets, dilation, window_strides, out_sides):
            start[axis], limit[axis], strides[axis] = offset * d, offset * d + (side - 1) * stride + 1, stride
        taps.append(lax.slice(padded, start, limit, strides))
    patches = taps[0] if len(taps) == 1 else jnp.concatenate(taps, axis=feature_axis)
    # (kh, kw, in, out) flattened: row (tap * in + channel) matches the patches' feature order.
    kernel_hwio = jnp.transpose(rhs, (*numbers.rhs_spec[2:], numbers.rhs_spec[1], numbers.rhs_spec[0]))
    kernel = kernel_hwio.reshape(-1, kernel_hwio.shape[-1])
    product = lax.dot_general(patches, kernel, (((feature_axis,), (0,)), ((), ())),
                              precision=precision, preferred_element_type=preferred_element_type)
    lhs_order = [axis for axis in range(lhs.ndim) if axis != feature_axis] + [feature_axis]
    # Axis i of `product` holds lhs axis lhs_order[i]; put each where out_spec wants that role.
    role_of_lhs_axis = {axis: role for role, axis in enumerate(numbers.lhs_spec)}
    position_of_role = {role: axis for role, axis in enumerate(numbers.out_spec)}
    permutation = [0] * lhs.ndim
    for index, lhs_axis in enumerate(lhs_order):
        permutation[position_of_role[role_of_lhs_axis[lhs_axis]]] = index
    return jnp.transpose(product, permutation)


def cpu_conv(lhs: jax.Array, rhs: jax.Array, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
             dimension_numbers=None, feature_group_count: int = 1, **kwargs) -> jax.Array:
    """`lax.conv_general_dilated` in the form XLA:CPU computes fastest for this layer's shapes.

    Grouped: one XLA convolution per group (`split_grouped_conv`; ResNeXt-50's 4-32-channel groups were
    no faster as matrix products on small maps). 1x1 kernels, and any kernel whose output is at most
    `SMALL_OUTPUT_SIDE` on every side: `conv_as_matmul`. Anything else: XLA's convolution, which is as
    fast or faster from 4x4 outputs up.
    """
    args = (window_strides, padding, lhs_dilation, rhs_dilation, dimension_numbers)
    if feature_group_count > 1:
        return split_grouped_conv(lhs, rhs, *args, feature_group_count=feature_group_count, **kwargs)
    numbers = lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
    pointwise = all(k == 1 for k in _spatial_kernel(rhs.shape, numbers))
    sides = _output_sides(lhs.shape, rhs.shape, numbers, window_strides, padding, rhs_dilation)
    # A symbolic side (shape-polymorphic tracing, jax.export) has no size to decide by: XLA's form.
    small = all(isinstance(side, int) for side in sides) and max(sides) <= SMALL_OUTPUT_SIDE
    if pointwise or small:
        return conv_as_matmul(lhs, rhs, *args, **kwargs)
    return lax.conv_general_dilated(lhs, rhs, *args, **kwargs)


def select(implementation: str, *, backend: str | None = None) -> Callable | None:
    """The convolution function to give `flax.linen.Conv` (its `conv_general_dilated`).

    Args:
      implementation: "native" (XLA's convolutions throughout), "cpu" (the forms of this module)
        or "auto": "cpu" on CPU, "native" on GPU and TPU, which have fast native kernels.
      backend: the platform to decide for; default `jax.default_backend()`.

    Returns:
      For "cpu": `cpu_conv`, which picks the form per layer from its shapes. For "native": None, which makes flax use
      `lax.conv_general_dilated`.
    """
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"conv_impl={implementation!r} is invalid: expected one of {', '.join(IMPLEMENTATIONS)}")
    if implementation == "auto":
        implementation = "cpu" if (backend or jax.default_backend()) == "cpu" else "native"
    if implementation == "native":
        return None
    return cpu_conv
