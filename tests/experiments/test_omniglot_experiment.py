"""experiments/omniglot.py: its test set (background_small2 without the concepts background_small1 also
has), its pixel baseline, its commands and its table (no training)."""

import argparse
import json
import os
import shlex

import numpy as np
import pytest
from PIL import Image

import _experiment_script as experiment_script
from jaxembed import data as data_lib


@pytest.fixture(scope="module")
def script():
    return experiment_script.load("omniglot")


@pytest.fixture(scope="module")
def omniglot(script):
    if not os.path.isdir(script.SHARED):
        pytest.skip(f"the shared Omniglot zips are not at {script.SHARED}")
    return script


def test_the_test_set_holds_only_concepts_never_trained_on(omniglot, tmp_path):
    train_folder, unseen = omniglot.splits(str(tmp_path))  # what every Omniglot script scores on
    train = data_lib.load_source(train_folder)
    test = data_lib.load_source(omniglot.extract("images_background_small2", str(tmp_path)))
    assert (len(train.concepts), len(test.concepts)) == (136, 156)
    # The splits share two whole alphabets, drawing for drawing: why the filter exists.
    shared = set(train.concepts) & set(test.concepts)
    assert {name.split("/")[0] for name in shared} == {"Greek", "Latin"} and len(shared) == 50

    assert unseen.items == omniglot.unseen_concepts(test, train).items
    assert not set(unseen.concepts) & set(train.concepts)
    assert (len(unseen), len(unseen.concepts)) == (3120 - 1000, 156 - 50)
    assert {name.split("/")[0] for name in unseen.concepts} == {"Japanese_(katakana)", "Sanskrit", "Tagalog"}
    # Every kept image still carries its own concept's name.
    kept = {path: unseen.concepts[labels[0]] for path, labels in zip(unseen.items, unseen.labels, strict=True)}
    original = {path: test.concepts[labels[0]] for path, labels in zip(test.items, test.labels, strict=True)}
    assert all(original[path] == name for path, name in kept.items())


def test_pixel_baseline_sees_the_pixels_a_model_sees(script, tmp_path):
    # Two alphabets of two characters, three drawings each: a bar at the character's own place.
    for alphabet in ("A", "B"):
        for character in range(2):
            folder = tmp_path / alphabet / f"character{character}"
            folder.mkdir(parents=True)
            for drawing in range(3):
                pixels = np.full((40, 40), 255, np.uint8)
                row = 4 + 16 * character + 2 * drawing + (8 if alphabet == "B" else 0)
                pixels[row:row + 3, 5:35] = 0
                Image.fromarray(pixels).save(folder / f"{drawing}.png")
    images = data_lib.load_source(str(tmp_path))
    row = script.baseline_row(images, 32)
    assert (row["method"], row["command"], row["num_images"], row["num_concepts"]) == ("raw pixels, 32 px", "-", 12, 4)
    assert row["recall@1"] == 1.0 and 0 < row["map@r"] <= 1
    assert "one_shot_2way" in row  # episodes within an alphabet, which holds two characters
    assert script.runner.eval_pixels(images, 32).shape == (12, 32, 32)


@pytest.mark.results
def test_rows_train_with_the_committed_commands_and_tabulate_as_committed(script):
    results = experiment_script.EXPERIMENTS / "results" / "omniglot.json"
    rows = json.loads(results.read_text())
    assert script.markdown(rows) == results.with_suffix(".md").read_text()
    defaults = dict(image_size=32, num_epochs=5, batch_size=32, stem=script.RECIPE_STEM, rotations=4,
                    mirror=False, rotation_degrees=0.0, shear_degrees=0.0, embedding_layer=None,
                    embedding_pooling="avg", trainer_flags="")  # a row's script_args hold those it was run with
    for row in rows:
        if row["command"] != "-":
            name = row["method"].split(" ")[0]
            args = argparse.Namespace(**{**defaults, **row.get("script_args", {})})
            folder = script.copies_folder("/tmp/jaxembed-omniglot/images_background_small1", args.rotations, args.mirror)
            flags = script.train_flags(name, args, folder)
            assert shlex.join(["python", "-m", "jaxembed.train", *flags]) == row["command"]


