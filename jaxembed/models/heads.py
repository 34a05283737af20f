"""Template models: input normalisation + backbone + head, taking raw images.

Both models take raw RGB pixels (B, H, W, 3), uint8 or float in [0, 255], and
return a dict of float32 arrays whose "embedding" entry is L2-normalised.

The backbone must be built without a classifier (`jaxembed.models.create(arch)`)
so it returns pooled features (B, feature_dim) float32. The heads are small
next to the backbone and run in float32 so that embeddings, logits and the
ArcFace features are never rounded to bfloat16; `dtype` is the dtype of the
normalised images handed to the backbone (use the backbone's computation dtype).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxembed.losses import as_float, l2_normalize

IMAGENET_MEAN_255 = (0.485 * 255, 0.456 * 255, 0.406 * 255)
IMAGENET_STD_255 = (0.229 * 255, 0.224 * 255, 0.225 * 255)


def normalize_images(images: jax.Array, dtype: Any = jnp.float32) -> jax.Array:
    """Raw RGB pixels -> ImageNet-normalised images.

    images: (..., H, W, 3) uint8 or float in [0, 255], RGB.
    Returns the same shape in `dtype`; the arithmetic is done in float32.
    """
    x = images.astype(jnp.float32)
    x = (x - jnp.asarray(IMAGENET_MEAN_255, jnp.float32)) / jnp.asarray(IMAGENET_STD_255, jnp.float32)
    return x.astype(dtype)


def head_dtype(dtype: Any) -> Any:
    """The heads' dtype: float32 for float32 and bfloat16 backbones (embeddings and logits are never
    rounded to bfloat16), float64 for float64 ones (numerical checks with `jax_enable_x64`)."""
    return jnp.float64 if jnp.dtype(dtype) == jnp.float64 else jnp.float32


def _head_batch_norm(train: bool, name: str, dtype: Any, use_scale: bool = True) -> nn.BatchNorm:
    """BatchNorm over the feature axis in `head_dtype`, torch defaults (momentum 0.1, eps 1e-5)."""
    return nn.BatchNorm(
        use_running_average=not train,
        momentum=0.9,
        epsilon=1e-5,
        use_scale=use_scale,
        dtype=dtype,
        param_dtype=dtype,
        name=name,
    )


POOLINGS = ("avg", "max", "gem")
GEM_POWER = 3.0  # Radenovic et al. 2018's generalised mean, which they found best for retrieval at p = 3


def pool(feature_map: jax.Array, how: str) -> jax.Array:
    """(B, h, w, C) -> (B, C): the average, the maximum, or the generalised mean (mean of x^3)^(1/3),
    between the two, over positions. The maps pooled here are post-ReLU, so x >= 0; "gem" clamps at
    1e-6 so that the cube root's gradient stays finite."""
    if how == "avg":
        return jnp.mean(feature_map, axis=(1, 2))
    if how == "max":
        return jnp.max(feature_map, axis=(1, 2))
    if how == "gem":
        return jnp.mean(jnp.maximum(feature_map, 1e-6) ** GEM_POWER, axis=(1, 2)) ** (1.0 / GEM_POWER)
    raise ValueError(f"embedding_pooling={how!r}: expected one of {', '.join(POOLINGS)}")


