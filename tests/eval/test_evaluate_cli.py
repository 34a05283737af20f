"""N-way one-shot accuracy (`jaxembed.metrics`) on hand-computed cases, and `python -m jaxembed.evaluate`."""

import json

import numpy as np
import pytest

from jaxembed.cli import embed as embed_cli
from jaxembed.cli import evaluate as evaluate_cli
import tiny
from jaxembed import metrics
from jaxembed.inference import embed
from jaxembed.eval import evaluate


def _unit(angles_degrees):
    a = np.deg2rad(np.asarray(angles_degrees, float))
    return np.stack([np.cos(a), np.sin(a)], axis=1)


def test_one_shot_every_episode_hand_computed():
    # Class a sits at 0 and 180 degrees, b at 89 and 91. Whichever a is the support, the other a is
    # 180 degrees from it and about 90 from b's support: always wrong. Each b query is 2 degrees from
    # its support: always right. So every 2-way episode scores exactly 1/2.
    embeddings = _unit([0, 180, 89, 91]) * np.array([[1.0], [3.0], [0.5], [2.0]])  # lengths do not matter
    labels = ["a", "a", "b", "b"]
    for seed in range(3):
        assert metrics.n_way_one_shot_accuracy(embeddings, labels, n_way=2, episodes=7, seed=seed) == 0.5


def test_one_shot_expectation_over_supports():
    # a at 0 and 60, b at 90 and 100. Support a@0: the query a@60 is nearer b (30 or 40 degrees) than a
    # (60): that episode scores 1/2. Support a@60: the query a@0 is nearer it (60) than b (90+): 1.
    # b queries are always right. Each a-support is drawn with probability 1/2: expectation 3/4.
    embeddings, labels = _unit([0, 60, 90, 100]), np.array([0, 0, 1, 1])
    got = metrics.n_way_one_shot_accuracy(embeddings, labels, n_way=2, episodes=4000, seed=0)
    assert got == pytest.approx(0.75, abs=0.02)  # the standard error is 0.25 / sqrt(4000) = 0.004
    assert got == metrics.n_way_one_shot_accuracy(embeddings, labels, n_way=2, episodes=4000, seed=0)


def test_one_shot_episodes_stay_within_a_group():
    # Alphabet x: A at 0/2 degrees, B at 90/92. Alphabet y: C at 1/3 (interleaved with A), D at 180/182.
    embeddings = _unit([0, 2, 90, 92, 1, 3, 180, 182])
    labels = np.array(["x/A", "x/A", "x/B", "x/B", "y/C", "y/C", "y/D", "y/D"])
    groups = metrics.concept_groups(labels)
    np.testing.assert_array_equal(groups, list("xxxxyyyy"))
    # Within an alphabet the two classes are far apart: every episode is perfect.
    assert metrics.n_way_one_shot_accuracy(embeddings, labels, groups, n_way=2, episodes=50) == 1.0
    # Without groups, 1 of the 6 class pairs is {A, C}; over its 4 support choices it scores
    # (1/2 + 0 + 0 + 1/2) / 4 = 1/4 (worked out by hand), the other 5 pairs score 1: 5.25 / 6.
    ungrouped = metrics.n_way_one_shot_accuracy(embeddings, labels, n_way=2, episodes=6000, seed=1)
    assert ungrouped == pytest.approx(5.25 / 6, abs=0.015)
    assert metrics.max_n_way(labels, groups) == 2 and metrics.max_n_way(labels) == 4
    assert metrics.concept_groups(["0", "1"]) is None


def test_one_shot_errors_say_what_is_possible():
    embeddings, labels = _unit([0, 1, 90, 91, 180]), ["a", "a", "b", "b", "c"]  # c has no query
    with pytest.raises(ValueError, match="n_way=3 is more than any group holds: at most 2"):
        metrics.n_way_one_shot_accuracy(embeddings, labels, n_way=3)
    with pytest.raises(ValueError, match="class 'b' has items in more than one group"):
        metrics.n_way_one_shot_accuracy(embeddings, labels, ["x", "x", "x", "y", "y"], n_way=2)
    with pytest.raises(ValueError, match="n_way=1 must be >= 2"):
        metrics.n_way_one_shot_accuracy(embeddings, labels, n_way=1)


def test_cli_on_an_embeddings_file(tmp_path, capsys):
    # The circle of tests/test_evaluate.py, with Omniglot-like names: alphabets x (a, b) and y (c).
    # Nearest others: 0->10, 10->0, 100->115, 115->100 (hits), 200->115 (miss); c/3 at 300 -> c/3 at 310.
    angles = [0, 10, 100, 115, 200, 300, 310]
    labels = ["x/a", "x/a", "x/b", "x/b", "x/a", "y/c", "y/c"]
    path = tmp_path / "embeddings.npz"
    np.savez(path, paths=np.asarray([f"{name}/{i}.png" for i, name in enumerate(labels)]),
             embeddings=_unit(angles).astype(np.float32), labels=np.asarray(labels))
    out = tmp_path / "metrics.json"
    assert evaluate_cli.main(["--embeddings", str(path), "--out", str(out), "--episodes", "300"]) == 0
    written = json.loads(out.read_text())
    assert written["num_images"] == 7 and written["num_concepts"] == 3
    assert written["recall@1"] == pytest.approx(6 / 7)
    # MAP@R: 0 and 10 (R=2) rank their a-neighbour first and a b second: 1/2 each; 100, 115 and the
    # c pair (R=1) score 1; 200 (R=2) ranks 115 and 100 first: 0.
    assert written["map@r"] == pytest.approx((0.5 + 0.5 + 1 + 1 + 0 + 1 + 1) / 7)
    # Only alphabet x has two classes, so the requested 20-way becomes 2-way within x.
    assert written["one_shot_2way"] == metrics.n_way_one_shot_accuracy(
        _unit(angles), labels, metrics.concept_groups(labels), n_way=2, episodes=300)
    table = capsys.readouterr().out
    assert "recall@1" in table and "0.8571" in table and "one_shot_2way" in table


def test_cli_needs_images_with_a_workdir(capsys):
    with pytest.raises(SystemExit):
        evaluate_cli.main(["--workdir", "somewhere"])
    assert "--workdir needs --images" in capsys.readouterr().err


def test_cli_on_a_workdir_equals_the_cli_on_its_embeddings(tiny_run, tmp_path):
    run = tiny_run  # conftest.py: the session's shared tiny inception_bn run
    images = tiny.write_digits_folder(str(tmp_path / "digits"), step=30)  # 60 images: one batch, a quick test
    assert evaluate_cli.main(["--workdir", run.workdir, "--images", images, "--out", str(tmp_path / "a.json"),
                          "--episodes", "50"]) == 0
    direct = json.loads((tmp_path / "a.json").read_text())
    assert embed_cli.main(["--workdir", run.workdir, "--images", images, "--out", str(tmp_path / "e.npz")]) == 0
    assert evaluate_cli.main(["--embeddings", str(tmp_path / "e.npz"), "--out", str(tmp_path / "b.json"),
                          "--episodes", "50"]) == 0
    via_file = json.loads((tmp_path / "b.json").read_text())
    assert direct["num_images"] == 60 and direct["num_concepts"] == 10
    for name in ("recall@1", "recall@5", "map@r", "one_shot_10way"):
        assert direct[name] == pytest.approx(via_file[name], abs=1e-6)
    # The run is a sigmoid classifier over the same 10 concepts: every image is scored.
    assert direct["num_classified"] == 60 and 0 <= direct["mAP"] <= 1
