"""BN-Inception (Ioffe & Szegedy 2015), laid out like the common PyTorch port.

The port is Cadene's `pretrainedmodels` `bninception` (converted from Caffe):
every conv has a bias and is followed by an affine BatchNorm (eps 1e-5) and a
ReLU. Names follow the port so its weights map one-to-one:

    port                        here (params / batch_stats path)
    conv1_7x7_s2, ..._bn        conv1_7x7_s2/conv, conv1_7x7_s2/bn
    inception_3a_1x1, ..._bn    inception_3a/1x1/conv, inception_3a/1x1/bn
    inception_3a_pool_proj      inception_3a/pool_proj/conv (and /bn)
    last_linear                 last_linear

Two deliberate differences from the port, both so that every input size
works (the port only runs at 224):
  * global average pooling instead of the fixed 7x7 average pool;
  * stride-2 max pools use "SAME" padding instead of ceil_mode. At even sizes
    that pads (0, 1), which is exactly torch's ceil_mode result; at odd sizes
    it pads (1, 1) and yields ceil(H/2), the size the stride-2 conv branches
    of the reduction blocks produce, so their outputs can be concatenated.

Input: NHWC float images, already normalised, sides >= 32. Output: pooled
features (B, 1024) float32, or logits (B, num_classes) float32.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import flax.linen as nn
import jax.numpy as jnp

from jaxembed.models import conv_forms
from jaxembed.models.stems import SMALL_STEM_STRIDES
from jaxembed.models.taps import backbone_output, check_tap

FEATURE_DIM = 1024


class ConvBNReLU(nn.Module):
    """Conv (with bias, as in the port) -> BatchNorm -> ReLU.

    (B, H, W, C) -> (B, H', W', features) in `dtype`; H' = floor((H + 2p - k) / s) + 1.
    """

    features: int
    kernel: int = 1
    stride: int = 1
    padding: int = 0
    conv_impl: str = "auto"
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool):
        pad = (self.padding, self.padding)
        x = nn.Conv(
            self.features,
            (self.kernel, self.kernel),
            strides=(self.stride, self.stride),
            padding=(pad, pad),  # explicit and symmetric, like torch
            use_bias=True,
            conv_general_dilated=conv_forms.select(self.conv_impl),
            dtype=self.dtype,
            param_dtype=jnp.float32,
            name="conv",
        )(x)
        x = nn.BatchNorm(
            use_running_average=not train,
            momentum=0.9,  # torch momentum 0.1
            epsilon=1e-5,
            dtype=self.dtype,
            param_dtype=jnp.float32,
            name="bn",
        )(x)
        return nn.relu(x)


def _max_pool_s2(x):
    """3x3/2 max pool; "SAME" gives ceil(H/2), see the module docstring."""
    return nn.max_pool(x, (3, 3), strides=(2, 2), padding="SAME")


class InceptionSpec(NamedTuple):
    """Channel widths of one inception block; 0 for an absent branch/conv.

    pool: "avg" or "max" (3x3/1 pad 1, then a 1x1 `pool_proj`), or "max_s2" for
    the reduction blocks (3x3/2 max pool passed through unprojected; there the
    3x3 and double-3x3 branches also end with stride 2 and there is no 1x1).
    """

    conv1x1: int
    reduce3x3: int
    conv3x3: int
    reduce_double3x3: int
    double3x3: int
    pool: str
    pool_proj: int


class InceptionBlock(nn.Module):
    """One BN-Inception block: channel concat of its branches, in the port's order.

    (B, H, W, C) -> (B, H, W, C_out), or (B, ceil(H/2), ceil(W/2), C_out) for
    the reduction blocks (pool == "max_s2").
    """

    spec: InceptionSpec
    conv_impl: str = "auto"
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool):
        # `train` is positional so nn.remat can mark it static (argnum 2, counting self).
        s = self.spec
        reduction = s.pool == "max_s2"
        stride = 2 if reduction else 1

        def conv(features, name, kernel=1, stride=1):
            return ConvBNReLU(
                features, kernel=kernel, stride=stride, padding=kernel // 2, conv_impl=self.conv_impl,
                dtype=self.dtype, name=name,
            )

        branches = []
        if s.conv1x1:
            branches.append(conv(s.conv1x1, "1x1")(x, train))

        y = conv(s.reduce3x3, "3x3_reduce")(x, train)
        branches.append(conv(s.conv3x3, "3x3", kernel=3, stride=stride)(y, train))

        y = conv(s.reduce_double3x3, "double_3x3_reduce")(x, train)
        y = conv(s.double3x3, "double_3x3_1", kernel=3)(y, train)
        branches.append(conv(s.double3x3, "double_3x3_2", kernel=3, stride=stride)(y, train))

        if reduction:
            branches.append(_max_pool_s2(x))
        else:
            if s.pool == "avg":
                # torch AvgPool2d default count_include_pad=True: border windows divide by 9.
                y = nn.avg_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)), count_include_pad=True)
            elif s.pool == "max":
                y = nn.max_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)))
            else:
                raise ValueError(f"unknown pool kind {s.pool!r}")
            branches.append(conv(s.pool_proj, "pool_proj")(y, train))
        return jnp.concatenate(branches, axis=-1)


# name: (1x1, 3x3_reduce, 3x3, double_3x3_reduce, double_3x3, pool, pool_proj) -> output channels
INCEPTION_BLOCKS: tuple[tuple[str, InceptionSpec], ...] = (
    ("inception_3a", InceptionSpec(64, 64, 64, 64, 96, "avg", 32)),  # 256
    ("inception_3b", InceptionSpec(64, 64, 96, 64, 96, "avg", 64)),  # 320
    ("inception_3c", InceptionSpec(0, 128, 160, 64, 96, "max_s2", 0)),  # 160+96+320 = 576
    ("inception_4a", InceptionSpec(224, 64, 96, 96, 128, "avg", 128)),  # 576
    ("inception_4b", InceptionSpec(192, 96, 128, 96, 128, "avg", 128)),  # 576
    ("inception_4c", InceptionSpec(160, 128, 160, 128, 160, "avg", 128)),  # 608
    ("inception_4d", InceptionSpec(96, 128, 192, 160, 192, "avg", 128)),  # 608
    ("inception_4e", InceptionSpec(0, 128, 192, 192, 256, "max_s2", 0)),  # 192+256+608 = 1056
    ("inception_5a", InceptionSpec(352, 192, 320, 160, 224, "avg", 128)),  # 1024
    ("inception_5b", InceptionSpec(352, 192, 320, 192, 224, "max", 128)),  # 1024
)


class InceptionBN(nn.Module):
    """BN-Inception backbone with optional `last_linear` classifier.

    Attributes:
      num_classes: if set, a Dense `last_linear` maps pooled features to logits.
      remat: recompute each inception block's activations in the backward pass.
      conv_impl: "auto" (on CPU the faster forms of `conv_forms`, elsewhere XLA's convolutions),
        "native" or "cpu". Same parameters and outputs either way.
      dtype: computation dtype; parameters are always float32.
      stem: "imagenet" (7x7/2 convolution and max-pool before conv2: 1/8 resolution into inception_3a)
        "small" (a 3x3 stride-1 convolution `conv1_3x3_s1`, no first max-pool: 1/2) or "small_s2"
        (`conv1_3x3_s2`, stride 2: 1/4), for 32-64 px (`jaxembed.models.stems`).
      tap: the name of an inception block (`block_names()`) whose output map is also returned.

    `__call__(x, train=False)`: x (B, H, W, 3) float -> (B, 1024) float32
    features, or (B, num_classes) float32 logits; with `tap`, `(those, the block's (B, h, w, C) map)`.
    """

    num_classes: int | None = None
    remat: bool = False
    conv_impl: str = "auto"
    dtype: Any = jnp.float32
    stem: str = "imagenet"
    tap: str | None = None

    def block_names(self) -> tuple[str, ...]:
        return tuple(name for name, _ in INCEPTION_BLOCKS)

    @nn.compact
    def __call__(self, x, train: bool = False):
        check_tap(self.tap, self.block_names(), "inception_bn")
        block_cls = nn.remat(InceptionBlock, static_argnums=(2,)) if self.remat else InceptionBlock

        if self.stem in SMALL_STEM_STRIDES:
            stride = SMALL_STEM_STRIDES[self.stem]
            x = ConvBNReLU(64, kernel=3, stride=stride, padding=1, conv_impl=self.conv_impl, dtype=self.dtype,
                           name=f"conv1_3x3_s{stride}")(x, train)
        else:
            x = ConvBNReLU(64, kernel=7, stride=2, padding=3, conv_impl=self.conv_impl, dtype=self.dtype,
                           name="conv1_7x7_s2")(x, train)
            x = _max_pool_s2(x)
        x = ConvBNReLU(64, conv_impl=self.conv_impl, dtype=self.dtype, name="conv2_3x3_reduce")(x, train)
        x = ConvBNReLU(192, kernel=3, padding=1, conv_impl=self.conv_impl, dtype=self.dtype, name="conv2_3x3")(x, train)
        x = _max_pool_s2(x)

        tapped = None
        for name, spec in INCEPTION_BLOCKS:
            x = block_cls(spec=spec, conv_impl=self.conv_impl, dtype=self.dtype, name=name)(x, train)
            tapped = x if name == self.tap else tapped

        return backbone_output(x, tapped, tap=self.tap, num_classes=self.num_classes, classifier_name="last_linear")