class ClassifierModel(nn.Module):
    """Backbone + linear classifier (the inception_bn and resnext templates).

    `__call__(images, train=False)` -> {
      "embedding": L2-normalised pooled backbone features (B, feature_dim) float32, or, for a backbone
        built with `tap` (`jaxembed.models.taps`), the tapped block's map pooled by `embedding_pooling`,
      "logits": Dense(num_classes) on the un-normalised pooled features (B, num_classes) float32,
    }. The loss decides between softmax and sigmoid; no activation here. The tap changes only the
    embedding: parameters, logits and so training are the same with or without it.
    """

    backbone: nn.Module
    num_classes: int
    dtype: Any = jnp.float32
    bias_init: float = 0.0  # the classifier's initial bias (a prior; see `tasks.Sigmoid`)
    embedding_neck: str = "none"  # "center": subtract the features' running mean before normalising
    embedding_pooling: str = "avg"  # of the tapped block's map (`pool`)

    @nn.compact
    def __call__(self, images, *, train: bool = False):
        dtype = head_dtype(self.dtype)
        outputs = self.backbone(normalize_images(images, self.dtype), train=train)
        features, block_map = outputs if isinstance(outputs, tuple) else (outputs, None)
        features = features.astype(dtype)
        classifier = nn.Dense(self.num_classes, dtype=dtype, param_dtype=dtype,
                              bias_init=nn.initializers.constant(self.bias_init), name="classifier")
        logits = classifier(features)
        if block_map is not None:
            embedding = pool(block_map.astype(dtype), self.embedding_pooling)
        elif self.embedding_pooling == "avg":
            embedding = as_float(features)
        else:
            raise ValueError(f"embedding_pooling={self.embedding_pooling!r} pools a block's map: name the block "
                             f"(embedding_layer, the backbone's tap); without one the embedding is the "
                             f"backbone's average-pooled features")
        if self.embedding_neck == "center":
            embedding = embedding - self._running_mean(jax.lax.stop_gradient(embedding), train)
        return {"embedding": l2_normalize(embedding), "logits": logits}

    def _running_mean(self, features, train: bool):
        """The pooled features' mean over training batches (momentum 0.9, as batch norm's), a batch stat.

        Pooled post-ReLU features are all non-negative and share a large common component, so the
        cosine of two raw feature vectors is high whatever they show; centring removes that component
        (the classifier, which has a bias, is unaffected: it reads the raw features).
        """
        mean = self.variable("batch_stats", "feature_mean", jnp.zeros, features.shape[-1:], features.dtype)
        if train and not self.is_initializing():
            mean.value = 0.9 * mean.value + 0.1 * jnp.mean(features, axis=0)
        return mean.value


class ArcFaceModel(nn.Module):
    """Backbone + insightface's "E" embedding head + ArcFace class centres.

    Head: BatchNorm -> Dropout -> Dense(embeddings_size) -> BatchNorm, as in
    insightface's "E" output layer, applied to the pooled backbone features.
    Like insightface (which fixes gamma of that last BN at 1), the final BN has
    no scale: a learnable per-dimension scale would only reweight the
    embedding before L2 normalisation.

    Attributes:
      backbone: feature extractor returning (B, feature_dim) float32.
      embeddings_size: size D of the embedding.
      num_classes: number of ArcFace classes (rows of the class-centre matrix).
      dropout_rate: dropout before the Dense in train mode. insightface uses 0.4
        on its flattened 7x7 map; on pooled features a milder 0.2 is the default.
        When > 0, train mode needs `rngs={"dropout": key}`.
      dtype: dtype of the normalised images handed to the backbone.

    Params: "backbone", "feature_bn", "embedding_fc", "embedding_bn", and the
    top-level "centers" (D, num_classes) float32 read by the ArcFace loss
    (`jaxembed.losses.arcface_loss(embeddings, centers, labels, ...)`).

    `__call__(images, train=False)` -> {
      "embedding": L2-normalised head output (B, D) float32,
      "features": un-normalised head output (B, D) float32,
    }
    """

    backbone: nn.Module
    embeddings_size: int
    num_classes: int
    dropout_rate: float = 0.2
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, images, *, train: bool = False):
        # Owned here (not by the loss) so it is saved, sharded and optimised with the model.
        dtype = head_dtype(self.dtype)
        self.param("centers", nn.initializers.normal(0.01), (self.embeddings_size, self.num_classes), dtype)

        features = self.backbone(normalize_images(images, self.dtype), train=train).astype(dtype)
        x = _head_batch_norm(train, "feature_bn", dtype)(features)
        x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
        # No bias: the batch norm right after subtracts it again (its gradient is zero up to rounding).
        x = nn.Dense(self.embeddings_size, use_bias=False, dtype=dtype, param_dtype=dtype, name="embedding_fc")(x)
        x = _head_batch_norm(train, "embedding_bn", dtype, use_scale=False)(x)
        return {"embedding": l2_normalize(as_float(x)), "features": x}
