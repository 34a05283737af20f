"""Backbones and template models.

`create(arch, num_classes=None, dtype=..., remat=False)` builds a Linen
backbone by name; `feature_dim(arch)` gives the width of its pooled features.
Every backbone takes normalised NHWC float images of any size >= 32 (global
average pooling) and returns float32 features (B, feature_dim) or logits
(B, num_classes). Variables: "params" (float32) and "batch_stats".

The template models that take raw pixels live in `jaxembed.models.heads`.
"""

from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax.numpy as jnp

from jaxembed.models import inception_bn, resnet
from jaxembed.models.heads import POOLINGS, ArcFaceModel, ClassifierModel, l2_normalize, normalize_images
from jaxembed.models.pretrained import load_pretrained, merge_backbone
from jaxembed.models.stems import STEMS
from jaxembed.models.taps import check_tap

# arch name -> (constructor accepting num_classes/dtype/remat, pooled feature width)
_REGISTRY: dict[str, tuple[Callable[..., nn.Module], int]] = {
    "resnet50": (resnet.ResNet50, resnet.FEATURE_DIM),
    "resnet101": (resnet.ResNet101, resnet.FEATURE_DIM),
    "resnet152": (resnet.ResNet152, resnet.FEATURE_DIM),
    "resnext50_32x4d": (resnet.ResNeXt50_32x4d, resnet.FEATURE_DIM),
    "resnext101_32x8d": (resnet.ResNeXt101_32x8d, resnet.FEATURE_DIM),
    "resnext101_64x4d": (resnet.ResNeXt101_64x4d, resnet.FEATURE_DIM),
    "inception_bn": (inception_bn.InceptionBN, inception_bn.FEATURE_DIM),
}

ARCHS = tuple(_REGISTRY)  # the built-in backbones


def register(arch: str, constructor: Callable[..., nn.Module], feature_dim: int) -> None:
    """Adds a backbone `arch` (as timm's `register_model` does): `constructor(num_classes=, dtype=, remat=,
    conv_impl=)` -> a Linen module returning pooled features `(B, feature_dim)`. Every template then
    accepts `arch=<arch>`, in this process. For research backbones and for small test models; the
    built-in names cannot be replaced.
    """
    if arch in ARCHS:
        raise ValueError(f"arch {arch!r} is built in and cannot be registered again")
    _REGISTRY[arch] = (constructor, feature_dim)


def registered_archs() -> tuple[str, ...]:
    """The backbones added with `register`."""
    return tuple(name for name in _REGISTRY if name not in ARCHS)


def _lookup(arch: str) -> tuple[Callable[..., nn.Module], int]:
    try:
        return _REGISTRY[arch]
    except KeyError:
        raise ValueError(f"unknown arch {arch!r}; expected one of {ARCHS}") from None




def create(
    arch: str, *, num_classes: int | None = None, dtype: Any = jnp.float32, remat: bool = False,
    conv_impl: str = "auto", stem: str = "imagenet", tap: str | None = None,
) -> nn.Module:
    """Backbone `arch` as a Linen module.

    Call it as `module.apply(variables, x, train=False)` with x (B, H, W, 3)
    normalised float; in train mode add `mutable=["batch_stats"]`.
    Without num_classes it returns pooled features (B, feature_dim(arch))
    float32, otherwise logits (B, num_classes) float32.
    dtype: computation dtype (parameters stay float32).
    remat: rematerialise each residual/inception block to save activation memory.
    conv_impl: "auto" (XLA:CPU-friendly forms on CPU, native convolutions elsewhere), "native" or
      "cpu"; see `conv_forms`. Same parameters and outputs either way.
    stem: "imagenet" (the published networks'), "small" or "small_s2" (one 3x3 convolution of stride 1
      or 2, no max-pool: for 32-64 px images; see `jaxembed.models.stems`); a registered backbone gets
      `stem=` only when it is not "imagenet".
    tap: a block's name (`block_names(arch)`): the module then returns `(features or logits, that block's
      (B, h, w, C) output map)` (`jaxembed.models.taps`); a registered backbone gets `tap=` only when set.
      An unknown name is refused here, naming the blocks, not when the module first runs.
    """
    if stem not in STEMS:
        raise ValueError(f"stem={stem!r} is invalid: expected one of {', '.join(STEMS)}")
    constructor, _ = _lookup(arch)
    extra = {} if stem == "imagenet" else {"stem": stem}
    if tap is not None:
        extra["tap"] = tap
    module = constructor(num_classes=num_classes, dtype=dtype, remat=remat, conv_impl=conv_impl, **extra)
    if tap is not None:
        check_tap(tap, _block_names(module, arch), arch)
    return module


def block_names(arch: str) -> tuple[str, ...]:
    """The blocks of `arch` whose output map `create(arch, tap=...)` can return, input side first."""
    return _block_names(create(arch), arch)


def _block_names(module: nn.Module, arch: str) -> tuple[str, ...]:
    if not hasattr(module, "block_names"):
        raise ValueError(f"arch {arch!r} does not name its blocks (no block_names method), so it has no tap")
    return module.block_names()


def feature_dim(arch: str) -> int:
    """Width of the pooled features of `arch` (2048 for ResNet/ResNeXt, 1024 for BN-Inception)."""
    return _lookup(arch)[1]


__all__ = [
    "ARCHS",
    "POOLINGS",
    "ArcFaceModel",
    "ClassifierModel",
    "block_names",
    "create",
    "feature_dim",
    "l2_normalize",
    "load_pretrained",
    "merge_backbone",
    "normalize_images",
    "register",
    "registered_archs",
]