def test_rotated_copies_are_new_concepts_turned_exactly(script, tmp_path):
    pixels = np.arange(6 * 6, dtype=np.uint8).reshape(6, 6) * 7  # no symmetry: every turn is another image
    folder = tmp_path / "train" / "Alphabet" / "character01"
    folder.mkdir(parents=True)
    Image.fromarray(pixels).save(folder / "0001_01.png")
    rotated = script.with_glyph_copies(str(tmp_path / "train"), 4)
    images = data_lib.load_source(rotated)
    assert sorted(images.concepts) == ["Alphabet/character01", "Alphabet/character01_r180",
                                       "Alphabet/character01_r270", "Alphabet/character01_r90"]
    for degrees in (0, 90, 180, 270):
        name = "character01" if degrees == 0 else f"character01_r{degrees}"
        turned = np.asarray(Image.open(os.path.join(rotated, "Alphabet", name, "0001_01.png")))
        np.testing.assert_array_equal(turned, np.rot90(pixels, degrees // 90))  # counter-clockwise, as rot90
    assert script.with_glyph_copies(str(tmp_path / "train"), 1) == str(tmp_path / "train")


def test_mirrored_copies_are_new_concepts_mirrored_then_turned(script, tmp_path):
    pixels = np.arange(5 * 7, dtype=np.uint8).reshape(5, 7) * 7  # no symmetry, not square
    folder = tmp_path / "train" / "Alphabet" / "character01"
    folder.mkdir(parents=True)
    Image.fromarray(pixels).save(folder / "0001_01.png")
    copies = script.with_glyph_copies(str(tmp_path / "train"), 4, mirror=True)
    assert copies == str(tmp_path / "train_rot4_mirror") == script.copies_folder(str(tmp_path / "train"), 4, True)
    expected = {}  # the dihedral group: mirrored left-right first, then turned counter-clockwise
    for mirrored, source in (("", pixels), ("_m", pixels[:, ::-1])):
        for degrees in (0, 90, 180, 270):
            expected["character01" + mirrored + (f"_r{degrees}" if degrees else "")] = np.rot90(source, degrees // 90)
    assert sorted(data_lib.load_source(copies).concepts) == sorted(f"Alphabet/{name}" for name in expected)
    for name, want in expected.items():
        got = np.asarray(Image.open(os.path.join(copies, "Alphabet", name, "0001_01.png")))
        np.testing.assert_array_equal(got, want)
    mirrors_only = script.with_glyph_copies(str(tmp_path / "train"), 1, mirror=True)
    assert sorted(os.listdir(os.path.join(mirrors_only, "Alphabet"))) == ["character01", "character01_m"]


def test_eight_rotations_add_glyphs_turned_by_45_degrees(script, tmp_path):
    pixels = np.full((21, 21), 255, np.uint8)
    pixels[10, 3:18] = 0  # a black horizontal bar through the centre
    folder = tmp_path / "train" / "Alphabet" / "character01"
    folder.mkdir(parents=True)
    Image.fromarray(pixels).save(folder / "0001_01.png")
    copies = script.with_glyph_copies(str(tmp_path / "train"), 8)
    assert sorted(data_lib.load_source(copies).concepts) == sorted(
        f"Alphabet/character01{f'_r{degrees}' if degrees else ''}" for degrees in range(0, 360, 45))
    for degrees in (90, 180, 270):  # quarter turns stay exact pixel moves
        turned = np.asarray(Image.open(os.path.join(copies, "Alphabet", f"character01_r{degrees}", "0001_01.png")))
        np.testing.assert_array_equal(turned, np.rot90(pixels, degrees // 90))
    for degrees, slope in ((45, -1), (135, 1)):  # rows grow downwards: counter-clockwise 45 deg runs up to the right
        ink = 255 - np.asarray(Image.open(os.path.join(copies, "Alphabet", f"character01_r{degrees}", "0001_01.png")),
                               np.float64)
        rows, cols = np.nonzero(ink > 127)
        assert len(rows) >= 10 and np.all(rows - 10 == slope * (cols - 10))  # on the diagonal through the centre
        assert ink[0, 0] == ink[0, -1] == 0  # the corners that turned in from outside are white
