"""What a template trains for: ArcFace, softmax or sigmoid classification.

A `Task` owns everything that differs between them: the head on the backbone, the loss, the
classification metrics, the predicted probabilities, the default held-out split and the smallest
number of concepts the loss can learn from. `for_config(config)` is the only place that reads the
template's head and its `logreg` flag; the trainer, inference, evaluation and the experiments ask
the task. A new loss is a new `Task` subclass here.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from jaxembed import losses, metrics, models, parallel, schedules, templates
from jaxembed.models import heads

# `loss(outputs, params, batch, step=None) -> scalar`: outputs of the model, its params, the batch
# (`label` int32 `(B,)`, `labels` float32 multi-hot `(B, C)`) and the optimiser step it trains (None:
# a step after any warmup; only the ArcFace margin's warmup reads it).
LossFn = Callable[..., jax.Array]


class Task:
    """The interface; see the subclasses."""

    name: str = ""
    default_holdout: str = "images"  # "images" or "concepts"
    min_concepts: int = 2  # a softmax over one class learns nothing
    has_class_centres: bool = False  # whether `model_parallelism` has something to shard

    def build_model(self, backbone: nn.Module, num_outputs: int, *, dtype: Any = jnp.float32) -> nn.Module:
        """The template model: raw uint8 images -> {"embedding": unit vectors, ...}."""
        raise NotImplementedError

    def num_outputs(self, num_classes: int, model_parallelism: int = 1) -> int:
        """Output columns of the head for `num_classes` concepts (more when they are padded)."""
        del model_parallelism
        return num_classes

    def loss_fn(self, *, mesh: Mesh | None = None, num_classes: int | None = None,
                steps_per_epoch: int | None = None) -> LossFn:
        """The training loss; `mesh`/`num_classes`: shard class centres, padded beyond `num_classes`;
        `steps_per_epoch`: the run's, for losses that change over epochs."""
        raise NotImplementedError

    def metrics(self, outputs: Mapping[str, np.ndarray], label_sets: Sequence[Sequence[int]]) -> dict[str, float]:
        """Classification metrics of eval `outputs` against each image's concept indices (none by default)."""
        del outputs, label_sets
        return {}

    def predict(self, outputs: Mapping[str, np.ndarray]) -> np.ndarray:
        """Concept probabilities `(N, num_concepts)` from eval outputs."""
        raise ValueError(f"the {self.name} task has no classifier; use the embeddings")


@dataclasses.dataclass(frozen=True)
class ArcFace(Task):
    """ArcFace (additive angular margin) on a BN-Dropout-Dense-BN embedding head with class centres.

    Retrieval is its purpose, so its held-out split is by concepts: the test concepts are never seen.

    `margin_warmup_epochs` ramps the margin up from 0 (`schedules.warmup_factor`, as the learning-rate
    warmup does). Why: for images the backbone cannot tell apart, the margin's loss
    log(1 + exp(s (cos a - cos(a + m)))) grows with their angle a to the centres whenever m > 0, so it
    pulls the centres of their concepts together; at the start a random backbone tells no concept apart.
    """

    scale: float
    margin: float
    embeddings_size: int
    margin_warmup_epochs: float = 0.0

    name = "arcface"
    default_holdout = "concepts"
    has_class_centres = True

    def build_model(self, backbone, num_outputs, *, dtype=jnp.float32):
        return heads.ArcFaceModel(backbone=backbone, embeddings_size=self.embeddings_size,
                                  num_classes=num_outputs, dtype=dtype)

    def num_outputs(self, num_classes, model_parallelism=1):
        """`num_classes` rounded up to a multiple of `model_parallelism`: any class count works with any
        model_parallelism, the extra centre columns being zeros that the loss masks out."""
        return math.ceil(num_classes / model_parallelism) * model_parallelism

    def loss_fn(self, *, mesh=None, num_classes=None, steps_per_epoch=None):
        sharded = mesh is not None and mesh.shape[parallel.MODEL_AXIS] > 1
        if self.margin_warmup_epochs and not steps_per_epoch:
            raise ValueError(f"margin_warmup_epochs={self.margin_warmup_epochs} needs the run's steps_per_epoch")
        ramp = schedules.warmup_factor(self.margin_warmup_epochs, steps_per_epoch or 1)

        def arcface(outputs, params, batch, step=None):
            margin = self.margin if step is None else self.margin * ramp(step)
            return losses.arcface_loss(
                outputs["features"], params["centers"], batch["label"], scale=self.scale, margin=margin,
                mesh=mesh if sharded else None, valid_classes=num_classes if sharded else None)

        return arcface


