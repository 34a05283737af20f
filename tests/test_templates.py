"""Template hyperparameters: defaults, ranges, grids, error messages and command-line flags."""

import argparse
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxembed import templates

ALL = [templates.get(name) for name in templates.NAMES]
SPEC_CASES = [(t, spec) for t in ALL for spec in t.hparams.values()]
SPEC_IDS = [f"{t.name}.{spec.name}" for t, spec in SPEC_CASES]

# The ranges of GUIDE.md, written out independently of templates.py.
EXPECTED = {
    "image_size": (32, 1024, 16),
    "batch_size": (1, 128, 1),
    "init_epochs": (1, 200, 1),
    "step_epochs": (1, 200, 1),
    "num_epochs": (1, 200, 1),
    "per_item_lrate": (0.0, None, None),
    "angular_scale": (16, 128, 16),
    "angular_margin": (0.1, 0.9, None),
    "logreg": (0, 1, 1),
}


def test_names_and_archs():
    assert templates.NAMES == ("resnet_angular_margin", "inception_bn", "resnext")
    assert templates.get("resnet_angular_margin").default_arch == "resnet101"
    assert templates.get("inception_bn").default_arch == "inception_bn"
    assert templates.get("resnext").default_arch == "resnext101_32x8d"
    with pytest.raises(ValueError, match="unknown template 'resnet'.*inception_bn"):
        templates.get("resnet")


def test_hyperparameter_sets():
    shared = {"image_size", "batch_size", "init_epochs", "step_epochs", "num_epochs",
              "per_item_lrate", "num_items_per_epoch"}
    assert set(templates.get("resnet_angular_margin").hparams) == shared | {
        "angular_scale", "angular_margin", "embeddings_size"}
    assert set(templates.get("inception_bn").hparams) == shared | {"logreg"}
    assert set(templates.get("resnext").hparams) == shared | {"logreg"}


@pytest.mark.parametrize("template,spec", SPEC_CASES, ids=SPEC_IDS)
def test_ranges_match_guide(template, spec):
    if spec.name in EXPECTED:
        assert (spec.minimum, spec.maximum, spec.step) == EXPECTED[spec.name]


def test_defaults_are_realistic_and_valid():
    for t in ALL:
        config = t.config()
        assert config.image_size == 224
        assert config.num_items_per_epoch is None  # the number of images in the data
        assert config.learning_rate == pytest.approx(config.batch_size * config.per_item_lrate)
    assert templates.get("inception_bn").config().logreg == 1


@pytest.mark.parametrize(
    "name,overrides,words",
    [
        ("inception_bn", {"image_size": 40}, ["image_size=40", "grid", "32", "1024", "step 16"]),
        ("inception_bn", {"image_size": 16}, ["image_size=16", "out of range"]),
        ("inception_bn", {"image_size": 1040}, ["image_size=1040", "out of range"]),
        ("inception_bn", {"image_size": 224.5}, ["image_size=224.5", "integer"]),
        ("inception_bn", {"image_size": "224"}, ["image_size='224'", "str"]),
        ("inception_bn", {"image_size": True}, ["image_size=True"]),
        ("resnext", {"batch_size": 0}, ["batch_size=0", "[1, 128]"]),
        ("resnext", {"batch_size": 129}, ["batch_size=129"]),
        ("resnext", {"init_epochs": 0}, ["init_epochs=0"]),
        ("resnext", {"step_epochs": 201}, ["step_epochs=201"]),
        ("resnext", {"num_epochs": -1}, ["num_epochs=-1"]),
        ("resnext", {"per_item_lrate": -0.1}, ["per_item_lrate=-0.1"]),
        ("resnext", {"per_item_lrate": float("nan")}, ["per_item_lrate=nan"]),
        ("resnext", {"num_items_per_epoch": 0}, ["num_items_per_epoch=0"]),
        ("resnext", {"logreg": 2}, ["logreg=2", "[0, 1]"]),
        ("resnet_angular_margin", {"angular_scale": 17}, ["angular_scale=17", "grid", "step 16"]),
        ("resnet_angular_margin", {"angular_scale": 144}, ["angular_scale=144"]),
        ("resnet_angular_margin", {"angular_margin": 0.05}, ["angular_margin=0.05", "0.1", "0.9"]),
        ("resnet_angular_margin", {"angular_margin": 1.0}, ["angular_margin=1.0"]),
        ("resnet_angular_margin", {"embeddings_size": 0}, ["embeddings_size=0"]),
        ("resnet_angular_margin", {"logreg": 1}, ["no hyperparameter logreg"]),
        ("inception_bn", {"angular_scale": 64}, ["no hyperparameter angular_scale"]),
        ("resnext", {"arch": "resnet50"}, ["arch='resnet50'", "resnext50_32x4d"]),
    ],
)
def test_invalid_values_name_the_parameter(name, overrides, words):
    with pytest.raises(ValueError) as error:
        templates.get(name).config(**overrides)
    for word in words:
        assert word in str(error.value)


