"""One tiny finished training run, trained once per test session and shared by the test modules that
need a workdir (test_evaluate_cli.py, test_report.py, test_export.py).

Shared fixtures would belong in conftest.py; a memoised helper that each module's fixture calls does
the same without it. The settings match tests/test_train.py: inception_bn at 32 px, batch 8, 4 steps,
every 10th image of the embedded default digits, here written out as a folder so that `run.json`
names the data and the held-out split can be recreated from it.
"""

from __future__ import annotations

import dataclasses
import os

from jaxembed import data as data_lib
from jaxembed import templates, train

TINY = dict(arch="inception_bn", image_size=32, batch_size=8, init_epochs=1, step_epochs=1, num_epochs=2,
            num_items_per_epoch=16, per_item_lrate=0.002)
OPTIONS = train.TrainOptions(progress=False, log_every=1, checkpoint_every=2, eval_batch_size=64)


@dataclasses.dataclass(frozen=True)
class TinyRun:
    workdir: str  # the finished run
    images: str  # its data: a folder <digit>/<position>.png of 180 images, 10 concepts
    summary: dict


_RUNS: dict[str, TinyRun] = {}  # memo for the session: the pytest process runs the training once


def write_digits_folder(root: str, step: int = 10) -> str:
    """Every `step`-th image of the embedded default, as PNG files `root/<digit>/<position>.png`."""
    digits = data_lib.load_source(None)
    for position in range(0, len(digits), step):
        folder = os.path.join(root, digits.concepts[digits.labels[position][0]])
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, f"{position:04d}.png"), "wb") as f:
            f.write(digits.items[position])  # the default keeps each image as PNG bytes
    return root


def tiny_run(tmp_path_factory) -> TinyRun:
    """The shared tiny inception_bn run (trained on first use)."""
    if "inception_bn" not in _RUNS:
        base = tmp_path_factory.mktemp("tiny_run")
        images = write_digits_folder(str(base / "digits"))
        workdir = str(base / "workdir")
        config = templates.get("inception_bn").config(**TINY)
        summary = train.train_and_evaluate(config, workdir, data_spec=images, options=OPTIONS)
        assert summary["finished"], summary
        _RUNS["inception_bn"] = TinyRun(workdir=workdir, images=images, summary=summary)
    return _RUNS["inception_bn"]
