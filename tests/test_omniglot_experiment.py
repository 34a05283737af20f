"""experiments/omniglot.py's test set: background_small2 without the concepts background_small1 also has."""

import os

import pytest

import _experiment_script as experiment_script
from jaxembed import data as data_lib


@pytest.fixture(scope="module")
def omniglot():
    module = experiment_script.load("omniglot")
    if not os.path.isdir(module.SHARED):
        pytest.skip(f"the shared Omniglot zips are not at {module.SHARED}")
    return module


def test_the_test_set_holds_only_concepts_never_trained_on(omniglot, tmp_path):
    train = data_lib.load_source(omniglot.extract("images_background_small1", str(tmp_path)))
    test = data_lib.load_source(omniglot.extract("images_background_small2", str(tmp_path)))
    assert (len(train.concepts), len(test.concepts)) == (136, 156)
    # The splits share two whole alphabets, drawing for drawing: why the filter exists.
    shared = set(train.concepts) & set(test.concepts)
    assert {name.split("/")[0] for name in shared} == {"Greek", "Latin"} and len(shared) == 50

    unseen = omniglot.unseen_concepts(test, train)
    assert not set(unseen.concepts) & set(train.concepts)
    assert (len(unseen), len(unseen.concepts)) == (3120 - 1000, 156 - 50)
    assert {name.split("/")[0] for name in unseen.concepts} == {"Japanese_(katakana)", "Sanskrit", "Tagalog"}
    # Every kept image still carries its own concept's name.
    kept = {path: unseen.concepts[labels[0]] for path, labels in zip(unseen.items, unseen.labels, strict=True)}
    original = {path: test.concepts[labels[0]] for path, labels in zip(test.items, test.labels, strict=True)}
    assert all(original[path] == name for path, name in kept.items())