def _valid_values(spec):
    low = spec.minimum
    high = spec.maximum if spec.maximum is not None else (10**6 if spec.kind is int else 10.0)
    if spec.step is not None:
        return st.integers(0, int((high - low) // spec.step)).map(lambda k: spec.kind(low + k * spec.step))
    return st.floats(low, high, allow_nan=False, allow_infinity=False)


@settings(max_examples=25, deadline=None)
@given(data=st.data())
@pytest.mark.parametrize("template,spec", SPEC_CASES, ids=SPEC_IDS)
def test_every_valid_value_accepted(template, spec, data):
    value = data.draw(_valid_values(spec))
    assert template.config(**{spec.name: value})[spec.name] == value


def _invalid_values(spec):
    below = st.floats(-1e6, spec.minimum, exclude_max=True, allow_nan=False)
    options = [below, st.just(float("nan")), st.just(float("inf")), st.text(max_size=3)]
    if spec.maximum is not None:
        options.append(st.floats(spec.maximum, 1e7, exclude_min=True, allow_nan=False))
    if spec.step is not None:
        high = spec.maximum if spec.maximum is not None else 10**6
        off_grid = st.floats(spec.minimum, high, allow_nan=False).filter(
            lambda v: not math.isclose(((v - spec.minimum) / spec.step) % 1, 0, abs_tol=1e-6)
            and not math.isclose(((v - spec.minimum) / spec.step) % 1, 1, abs_tol=1e-6))
        options.append(off_grid)
    return st.one_of(*options)


@settings(max_examples=25, deadline=None)
@given(data=st.data())
@pytest.mark.parametrize("template,spec", SPEC_CASES, ids=SPEC_IDS)
def test_every_invalid_value_rejected_with_its_name(template, spec, data):
    value = data.draw(_invalid_values(spec))
    with pytest.raises(ValueError, match=f"^{spec.name}="):
        template.config(**{spec.name: value})


def test_config_is_immutable_mapping_with_replace():
    config = templates.get("resnet_angular_margin").config(angular_scale=32)
    assert config.angular_scale == 32 and config["angular_scale"] == 32
    assert config.to_dict()["template"] == "resnet_angular_margin"
    assert config.replace(angular_margin=0.3).angular_margin == 0.3
    assert config.angular_margin == 0.5
    with pytest.raises(ValueError, match="angular_margin=2"):
        config.replace(angular_margin=2)
    with pytest.raises(AttributeError):
        config.nonexistent


def test_command_line_flags_come_from_the_specs():
    template = templates.get("resnext")
    parser = argparse.ArgumentParser()
    template.add_arguments(parser)
    args = parser.parse_args(["--image_size", "64", "--logreg", "0", "--arch", "resnext50_32x4d"])
    config = template.config_from_args(args)
    assert (config.image_size, config.logreg, config.arch) == (64, 0, "resnext50_32x4d")
    assert config.batch_size == template.hparams["batch_size"].default
    bad = parser.parse_args(["--image_size", "40"])
    with pytest.raises(ValueError, match="image_size=40"):
        template.config_from_args(bad)
    help_text = parser.format_help()
    for name in template.hparams:
        assert f"--{name}" in help_text
