"""The one configuration of a run: the three templates' hyperparameters and the run options.

Every setting is declared once, here, as an `HParam` spec, and flows from here to the command-line
flags (`Template.add_arguments`), the validated `Config` (`Template.config`), `run.json`, and the
field-by-field check that a resumed run is the same run (`Config.differences`). Template
hyperparameters (`Template.hparams`) are what the templates define; run options (`RUN_OPTIONS`:
seed, optimiser, holdout, logging, ...) are the trainer's. Both live in one `Config`.

Example:
    >>> from jaxembed import templates
    >>> config = templates.get("inception_bn").config(image_size=128, logreg=0)
    >>> config.image_size, config.batch_size * config.per_item_lrate
    (128, 0.0256)
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np

from jaxembed import models


@dataclasses.dataclass(frozen=True)
class HParam:
    """The specification of one setting (a template hyperparameter or a run option).

    Attributes:
      name: the name used in configs and as the command-line flag `--name`.
      kind: `int`, `float`, `str` or `bool`.
      default: the value when none is given; `None` means "unset" (derived from the data, or off).
      minimum, maximum: inclusive bounds for numbers, or `None` for unbounded.
      step: the grid a number must lie on, counted from `minimum` (`None`: any value).
      help: one line for `--help`.
      choices: the allowed strings of a `str` setting (`None`: any string).
      same_run: whether a resumed run must keep it (False for settings that change how a run is
        watched or stopped, not what it computes: logging, checkpoint cadence, max_steps).
    """

    name: str
    kind: type
    default: int | float | str | bool | None
    minimum: int | float | None = None
    maximum: int | float | None = None
    step: int | float | None = None
    help: str = ""
    choices: tuple[str, ...] | None = None
    same_run: bool = True

    def allowed(self) -> str:
        """The allowed values in words, for error messages and `--help`."""
        if self.kind is bool:
            text = "true or false"
        elif self.kind is str:
            text = "one of " + ", ".join(self.choices) if self.choices else "a string"
        else:
            low = "-inf" if self.minimum is None else f"{self.minimum:g}"
            high = "inf" if self.maximum is None else f"{self.maximum:g}"
            text = f"{self.kind.__name__} in [{low}, {high}]"
            if self.step is not None and self.minimum is not None:
                text += f" on the grid {self.minimum:g}, {self.minimum + self.step:g}, ... (step {self.step:g})"
        if self.default is None:
            text += ", or unset"
        return text

    def validate(self, value: Any) -> int | float | str | bool | None:
        """Returns `value` converted to this setting's kind, or raises ValueError naming it."""
        if value is None:
            if self.default is None:
                return None
            raise ValueError(f"{self.name}=None is invalid: expected {self.allowed()}")
        if self.kind is bool:
            if not isinstance(value, (bool, np.bool_)):
                raise ValueError(f"{self.name}={value!r} is invalid: expected {self.allowed()}")
            return bool(value)
        if self.kind is str:
            if not isinstance(value, str) or (self.choices and value not in self.choices):
                raise ValueError(f"{self.name}={value!r} is invalid: expected {self.allowed()}")
            return value
        # bool is an int subclass in Python; True for image_size is a bug, not a size.
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(
                f"{self.name}={value!r} is invalid: expected {self.allowed()}, got {type(value).__name__}"
            )
        if not math.isfinite(value):
            raise ValueError(f"{self.name}={value!r} is invalid: expected {self.allowed()}")
        if self.kind is int:
            if value != int(value):
                raise ValueError(f"{self.name}={value!r} is invalid: expected an integer, {self.allowed()}")
            value = int(value)
        else:
            value = float(value)
        if (self.minimum is not None and value < self.minimum) or (
            self.maximum is not None and value > self.maximum
        ):
            raise ValueError(f"{self.name}={value!r} is out of range: expected {self.allowed()}")
        if self.step is not None and self.minimum is not None:
            steps = (value - self.minimum) / self.step
            if abs(steps - round(steps)) > 1e-9:
                raise ValueError(f"{self.name}={value!r} is off the grid: expected {self.allowed()}")
        return value

    def add_argument(self, parser: argparse.ArgumentParser) -> None:
        """`--name` (booleans: `--name/--no-name`); unset (None) means the default, so callers can tell
        what the user gave."""
        default = "unset" if self.default is None else self.default
        help_text = f"{self.help} ({self.allowed()}; default {default})"
        if self.kind is bool:
            parser.add_argument(f"--{self.name}", action=argparse.BooleanOptionalAction, default=None,
                                help=help_text)
        else:
            parser.add_argument(f"--{self.name}", type=self.kind, default=None, help=help_text,
                                metavar=self.kind.__name__.upper())


