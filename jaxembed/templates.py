"""The three training templates: their hyperparameters, ranges, defaults and validation.

Every hyperparameter is named once, here, and flows from here to the command-line flags, the
validated configuration and the code that uses it.

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


@dataclasses.dataclass(frozen=True)
class HParam:
    """The specification of one hyperparameter.

    Attributes:
      name: the name used in configs and as the command-line flag `--name`.
      kind: `int` or `float`.
      default: the value when none is given; `None` means "derived from the data".
      minimum, maximum: inclusive bounds, or `None` for unbounded.
      step: the grid a value must lie on, counted from `minimum` (`None`: any value).
      help: one line for `--help`.
    """

    name: str
    kind: type
    default: int | float | None
    minimum: int | float | None = None
    maximum: int | float | None = None
    step: int | float | None = None
    help: str = ""

    def allowed(self) -> str:
        """The allowed values in words, for error messages and `--help`."""
        low = "-inf" if self.minimum is None else f"{self.minimum:g}"
        high = "inf" if self.maximum is None else f"{self.maximum:g}"
        text = f"{self.kind.__name__} in [{low}, {high}]"
        if self.step is not None and self.minimum is not None:
            text += f" on the grid {self.minimum:g}, {self.minimum + self.step:g}, ... (step {self.step:g})"
        if self.default is None:
            text += ", or unset"
        return text

    def validate(self, value: Any) -> int | float | None:
        """Returns `value` converted to this parameter's kind, or raises ValueError naming it."""
        if value is None:
            if self.default is None:
                return None
            raise ValueError(f"{self.name}=None is invalid: expected {self.allowed()}")
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
        """A plain dict including the template name, for JSON."""
        return {"template": self._template.name, **self._values}

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

    def defaults(self) -> dict[str, Any]:
        return {"arch": self.default_arch, **{n: h.default for n, h in self.hparams.items()}}

    def config(self, **overrides: Any) -> Config:
        """Validates `overrides` on top of the defaults.

        Raises:
          ValueError: naming the parameter, the value given and the allowed range, for an unknown
            name, a value out of range, off its grid or of the wrong type.
        """
        unknown = sorted(set(overrides) - set(self.hparams) - {"arch"})
        if unknown:
            raise ValueError(
                f"template {self.name!r} has no hyperparameter {', '.join(unknown)}; "
                f"it has: arch, {', '.join(self.hparams)}"
            )
        values = {**self.defaults(), **overrides}
        if values["arch"] not in self.archs:
            raise ValueError(
                f"arch={values['arch']!r} is invalid for template {self.name!r}: expected one of {', '.join(self.archs)}"
            )
        for name, spec in self.hparams.items():
            values[name] = spec.validate(values[name])
        return Config(self, values)

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        """Adds `--arch` and one `--<name>` flag per hyperparameter (default: unset = template default)."""
        parser.add_argument(
            "--arch", choices=self.archs, default=None, help=f"backbone (default {self.default_arch})"
        )
        for name, spec in self.hparams.items():
            default = "from the data" if spec.default is None else f"{spec.default:g}"
            parser.add_argument(
                f"--{name}", type=spec.kind, default=None, metavar=spec.kind.__name__.upper(),
                help=f"{spec.help} ({spec.allowed()}; default {default})",
            )

    def config_from_args(self, args: argparse.Namespace) -> Config:
        """The config from parsed flags: flags left unset keep the template defaults."""
        given = {name: getattr(args, name) for name in ("arch", *self.hparams)}
        return self.config(**{name: value for name, value in given.items() if value is not None})


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