@dataclasses.dataclass(frozen=True)
class _Classifier(Task):
    """A linear classifier on the pooled backbone features, whose embedding is those features (centred
    on their running mean with `embedding_neck="center"`), or a tapped block's map pooled by
    `embedding_pooling` (the backbone is built with `tap=embedding_layer`, see `build_model`)."""

    embedding_neck: str = "none"
    embedding_pooling: str = "avg"

    def initial_bias(self, num_outputs: int) -> float:
        return 0.0

    def build_model(self, backbone, num_outputs, *, dtype=jnp.float32):
        return heads.ClassifierModel(backbone=backbone, num_classes=num_outputs, dtype=dtype,
                                     bias_init=self.initial_bias(num_outputs), embedding_neck=self.embedding_neck,
                                     embedding_pooling=self.embedding_pooling)


@dataclasses.dataclass(frozen=True)
class Softmax(_Classifier):
    """Single-label classifier (logreg=0): softmax cross-entropy; metric top-1 accuracy."""

    name = "softmax"
    label_smoothing: float = 0.0

    def loss_fn(self, *, mesh=None, num_classes=None, steps_per_epoch=None):
        return lambda outputs, params, batch, step=None: losses.softmax_loss(outputs["logits"], batch["label"],
                                                                             self.label_smoothing)

    def metrics(self, outputs, label_sets):
        primary = np.array([labels[0] for labels in label_sets])
        return {"top1": metrics.top1_accuracy(outputs["logits"], primary)}

    def predict(self, outputs):
        return np.asarray(jax.nn.softmax(outputs["logits"], axis=-1))


@dataclasses.dataclass(frozen=True)
class Sigmoid(_Classifier):
    """Multi-label classifier (logreg=1): one sigmoid unit per concept; metric mean average precision.
    One concept suffices (each unit learns "this concept or not")."""

    name = "sigmoid"
    min_concepts = 1

    def initial_bias(self, num_outputs):
        """`-log(C - 1)`: every unit starts at probability 1/C, the prior of a concept in a single-label
        data set of C concepts. A zero bias (probability 1/2) would make the C - 1 negatives' summed
        gradient (C - 1) / 2, so the first steps' size would grow with the concept count (~9x softmax's
        at 10 concepts, ~90x at 1,000) and one per_item_lrate could not suit both."""
        return -math.log(num_outputs - 1) if num_outputs > 1 else 0.0

    def loss_fn(self, *, mesh=None, num_classes=None, steps_per_epoch=None):
        return lambda outputs, params, batch, step=None: losses.sigmoid_loss(outputs["logits"], batch["labels"])

    def metrics(self, outputs, label_sets):
        targets = np.zeros_like(outputs["logits"])
        for row, labels in enumerate(label_sets):
            targets[row, list(labels)] = 1.0
        return {"mAP": metrics.mean_average_precision(outputs["logits"], targets)}

    def predict(self, outputs):
        return np.asarray(jax.nn.sigmoid(outputs["logits"]))


def for_config(config: templates.Config) -> Task:
    """The task of a template configuration (the one place that reads the head and `logreg`)."""
    if config.label_smoothing and (config.template.head == "arcface" or config.logreg):
        raise ValueError(f"label_smoothing={config.label_smoothing} applies to the softmax loss (logreg=0) only")
    if config.margin_warmup_epochs and config.template.head != "arcface":
        raise ValueError(f"margin_warmup_epochs={config.margin_warmup_epochs} applies to the ArcFace template "
                         f"(resnet_angular_margin) only")
    if config.template.head == "arcface" and (config.embedding_layer or config.embedding_pooling != "avg"):
        raise ValueError("embedding_layer and embedding_pooling choose a classifier template's embedding; the "
                         "ArcFace template (resnet_angular_margin) embeds with its own head")
    if config.template.head == "arcface":
        return ArcFace(scale=float(config.angular_scale), margin=float(config.angular_margin),
                       embeddings_size=int(config.embeddings_size),
                       margin_warmup_epochs=float(config.margin_warmup_epochs))
    embedding = {"embedding_neck": config.embedding_neck, "embedding_pooling": config.embedding_pooling}
    if config.logreg:
        return Sigmoid(**embedding)
    return Softmax(**embedding, label_smoothing=config.label_smoothing)


DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float64": jnp.float64}


def build_model(config: templates.Config, num_classes: int) -> nn.Module:
    """The template model of `config` for `num_classes` concepts: its backbone (`config.arch`, in
    `config.dtype`, rematerialised with `config.remat`, with `config.stem`, tapped at `config.embedding_layer`)
    under its task's head, taking raw uint8 NHWC images. ArcFace centres are padded to a multiple of `config.model_parallelism`."""
    dtype = DTYPES[config.dtype]
    task = for_config(config)
    backbone = models.create(config.arch, dtype=dtype, remat=config.remat, stem=config.stem,
                             tap=config.embedding_layer)
    return task.build_model(backbone, task.num_outputs(num_classes, config.model_parallelism), dtype=dtype)