class Config(Mapping):
    """A validated, immutable template configuration: a mapping with attribute access.

    Build it with `Template.config(...)`; derive variants with `replace(...)`.
    """

    def __init__(self, template: "Template", values: Mapping[str, Any]):
        self._template = template
        self._values = dict(values)

    @property
    def template(self) -> "Template":
        return self._template

    def __getattr__(self, name: str) -> Any:
        try:
            return self.__dict__["_values"][name]
        except KeyError:
            raise AttributeError(f"{self._template.name} config has no {name!r}") from None

    def __getitem__(self, name: str) -> Any:
        return self._values[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)

    def __repr__(self) -> str:
        items = ", ".join(f"{k}={v!r}" for k, v in self._values.items())
        return f"Config({self._template.name}: {items})"

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, Config)
            and other._template.name == self._template.name
            and other._values == self._values
        )

    def __hash__(self) -> int:
        return hash((self._template.name, tuple(sorted(self._values.items()))))

    def replace(self, **overrides: Any) -> "Config":
        """A new config with `overrides` applied and validated."""
        return self._template.config(**{**self._values, **overrides})

    def to_dict(self) -> dict[str, Any]:
        """A plain dict including the template name, for JSON (`run.json`)."""
        return {"template": self._template.name, **self._values}

    def differences(self, saved: Mapping[str, Any]) -> list[str]:
        """`name: saved -> now` for each setting that makes a run what it is (`HParam.same_run`) and
        differs from `saved` (a `to_dict()` of an earlier run, completed by `Template.recorded`)."""
        saved = self._template.recorded(saved)
        changed = []
        if saved.get("template", self._template.name) != self._template.name:
            changed.append(f"template: {saved['template']!r} -> {self._template.name!r}")
        for name, spec in self._template.specs.items():
            if spec.same_run and saved[name] != self._values[name]:
                changed.append(f"{name}: {saved[name]!r} -> {self._values[name]!r}")
        return changed

    @property
    def learning_rate(self) -> float:
        """The initial learning rate: batch_size * per_item_lrate."""
        return self.batch_size * self.per_item_lrate


@dataclasses.dataclass(frozen=True)
class Template:
    """A training template: a backbone family, a head and loss, and their hyperparameters.

    Attributes:
      name: the command-line name (`--template NAME`).
      seed_name: the name of the original template this one re-creates.
      description: one line.
      hparams: hyperparameter name -> `HParam`.
      archs: the backbones this template may use; the first is the default.
      head: `"arcface"` or `"classifier"`.
    """

    name: str
    seed_name: str
    description: str
    hparams: Mapping[str, HParam]
    archs: tuple[str, ...]
    head: str

    @property
    def default_arch(self) -> str:
        return self.archs[0]

    @property
    def specs(self) -> dict[str, HParam]:
        """Every setting of a run of this template: `arch`, the hyperparameters, the run options."""
        return {"arch": HParam("arch", str, self.default_arch, choices=self.archs, help="backbone"),
                **self.hparams, **RUN_OPTIONS}

    def defaults(self) -> dict[str, Any]:
        return {name: spec.default for name, spec in self.specs.items()}

    def recorded(self, saved: Mapping[str, Any]) -> dict[str, Any]:
        """A run's recorded settings (run.json's config) with every setting it lacks filled in as that
        run had it: a setting missing from an older run.json did not exist yet, so the run used its
        default then (`UNRECORDED`), which is today's default unless that has changed since."""
        return {**self.defaults(), **UNRECORDED, **saved}

    def config(self, **overrides: Any) -> Config:
        """Validates `overrides` (hyperparameters, `arch` and run options) on top of the defaults.

        Raises:
          ValueError: naming the parameter, the value given and the allowed range, for an unknown
            name, a value out of range, off its grid or of the wrong type.
        """
        specs = self.specs
        unknown = sorted(set(overrides) - set(specs))
        if unknown:
            raise ValueError(
                f"template {self.name!r} has no hyperparameter {', '.join(unknown)}; "
                f"it has: arch, {', '.join(self.hparams)} (and the run options {', '.join(RUN_OPTIONS)})"
            )
        values = {**self.defaults(), **overrides}
        if values["arch"] not in self.archs + models.registered_archs():
            raise ValueError(
                f"arch={values['arch']!r} is invalid for template {self.name!r}: expected one of {', '.join(self.archs)}"
            )
        specs["arch"] = dataclasses.replace(specs["arch"], choices=None)  # checked above
        return Config(self, {name: spec.validate(values[name]) for name, spec in specs.items()})

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        """One `--<name>` flag per setting (default: unset = the template's default)."""
        for spec in self.specs.values():
            spec.add_argument(parser)

    def config_from_args(self, args: argparse.Namespace, **defaults: Any) -> Config:
        """The config from parsed flags; flags left unset take `defaults`, then the template's defaults."""
        given = {name: getattr(args, name) for name in self.specs if getattr(args, name, None) is not None}
        return self.config(**{**defaults, **given})


