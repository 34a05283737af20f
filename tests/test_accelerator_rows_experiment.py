"""experiments/accelerator_rows.py: the batches it feeds the trainer's step and the loss record it keeps
(no training)."""

import io
import json
from multiprocessing.pool import ThreadPool
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

import _experiment_script as experiment_script
from jaxembed import rundir
from jaxembed.data import decode_image, preprocess_for_eval
from jaxembed.train.hooks import MetricsLog


@pytest.fixture(scope="module")
def rows_lib():
    return experiment_script.load("accelerator_rows")


def _png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def test_feeder_batches_are_the_training_split_images_with_their_labels(rows_lib, monkeypatch):
    """With no augmentation (pad-and-crop by 0 pixels, no flip) a batch image is the evaluation view of
    the image it names: the rows index the training split, whose images sit at `train_positions` of the
    whole data set (here every other image, so confusing the two fails)."""
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (20, 28, 28), dtype=np.uint8)
    monkeypatch.setattr(rows_lib, "_ITEMS", tuple(_png(image) for image in images))
    positions = np.arange(1, 20, 2)
    labels = np.array([3, 1, 4, 1, 5, 9, 2, 6, 5, 3])
    config = SimpleNamespace(min_crop_area=0.6, flip=False, crop="pad", crop_padding=0, random_erasing=0.0,
                             rotation_degrees=0.0, shear_degrees=0.0, image_size=32, batch_size=4, seed=0)
    run = SimpleNamespace(config=config, train_data=SimpleNamespace(primary_labels=labels), num_classes=10)
    with ThreadPool(2) as pool:
        batches = iter(rows_lib.Feeder(pool, run, positions))
        epochs = [[next(batches) for _ in range(2)] for _ in range(2)]  # 10 images: 2 batches of 4 per epoch
    for epoch in epochs:
        rows = np.concatenate([batch["index"] for batch in epoch])
        assert len(set(rows)) == 8 and set(rows) <= set(range(10))
        for batch in epoch:
            np.testing.assert_array_equal(batch["label"], labels[batch["index"]])
            np.testing.assert_array_equal(batch["labels"], np.eye(10)[labels[batch["index"]]])
            for row, image in zip(batch["index"], batch["image"]):
                expected = preprocess_for_eval(decode_image(_png(images[positions[row]])), 32)
                np.testing.assert_array_equal(image, expected)
    assert not np.array_equal(np.concatenate([b["index"] for b in epochs[0]]),
                              np.concatenate([b["index"] for b in epochs[1]]))  # reshuffled every epoch




def test_loss_windows_are_what_the_trainer_logs_for_the_same_step_losses(rows_lib, tmp_path):
    """Second implementation: the trainer's `MetricsLog` fed the same step losses writes the same window
    means and maxima (`loss`, `loss_max`) at the same steps, the last, shorter window included."""
    losses = np.random.default_rng(0).exponential(2.0, 23)
    run = SimpleNamespace(config=SimpleNamespace(batch_size=8, log_every=5, progress=False),
                          steps_per_epoch=10, schedule=lambda step: 0.1, template=None)
    run.config.template = SimpleNamespace(name="inception_bn")
    log = MetricsLog(rundir.RunDir(str(tmp_path)), run, start=0, end=len(losses))
    for step, loss in enumerate(losses):
        log.record(step, {"loss": loss})
    log.close()
    logged = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logged] == [5, 10, 15, 20, 23]
    windows = rows_lib.loss_windows(losses, 5, run.steps_per_epoch)
    assert [(w["step"], w["epoch"]) for w in windows] == [(r["step"], r["epoch"]) for r in logged]
    np.testing.assert_allclose([(w["loss"], w["loss_max"]) for w in windows],
                               [(r["loss"], r["loss_max"]) for r in logged], rtol=1e-12)


def test_largest_loss_spike_is_the_largest_max_over_mean_after_the_warmup(rows_lib):
    """The rows' spike is the trainer runs' (`runner.largest_loss_spike`) on records of the same form."""
    windows = rows_lib.loss_windows(np.array([9.0, 1.0, 2.0, 6.0, 2.0, 1.0, 3.0]), 2, steps_per_epoch=1)
    assert [(w["step"], w["loss"], w["loss_max"]) for w in windows] == [(2, 5.0, 9.0), (4, 4.0, 6.0),
                                                                       (6, 1.5, 2.0), (7, 3.0, 3.0)]
    spike = rows_lib.runner.largest_loss_spike
    # The first window (ratio 1.8) ends inside a 3-epoch warmup (1 step an epoch); then 6/4, 2/1.5, 3/3.
    assert spike(windows, warmup_epochs=3) == pytest.approx(1.5)
    assert spike(windows, warmup_epochs=0) == pytest.approx(1.8)
    assert spike(windows, warmup_epochs=7) is None
