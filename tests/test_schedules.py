"""The learning-rate schedule against hand-derived values at and around every boundary."""

import jax
import numpy as np
import pytest

from hypothesis import given
from hypothesis import strategies as st

from jaxembed import data, schedules


def test_steps_per_epoch_rounds_up():
    assert schedules.steps_per_epoch(100, 10) == 10
    assert schedules.steps_per_epoch(101, 10) == 11
    assert schedules.steps_per_epoch(5, 10) == 1
    with pytest.raises(ValueError, match="batch_size=0"):
        schedules.steps_per_epoch(5, 0)


@given(batches=st.integers(1, 500), batch_size=st.integers(1, 128), processes=st.sampled_from([1, 2, 4, 8]),
       remainder=st.integers(0, 10_000))
def test_the_schedules_epoch_and_the_pipelines_pass_agree_where_they_must(batches, batch_size, processes, remainder):
    """An epoch of the schedule is one pass of the pipeline when the images divide into global batches;
    otherwise the schedule's epoch (rounded up) holds one step more than the pass's full batches, at most."""
    whole = batches * batch_size * processes
    per_process = batch_size  # the global batch is split over the processes
    assert schedules.steps_per_epoch(whole, batch_size * processes) == data.batches_per_pass(whole, per_process,
                                                                                             processes) == batches
    images = whole + remainder % (batch_size * processes)
    steps, passes = schedules.steps_per_epoch(images, batch_size * processes), data.batches_per_pass(
        images, per_process, processes)
    assert passes <= steps <= passes + 1


@pytest.mark.parametrize("items,batch", [(1000, 32), (1797, 64), (50, 7)])
def test_values_at_and_around_each_boundary(items, batch):
    per_item, init, step, total, decay = 0.001, 3, 2, 9, 0.1
    schedule = schedules.learning_rate_schedule(
        batch_size=batch, per_item_lrate=per_item, init_epochs=init, step_epochs=step,
        num_epochs=total, items_per_epoch=items, decay=decay)
    spe = -(-items // batch)  # ceil
    base = batch * per_item
    # boundaries at epochs 3, 5, 7 (9 is the end, no decay there)
    for k, epoch in enumerate([3, 5, 7], start=1):
        boundary = epoch * spe
        np.testing.assert_allclose(float(schedule(boundary - 1)), base * decay ** (k - 1), rtol=1e-6)
        np.testing.assert_allclose(float(schedule(boundary)), base * decay ** k, rtol=1e-6)
        np.testing.assert_allclose(float(schedule(boundary + 1)), base * decay ** k, rtol=1e-6)
    np.testing.assert_allclose(float(schedule(0)), base, rtol=1e-6)
    np.testing.assert_allclose(float(schedule(total * spe - 1)), base * decay ** 3, rtol=1e-6)
    np.testing.assert_allclose(float(schedule(total * spe + 100)), base * decay ** 3, rtol=1e-6)
    assert schedules.total_steps(batch_size=batch, num_epochs=total, items_per_epoch=items) == total * spe


def test_jittable_and_init_epochs_past_the_end_hold_the_rate():
    schedule = schedules.learning_rate_schedule(
        batch_size=4, per_item_lrate=0.25, init_epochs=10, step_epochs=1, num_epochs=5, items_per_epoch=8)
    values = jax.jit(jax.vmap(schedule))(np.arange(0, 20))
    np.testing.assert_allclose(np.asarray(values), 1.0)


def test_decay_epochs():
    assert schedules.decay_epochs(init_epochs=10, step_epochs=10, num_epochs=30) == [10, 20]
    assert schedules.decay_epochs(init_epochs=1, step_epochs=1, num_epochs=1) == []


@pytest.mark.parametrize("bad,word", [({"per_item_lrate": -1.0}, "per_item_lrate"),
                                      ({"init_epochs": 0}, "init_epochs"),
                                      ({"decay": 0.0}, "decay"),
                                      ({"items_per_epoch": 0}, "items_per_epoch")])
def test_invalid_arguments(bad, word):
    args = dict(batch_size=4, per_item_lrate=0.1, init_epochs=1, step_epochs=1, num_epochs=2, items_per_epoch=8)
    with pytest.raises(ValueError, match=word):
        schedules.learning_rate_schedule(**{**args, **bad})