def _hparams(*specs: HParam) -> dict[str, HParam]:
    return {spec.name: spec for spec in specs}


# The hyperparameters every template shares. Defaults are for real training on a GPU/TPU:
# 224 px, and SGD's classic 0.1 per 256 images (0.1 / 256 = 3.9e-4 per item).
SHARED_HPARAMS = _hparams(
    HParam("image_size", int, 224, 32, 1024, 16, "training image size in pixels (the shorter side)"),
    HParam("batch_size", int, 64, 1, 128, 1, "global batch size, across all devices"),
    HParam("init_epochs", int, 10, 1, 200, 1, "epochs at the initial learning rate"),
    HParam("step_epochs", int, 10, 1, 200, 1, "epochs between learning-rate decays after init_epochs"),
    HParam("num_epochs", int, 30, 1, 200, 1, "total training epochs"),
    HParam("per_item_lrate", float, 0.0004, 0.0, None, None, "learning rate per image: lr = batch_size * per_item_lrate"),
    HParam("num_items_per_epoch", int, None, 1, None, 1, "images per epoch (default: the number of images in the data)"),
)

LOGREG = HParam("logreg", int, 1, 0, 1, 1, "1: sigmoid units (multi-label concepts); 0: softmax")

ARCFACE_HPARAMS = _hparams(
    HParam("angular_scale", int, 64, 16, 128, 16, "ArcFace logit scale s"),
    HParam("angular_margin", float, 0.5, 0.1, 0.9, None, "ArcFace additive angular margin m, in radians"),
    HParam("embeddings_size", int, 512, 2, 4096, 1, "embedding dimension"),
)

