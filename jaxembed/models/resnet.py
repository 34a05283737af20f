"""Bottleneck ResNet and ResNeXt, laid out exactly like torchvision.

One generic module, `ResNet`, gives every variant: ResNeXt differs from ResNet
only in the width and group count of the 3x3 convolution of each bottleneck
(timm calls these `cardinality` and `base_width`). The layer order, padding and
parameter shapes follow torchvision's `resnet.py` so that a torchvision
state dict maps one-to-one onto these parameters:

    torchvision                 here (params / batch_stats path)
    conv1, bn1                  stem_conv, stem_bn
    layer{s}.{b}.conv{k}        stage{s}_block{b}/conv{k}
    layer{s}.{b}.bn{k}          stage{s}_block{b}/bn{k}
    layer{s}.{b}.downsample.0   stage{s}_block{b}/downsample_conv
    layer{s}.{b}.downsample.1   stage{s}_block{b}/downsample_bn
    fc                          classifier

Conv kernels are HWIO here (torch: OIHW) and Dense kernels are (in, out)
(torch: (out, in)); BN running_mean/var live in `batch_stats` as mean/var.

Input: NHWC float images, already normalised, any size whose sides are at
least 32 (the network downsamples by 32). Output: globally average-pooled
features (B, 2048) float32, or logits (B, num_classes) float32.
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp

from jaxembed.models import conv_forms
from jaxembed.models.stems import SMALL_STEM_STRIDES
from jaxembed.models.taps import backbone_output, check_tap

FEATURE_DIM = 2048  # 512 planes * bottleneck expansion 4

# torchvision initialises convs with kaiming_normal_(mode="fan_out", nonlinearity="relu").
# Flax computes fan_out of a grouped HWIO kernel as kh*kw*out, the same as torch.
_conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


def _batch_norm(train: bool, dtype: Any, name: str, scale_init=nn.initializers.ones) -> nn.BatchNorm:
    """BatchNorm with torch's defaults: torch momentum 0.1 is flax momentum 0.9, eps 1e-5."""
    return nn.BatchNorm(
        use_running_average=not train,
        momentum=0.9,
        epsilon=1e-5,
        dtype=dtype,
        param_dtype=jnp.float32,
        scale_init=scale_init,
        name=name,
    )


def _conv(
    features: int, kernel: int, stride: int, padding: int, dtype: Any, name: str, groups: int = 1,
    conv_impl: str = "auto",
) -> nn.Conv:
    """Bias-free conv with explicit symmetric padding (torch semantics, unlike "SAME").

    `conv_impl` picks how the convolution is computed (see `conv_forms.select`); the parameters
    are the same either way.
    """
    return nn.Conv(
        features,
        (kernel, kernel),
        strides=(stride, stride),
        padding=((padding, padding), (padding, padding)),
        feature_group_count=groups,
        conv_general_dilated=conv_forms.select(conv_impl),
        use_bias=False,
        kernel_init=_conv_init,
        dtype=dtype,
        param_dtype=jnp.float32,
        name=name,
    )


class Bottleneck(nn.Module):
    """torchvision's Bottleneck (ResNet v1.5: the stride sits on the 3x3 conv).

    (B, H, W, C_in) -> (B, ceil(H/stride), ceil(W/stride), planes * 4), in `dtype`.
    """

    planes: int
    stride: int = 1
    groups: int = 1
    base_width: int = 64
    zero_init_residual: bool = True
    conv_impl: str = "auto"
    dtype: Any = jnp.float32

    expansion = 4

    @nn.compact
    def __call__(self, x, train: bool):
        # `train` is positional so nn.remat can mark it static (argnum 2, counting self).
        width = int(self.planes * self.base_width / 64) * self.groups
        out_channels = self.planes * self.expansion
        # Zero-initialising the last BN scale makes every block start as the
        # identity, which helps large-batch training (Goyal et al. 2017).
        last_scale_init = nn.initializers.zeros if self.zero_init_residual else nn.initializers.ones

        conv = functools.partial(_conv, dtype=self.dtype, conv_impl=self.conv_impl)
        y = conv(width, 1, 1, 0, name="conv1")(x)
        y = nn.relu(_batch_norm(train, self.dtype, "bn1")(y))
        y = conv(width, 3, self.stride, 1, name="conv2", groups=self.groups)(y)
        y = nn.relu(_batch_norm(train, self.dtype, "bn2")(y))
        y = conv(out_channels, 1, 1, 0, name="conv3")(y)
        y = _batch_norm(train, self.dtype, "bn3", scale_init=last_scale_init)(y)

        shortcut = x
        if self.stride != 1 or x.shape[-1] != out_channels:
            shortcut = conv(out_channels, 1, self.stride, 0, name="downsample_conv")(x)
            shortcut = _batch_norm(train, self.dtype, "downsample_bn")(shortcut)
        return nn.relu(y + shortcut)