# How a run trains and is watched, beside what the template defines. `same_run=False`: may change
# when a run resumes.
RUN_OPTIONS = _hparams(
    HParam("seed", int, 0, 0, None, 1, "seeds initialisation, data order and augmentation"),
    HParam("optimizer", str, "sgd", help="SGD with momentum (the classic choice for these nets) or AdamW",
           choices=("sgd", "adamw")),
    HParam("momentum", float, 0.9, 0.0, 1.0, None, "SGD momentum"),
    HParam("weight_decay", float, 5e-4, 0.0, None, None, "L2 weight decay on kernels and class centres"),
    HParam("lr_decay", float, 0.1, 0.0, 1.0, None, "learning-rate factor applied every step_epochs after init_epochs"),
    HParam("dtype", str, "float32", help="computation dtype; parameters and losses stay float32 (float64, "
           "for numerical checks, needs JAX_ENABLE_X64=1)", choices=("float32", "bfloat16", "float64")),
    HParam("remat", bool, False, help="recompute each block in the backward pass (less activation memory)"),
    HParam("holdout", str, None, help="held-out split by images or by concepts (default: the task's)",
           choices=("images", "concepts")),
    HParam("holdout_fraction", float, 0.1, 0.0, 1.0, None, "fraction of images (or concepts) held out"),
    HParam("min_crop_area", float, 0.25, 0.0, 1.0, None, "random-resized crops keep at least this fraction of the area"),
    HParam("crop", str, "resized", help="training crop: random-resized (area min_crop_area..1, aspect 3/4..4/3; "
           "photos, characters) or pad (shifts of up to crop_padding pixels at full scale; 28-32 px images such "
           "as Fashion-MNIST or CIFAR)", choices=("resized", "pad")),  # data.transforms.CROPS
    HParam("crop_padding", int, 4, 0, None, 1, "crop=pad: border pixels repeated on each side before the random crop"),
    HParam("random_erasing", float, 0.0, 0.0, 1.0, None, "chance that a random rectangle (2 to 33 percent of the image) of "
           "a training image is replaced by grey (Zhong et al. 2017; 0.25-0.5 against overfitting on long runs)"),
    HParam("rotation_degrees", float, 0.0, 0.0, 180.0, None, "random rotation of training images by up to this "
           "many degrees either way (5-15 for characters and digits, after Koch et al. 2015; 0: none; at most "
           "data.transforms.MAX_ROTATION_DEGREES)"),
    HParam("shear_degrees", float, 0.0, 0.0, 45.0, None, "random horizontal shear of training images by up to "
           "this many degrees either way (data.transforms.MAX_SHEAR_DEGREES at most; 0: none)"),
    HParam("flip", bool, False, help="random horizontal flips: on for photos and products, off for characters and "
           "digits (a mirrored glyph is another concept)"),
    HParam("warmup_epochs", float, 0.0, 0.0, 200.0, None, "linear learning-rate warmup from 0 over these epochs, "
           "scaling the schedule"),
    HParam("lr_schedule", str, "step", help="the templates' piecewise-constant decay (init_epochs, step_epochs, "
           "lr_decay), or cosine decay to 0 at num_epochs", choices=("step", "cosine")),
    HParam("nesterov", bool, False, help="Nesterov momentum (SGD)"),
    HParam("label_smoothing", float, 0.0, 0.0, 0.99, None, "softmax (logreg=0) target smoothing"),
    HParam("margin_warmup_epochs", float, 0.0, 0.0, 200.0, None, "ArcFace: ramp the margin linearly from 0 over "
           "these epochs, as warmup_epochs does the learning rate (0: the whole margin from the first step)"),
    HParam("clip_grad_norm", float, None, 0.0, None, None, "clip the global gradient norm to this (unset: off)"),
    HParam("ema_decay", float, None, 0.0, 0.99999, None, "keep an exponential moving average of the weights "
           "with this decay (e.g. 0.999; unset: off); evaluation, jaxembed.load, embed and export then use it"),
    HParam("embedding_neck", str, "none", help="classifier templates' embedding: the pooled features as they "
           "are (none) or centred on their running mean (center)", choices=("none", "center")),
    HParam("embedding_layer", str, None, help="classifier templates: a backbone block (jaxembed.models.block_names"
           "(arch), e.g. inception_4d, stage3_block5) whose output map, pooled by embedding_pooling, is the embedding "
           "instead of the last pooled features; for concepts the model never saw (changes only the embedding, not "
           "training; experiments/omniglot_embeddings.py)"),
    HParam("embedding_pooling", str, "avg", help="how embedding_layer's map is pooled: average, maximum, or the "
           "generalised mean (gem, p=3)", choices=models.POOLINGS),
    HParam("stem", str, "imagenet", help="backbone stem: the ImageNet 7x7/2 convolution and max-pool, or one 3x3 "
           "convolution of stride 1 (small) or 2 (small_s2, ~4x cheaper) without max-pool for 32-64 px images "
           "(pretrained weights need imagenet)", choices=models.STEMS),
    HParam("data_dir", str, None, help="TFDS data directory", same_run=False),
    HParam("depth", int, None, 1, None, 1, "folder data: path components that name a concept"),
    HParam("init_from", str, None, help="torchvision/BN-Inception weights (.pth or .safetensors) for the backbone"),
    HParam("model_parallelism", int, 1, 1, None, 1,
           "devices along the 'model' mesh axis that shard the ArcFace class centres; must divide the device count"),
    HParam("log_every", int, 10, 1, None, 1, "steps between logged metrics", same_run=False),
    HParam("checkpoint_every", int, 200, 1, None, 1, "steps between checkpoints", same_run=False),
    HParam("keep_checkpoints", int, 3, 1, None, 1, "checkpoints kept", same_run=False),
    HParam("eval_batch_size", int, 64, 1, None, 1, "images per evaluation batch", same_run=False),
    HParam("data_workers", int, None, 0, None, 1, "processes that decode and augment training images (0: threads "
           "of the training process; unset: one per CPU core less one, at most 16, and 0 below 4 cores); the "
           "batches are the same for any number", same_run=False),
    HParam("max_steps", int, None, 1, None, 1, "stop (with a checkpoint) at this step; resume later", same_run=False),
    HParam("progress", bool, True, help="show a progress bar", same_run=False),
)

# What a run.json written before a setting existed means by its absence, where that is not today's
# default: those runs flipped their training images.
UNRECORDED = {"flip": True}

TEMPLATES: dict[str, Template] = {
    t.name: t
    for t in (
        Template(
            name="resnet_angular_margin",
            seed_name="Clarifai_ResNet_AngularMargin",
            description="ResNet-101, BN-Dropout-Dense-BN embedding head, ArcFace loss",
            hparams={**SHARED_HPARAMS, **ARCFACE_HPARAMS},
            archs=("resnet101", "resnet50", "resnet152"),
            head="arcface",
        ),
        Template(
            name="inception_bn",
            seed_name="Clarifai_InceptionBatchNorm",
            description="BN-Inception classifier; embedding = pooled 1024-d layer",
            hparams={**SHARED_HPARAMS, "logreg": LOGREG},
            archs=("inception_bn",),
            head="classifier",
        ),
        Template(
            name="resnext",
            seed_name="Clarifai_ResNext",
            description="ResNeXt classifier; embedding = pooled 2048-d layer",
            hparams={**SHARED_HPARAMS, "logreg": LOGREG},
            archs=("resnext101_32x8d", "resnext50_32x4d", "resnext101_64x4d"),
            head="classifier",
        ),
    )
}

NAMES = tuple(TEMPLATES)


def get(name: str) -> Template:
    """The template called `name`; ValueError listing the templates otherwise."""
    try:
        return TEMPLATES[name]
    except KeyError:
        raise ValueError(f"unknown template {name!r}: expected one of {', '.join(NAMES)}") from None