class ResNet(nn.Module):
    """Generic bottleneck ResNet / ResNeXt.

    Attributes:
      stage_sizes: number of bottleneck blocks in each of the four stages.
      groups: groups of the 3x3 convs (ResNeXt cardinality; 1 for ResNet).
      base_width: channels per group per 64 planes (ResNeXt "d"; 64 for ResNet).
      num_classes: if set, a Dense `classifier` maps pooled features to logits.
      zero_init_residual: zero-init the last BN scale of each block (init only).
      remat: recompute each block's activations in the backward pass.
      conv_impl: "auto" (on CPU the faster forms of `conv_forms`, elsewhere XLA's convolutions),
        "native" or "cpu". Same parameters and outputs either way.
      dtype: computation dtype; parameters are always float32.
      stem: "imagenet" (7x7/2 convolution and 3x3/2 max-pool: 1/4 resolution into stage 1), "small"
        (one 3x3 stride-1 convolution, no pool: full resolution) or "small_s2" (3x3 stride 2: 1/2), for
        32-64 px images, where the ImageNet stem leaves stage 4 with a 1x1 map whose 3x3 convolutions
        see only their centre tap (`jaxembed.models.stems`).
      tap: the name of a block (`block_names()`, e.g. "stage3_block5") whose output map is also returned.

    `__call__(x, train=False)`: x (B, H, W, 3) float -> (B, 2048) float32
    features, or (B, num_classes) float32 logits; with `tap`, `(those, the block's (B, h, w, C) map)`.
    """

    stage_sizes: Sequence[int]
    groups: int = 1
    base_width: int = 64
    num_classes: int | None = None
    zero_init_residual: bool = True
    remat: bool = False
    conv_impl: str = "auto"
    dtype: Any = jnp.float32
    stem: str = "imagenet"
    tap: str | None = None

    def block_names(self) -> tuple[str, ...]:
        return tuple(_block_name(stage, block) for stage, num_blocks in enumerate(self.stage_sizes)
                     for block in range(num_blocks))

    @nn.compact
    def __call__(self, x, train: bool = False):
        check_tap(self.tap, self.block_names(), type(self).__name__)
        block_cls = nn.remat(Bottleneck, static_argnums=(2,)) if self.remat else Bottleneck

        if self.stem in SMALL_STEM_STRIDES:
            x = _conv(64, 3, SMALL_STEM_STRIDES[self.stem], 1, self.dtype, "stem_conv", conv_impl=self.conv_impl)(x)
            x = nn.relu(_batch_norm(train, self.dtype, "stem_bn")(x))
        else:
            x = _conv(64, 7, 2, 3, self.dtype, "stem_conv", conv_impl=self.conv_impl)(x)
            x = nn.relu(_batch_norm(train, self.dtype, "stem_bn")(x))
            x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))

        tapped = None
        for stage, num_blocks in enumerate(self.stage_sizes):
            planes = 64 * 2**stage
            for block in range(num_blocks):
                stride = 2 if stage > 0 and block == 0 else 1
                name = _block_name(stage, block)
                x = block_cls(
                    planes=planes,
                    stride=stride,
                    groups=self.groups,
                    base_width=self.base_width,
                    zero_init_residual=self.zero_init_residual,
                    conv_impl=self.conv_impl,
                    dtype=self.dtype,
                    name=name,
                )(x, train)
                tapped = x if name == self.tap else tapped

        return backbone_output(x, tapped, tap=self.tap, num_classes=self.num_classes, classifier_name="classifier")


def _block_name(stage: int, block: int) -> str:
    """torchvision's layer<stage>.<block>, as a Linen module name (stages counted from 0 here)."""
    return f"stage{stage + 1}_block{block}"


ResNet50 = functools.partial(ResNet, stage_sizes=(3, 4, 6, 3))
ResNet101 = functools.partial(ResNet, stage_sizes=(3, 4, 23, 3))
ResNet152 = functools.partial(ResNet, stage_sizes=(3, 8, 36, 3))
ResNeXt50_32x4d = functools.partial(ResNet, stage_sizes=(3, 4, 6, 3), groups=32, base_width=4)
ResNeXt101_32x8d = functools.partial(ResNet, stage_sizes=(3, 4, 23, 3), groups=32, base_width=8)
ResNeXt101_64x4d = functools.partial(ResNet, stage_sizes=(3, 4, 23, 3), groups=64, base_width=4)
