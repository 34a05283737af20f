"""The training-recipe options (issue 18), each against an independent reference: a hand-computed
value, a formula, or an image whose left and right halves differ."""

from __future__ import annotations

import dataclasses
import functools
import io
import json
import math
import os
import types

import flax.linen as flax_nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import tiny
from PIL import Image

from jaxembed import data as data_lib
from jaxembed.data import transforms
from jaxembed import losses, metrics, models, rundir, schedules, tasks, templates
from jaxembed.train import build_optimizer, hooks, loop, prepare_run

# ----------------------------------------------------------------------------- flip


def _half_black_half_white(size: int = 40) -> bytes:
    pixels = np.zeros((size, size, 3), np.uint8)
    pixels[:, size // 2:] = 255
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def _dark_on_left(flip: bool) -> np.ndarray:
    """For 64 augmented copies of a left-black/right-white image: whether each still has black left."""
    image = _half_black_half_white()
    images = data_lib.LabelledImages(items=(image,) * 8, labels=((0,),) * 8, concepts=("half",),
                                     item_names=tuple(f"half{i}" for i in range(8)))
    batches = data_lib.train_batches(images, image_size=32, batch_size=8, seed=0,
                                     augmentation=data_lib.Augmentation(crop_area=(0.5, 1.0), flip=flip))
    pixels = np.concatenate([next(batches)["image"] for _ in range(8)]).astype(np.float32)
    return pixels[:, :, :8].mean(axis=(1, 2, 3)) < pixels[:, :, -8:].mean(axis=(1, 2, 3))


def test_without_flip_no_image_is_mirrored():
    assert _dark_on_left(flip=False).all()


def test_with_flip_about_half_are_mirrored():
    mirrored = np.count_nonzero(~_dark_on_left(flip=True))
    assert 16 <= mirrored <= 48  # 64 fair coin flips: outside this is 1 in 10^5


@pytest.mark.parametrize("flip", [False, True])
def test_flip_is_off_unless_asked_and_reaches_the_pipeline(monkeypatch, flip):
    assert templates.get("inception_bn").config().flip is False
    seen = {}

    def spy(*args, **kwargs):
        seen.update(kwargs)
        raise RuntimeError("stop here")

    monkeypatch.setattr(data_lib, "train_batches", spy)
    run = prepare_run(tiny.config(flip=flip), tiny.digits())
    with pytest.raises(RuntimeError, match="stop here"):
        next(loop.training_batches(run, 0))
    assert seen["augmentation"].flip is flip


# ----------------------------------------------------------------------------- pad-and-crop, random erasing


def _noise_image(size: int = 32, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8))


def _augment(image, randoms, **options):
    augmentation = transforms.Augmentation(**{"crop_area": (0.5, 1.0), "flip": False, **options})
    return augmentation(image, 32, np.asarray(randoms, np.float32))


def test_pad_crop_is_a_shift_of_the_edge_padded_image():
    image = _noise_image()
    padded = np.pad(np.asarray(image), ((4, 4), (4, 4), (0, 0)), mode="edge")  # the reference, by NumPy
    assert np.array_equal(np.asarray(transforms.center_crop(image, 32)), np.asarray(image))  # 32 px: no resampling
    rng = np.random.default_rng(1)
    offsets = set()
    for randoms in rng.random((200, transforms.NUM_AUGMENT_RANDOMS)):
        out = _augment(image, randoms, crop="pad", crop_padding=4)
        left, top = (min(int(u * 9), 8) for u in randoms[2:4])  # x, y: one of the 9 offsets 0..8 each
        assert np.array_equal(out, padded[top:top + 32, left:left + 32])
        offsets.add((left, top))
    assert len(offsets) > 60  # of the 81 shifts, 200 draws leave out ~7 on average
    assert np.array_equal(_augment(image, [0.5] * transforms.NUM_AUGMENT_RANDOMS, crop="pad", crop_padding=0),
                          np.asarray(image))


def test_random_erasing_greys_one_rectangle_of_the_allowed_size():
    image = _noise_image(seed=2)
    rng = np.random.default_rng(3)
    erased_count = 0
    for randoms in rng.random((200, transforms.NUM_AUGMENT_RANDOMS)):
        plain = _augment(image, randoms)
        out = _augment(image, randoms, erase_probability=0.5)
        if randoms[5] >= 0.5:  # the erasing's first number decides: here, no erasing
            assert np.array_equal(out, plain)
            continue
        erased_count += 1
        grey = np.all(out == transforms.ERASE_FILL, axis=-1)
        rows, cols = np.nonzero(grey & np.any(out != plain, axis=-1))  # noise is almost never exactly grey
        top, bottom, left, right = rows.min(), rows.max() + 1, cols.min(), cols.max() + 1
        assert grey[top:bottom, left:right].all()  # one solid grey rectangle ...
        outside = np.ones((32, 32), bool)
        outside[top:bottom, left:right] = False
        assert np.array_equal(out[outside], plain[outside])  # ... and nothing else changed
        area = (bottom - top) * (right - left) / 32**2
        assert 0.015 <= area <= 0.36, area  # 2%-33% of the image, up to the rounding of its sides
        assert 0.25 <= (bottom - top) / (right - left) <= 4.0  # aspect 0.3..3.3, rounded
    assert 70 <= erased_count <= 130  # 200 coin flips at 0.5
    assert all(np.array_equal(_augment(image, randoms, erase_probability=0.0), _augment(image, randoms))
               for randoms in rng.random((20, transforms.NUM_AUGMENT_RANDOMS)))


def test_crop_erasing_rotation_and_shear_options_reach_the_pipeline(monkeypatch):
    assert set(templates.RUN_OPTIONS["crop"].choices) == set(transforms.CROPS)
    assert templates.RUN_OPTIONS["shear_degrees"].maximum == transforms.MAX_SHEAR_DEGREES
    assert templates.RUN_OPTIONS["rotation_degrees"].maximum == transforms.MAX_ROTATION_DEGREES
    seen = {}
    monkeypatch.setattr(data_lib, "train_batches", lambda *args, **kwargs: seen.update(kwargs) or iter([]))
    run = prepare_run(tiny.config(crop="pad", crop_padding=2, random_erasing=0.25, rotation_degrees=10,
                                  shear_degrees=15), tiny.digits())
    loop.training_batches(run, 0)
    assert seen["augmentation"] == transforms.Augmentation(crop="pad", crop_padding=2, erase_probability=0.25,
                                                           rotation_degrees=10, shear_degrees=15,
                                                           crop_area=(run.config.min_crop_area, 1.0))


# ----------------------------------------------------------------------------- rotation and shear


@pytest.mark.parametrize("shape", [(7, 7, 1), (8, 8, 3), (32, 32, 3)])
def test_quarter_turns_are_numpys_rot90(shape):
    pixels = np.random.default_rng(4).integers(0, 256, shape, dtype=np.uint8)
    for degrees, quarter_turns in ((90, 1), (180, 2), (-90, -1), (270, 3), (0, 0)):
        assert np.array_equal(transforms.rotate_and_shear(pixels, degrees, 0), np.rot90(pixels, quarter_turns))


@pytest.mark.parametrize("rotation, shear", [(0, 45), (0, -45), (90, 45), (-90, -45), (180, 45)])
def test_a_point_moves_as_the_forward_map_says(rotation, shear):
    # A lone bright pixel on an odd-sized image, where every pixel centre sits at whole offsets from the
    # image centre; with tan(shear) = +-1 and quarter turns its new place is a pixel centre too.
    for dx, dy in ((2, 3), (-3, 1), (1, -2)):
        pixels = np.zeros((15, 15, 1), np.uint8)
        pixels[7 + dy, 7 + dx] = 200
        sheared_x = dx + math.tan(math.radians(shear)) * dy  # S: rows further down shift right
        turn = math.radians(rotation)  # R: counter-clockwise on screen, y pointing down
        new_x = round(sheared_x * math.cos(turn) + dy * math.sin(turn))
        new_y = round(-sheared_x * math.sin(turn) + dy * math.cos(turn))
        expected = np.zeros_like(pixels)
        expected[7 + new_y, 7 + new_x] = 200
        assert np.array_equal(transforms.rotate_and_shear(pixels, rotation, shear), expected), (dx, dy)


@pytest.mark.parametrize("background", [0, 255])
def test_uncovered_corners_get_the_border_colour(background):
    pixels = np.full((33, 33, 3), background, np.uint8)
    pixels[12:21, 12:21] = 255 - background  # a square in the middle, away from the turned corners
    pixels[0, :3] = 128  # a few odd border pixels do not move the median
    turned = transforms.rotate_and_shear(pixels, 45, 20)
    assert np.all(turned[:2, :2] == background) and np.all(turned[-2:, -2:] == background)
    assert np.all(turned[15:18, 15:18] == 255 - background)  # the square's centre stays where it was


def test_augment_rotates_by_the_drawn_angle():
    image = _noise_image(seed=5)
    randoms = np.random.default_rng(6).random(transforms.NUM_AUGMENT_RANDOMS)
    rotation_slot = transforms.CROP_FLIP_RANDOMS + transforms.ERASE_RANDOMS
    plain = _augment(image, randoms)
    for u, turns in ((0.75, 1), (0.25, -1), (1.0, 2), (0.5, 0)):  # uniform in [-180, 180]: u = 0.75 is 90
        randoms[rotation_slot] = u
        assert np.array_equal(_augment(image, randoms, rotation_degrees=180), np.rot90(plain, turns))
    randoms[rotation_slot + 1] = 1.0  # the largest shear: a pixel row below the centre moves right
    sheared = _augment(image, randoms, shear_degrees=45)
    assert np.array_equal(sheared, transforms.rotate_and_shear(plain, 0, 45))


@pytest.mark.parametrize("option", [{"rotation_degrees": -1}, {"rotation_degrees": 181}, {"shear_degrees": 46}])
def test_bad_rotation_or_shear_is_refused_by_name(option):
    with pytest.raises(ValueError, match=next(iter(option))):
        data_lib.Augmentation(**option)


# ----------------------------------------------------------------------------- schedule


SCHEDULE = dict(batch_size=10, per_item_lrate=0.01, init_epochs=2, step_epochs=1, num_epochs=4, items_per_epoch=95)


def test_warmup_scales_the_first_steps_and_keeps_the_template_boundaries():
    # 10 steps per epoch, so a 1.5-epoch warmup is 15 steps; the decays stay at steps 20 and 30.
    schedule = schedules.learning_rate_schedule(**SCHEDULE, warmup_epochs=1.5)
    expected = {0: 0.1 / 15, 1: 0.1 * 2 / 15, 13: 0.1 * 14 / 15, 14: 0.1, 19: 0.1, 20: 0.01, 29: 0.01, 30: 0.001}
    for step, rate in expected.items():
        assert float(schedule(step)) == pytest.approx(rate, rel=1e-6), step


def test_warmup_longer_than_the_first_decay_scales_the_decayed_rate():
    schedule = schedules.learning_rate_schedule(**SCHEDULE, warmup_epochs=2.5)  # 25 steps
    assert float(schedule(21)) == pytest.approx(0.01 * 22 / 25, rel=1e-6)


def test_cosine_schedule_follows_the_formula():
    # In float64: in float32, 1 + cos(x) near x = pi loses digits to cancellation, not to a mistake.
    with jax.enable_x64(True):
        schedule = schedules.learning_rate_schedule(**SCHEDULE, kind="cosine")
        for step in (0, 7, 20, 33, 39, 40, 55):
            expected = 0.1 * (1 + math.cos(math.pi * min(step, 40) / 40)) / 2
            assert float(schedule(step)) == pytest.approx(expected, rel=1e-9, abs=1e-15), step


def test_schedule_refuses_bad_options():
    with pytest.raises(ValueError, match="warmup_epochs"):
        schedules.learning_rate_schedule(**SCHEDULE, warmup_epochs=-1)
    with pytest.raises(ValueError, match="kind"):
        schedules.learning_rate_schedule(**SCHEDULE, kind="linear")


# ----------------------------------------------------------------------------- optimiser


def _updates(config: templates.Config, gradients: list[dict]) -> list[np.ndarray]:
    tx = build_optimizer(optax.constant_schedule(0.5), config)
    params = {"w": jnp.zeros((2,), jnp.float32)}  # 1-D: no weight decay on it
    opt_state = tx.init(params)
    out = []
    for grads in gradients:
        updates, opt_state = tx.update(grads, opt_state, params)
        out.append(np.asarray(updates["w"]))
    return out


def test_gradient_clipping_scales_the_global_norm_down_to_the_limit():
    config = tiny.config(momentum=0.0, clip_grad_norm=1.0)
    (update,) = _updates(config, [{"w": jnp.array([3.0, 4.0])}])  # norm 5
    np.testing.assert_allclose(update, -0.5 * np.array([0.6, 0.8]), rtol=1e-6)
    (small,) = _updates(config, [{"w": jnp.array([0.3, 0.4])}])  # norm 0.5: untouched
    np.testing.assert_allclose(small, -0.5 * np.array([0.3, 0.4]), rtol=1e-6)


def test_nesterov_momentum_by_hand():
    # velocity v_t = g_t + m v_{t-1}; Nesterov's step is lr * (g_t + m v_t).
    m, g1, g2 = 0.9, np.array([1.0, -2.0]), np.array([0.5, 0.25])
    first, second = _updates(tiny.config(momentum=m, nesterov=True), [{"w": jnp.asarray(g1)}, {"w": jnp.asarray(g2)}])
    np.testing.assert_allclose(first, -0.5 * (g1 + m * g1), rtol=1e-6)
    np.testing.assert_allclose(second, -0.5 * (g2 + m * (g2 + m * g1)), rtol=1e-6)


# ----------------------------------------------------------------------------- losses


def test_label_smoothing_by_hand():
    logits, label, eps = jnp.array([[2.0, 0.0, -1.0]]), jnp.array([0]), 0.3
    log_p = np.asarray(jax.nn.log_softmax(logits))[0]
    target = np.full(3, eps / 3) + np.array([1 - eps, 0, 0])
    assert float(losses.softmax_loss(logits, label, eps)) == pytest.approx(-(target * log_p).sum(), rel=1e-6)
    assert float(losses.softmax_loss(logits, label)) == pytest.approx(-log_p[0], rel=1e-6)


def test_label_smoothing_only_with_softmax():
    assert tasks.for_config(tiny.config(logreg=0, label_smoothing=0.1)).label_smoothing == 0.1
    with pytest.raises(ValueError, match="label_smoothing"):
        tasks.for_config(tiny.config(logreg=1, label_smoothing=0.1))


def _arcface_loss_by_hand(features, centers, labels, scale, margin):
    """The ArcFace loss from its definition in float64 numpy (every angle + margin below pi here)."""
    f = features / np.linalg.norm(features, axis=1, keepdims=True)
    c = centers / np.linalg.norm(centers, axis=0, keepdims=True)
    logits = scale * (f @ c)
    rows = np.arange(len(labels))
    logits[rows, labels] = scale * np.cos(np.arccos((f @ c)[rows, labels]) + margin)
    top = logits.max(axis=1)
    return float(np.mean(top + np.log(np.exp(logits - top[:, None]).sum(axis=1)) - logits[rows, labels]))


def test_arcface_margin_warmup_ramps_the_margin_by_the_step():
    # 8 steps per epoch, a half-epoch warmup: W = 4 steps, margin 0.4 * (t + 1) / 4 until step 3.
    rng = np.random.default_rng(0)
    features, centers, labels = rng.normal(size=(6, 5)), rng.normal(size=(5, 3)), np.array([0, 1, 2, 0, 1, 2])
    # Keep theta + m below pi, where the formula has no fallback branch.
    f = features / np.linalg.norm(features, axis=1, keepdims=True)
    c = centers / np.linalg.norm(centers, axis=0, keepdims=True)
    assert np.arccos((f @ c)[np.arange(6), labels]).max() + 0.4 < math.pi
    with jax.enable_x64(True):
        task = tasks.ArcFace(scale=16.0, margin=0.4, embeddings_size=5, margin_warmup_epochs=0.5)
        loss = task.loss_fn(steps_per_epoch=8)
        constant = dataclasses.replace(task, margin_warmup_epochs=0.0).loss_fn(steps_per_epoch=8)
        outputs, params, batch = {"features": jnp.asarray(features)}, {"centers": jnp.asarray(centers)}, {
            "label": jnp.asarray(labels)}
        for step, margin in ((0, 0.1), (1, 0.2), (2, 0.3), (3, 0.4), (4, 0.4), (1000, 0.4), (None, 0.4)):
            expected = _arcface_loss_by_hand(features, centers, labels, 16.0, margin)
            assert float(loss(outputs, params, batch, step=step)) == pytest.approx(expected, rel=1e-12), step
            # Without the warmup every step trains with the whole margin.
            full = _arcface_loss_by_hand(features, centers, labels, 16.0, 0.4)
            assert float(constant(outputs, params, batch, step=step)) == pytest.approx(full, rel=1e-12), step
    # The steps differ measurably: a ramp off by one step would fail above.
    assert _arcface_loss_by_hand(features, centers, labels, 16.0, 0.1) != pytest.approx(
        _arcface_loss_by_hand(features, centers, labels, 16.0, 0.2), rel=1e-3)


def test_the_trainer_gives_the_loss_its_step_so_the_first_step_has_a_fraction_of_the_margin():
    # Second implementation: with margin 0.4 ramped over 4 steps the trainer's first loss is the first
    # loss of the same run with margin 0.1 and no ramp (same initial weights, batch and dropout).
    from jaxembed import parallel
    from jaxembed.train import compile_steps

    def first_loss(**overrides):
        run = prepare_run(tiny.config("resnet_angular_margin", dtype="float64", **overrides), tiny.digits())
        steps = compile_steps(run)
        state = steps.init(jax.random.PRNGKey(0))
        _, metrics = steps.train(state, parallel.global_batch(next(loop.training_batches(run, 0)), run.mesh))
        return float(metrics["loss"]), run

    with jax.enable_x64(True):
        ramped, run = first_loss(angular_margin=0.4, margin_warmup_epochs=2.0)  # 2 steps per epoch
        assert round(run.config.margin_warmup_epochs * run.steps_per_epoch) == 4 and run.task.margin == 0.4
        reduced, _ = first_loss(angular_margin=0.1)
    assert ramped == pytest.approx(reduced, rel=1e-12)


def test_margin_warmup_only_with_arcface_and_a_known_epoch_length():
    with pytest.raises(ValueError, match="margin_warmup_epochs"):
        tasks.for_config(tiny.config("inception_bn", margin_warmup_epochs=1.0))
    task = tasks.for_config(tiny.config("resnet_angular_margin", margin_warmup_epochs=1.0))
    assert task.margin_warmup_epochs == 1.0
    with pytest.raises(ValueError, match="steps_per_epoch"):
        task.loss_fn()


@pytest.mark.parametrize("num_concepts", [10, 1000])
def test_sigmoid_units_start_at_the_prior_so_the_first_step_does_not_grow_with_concepts(num_concepts):
    model = tasks.build_model(tiny.config(logreg=1), num_concepts)
    variables = model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3), jnp.uint8))
    bias = np.asarray(variables["params"]["classifier"]["bias"])
    np.testing.assert_allclose(1 / (1 + np.exp(-bias)), 1 / num_concepts, rtol=1e-5)
    # With every unit at 1/C, the C - 1 negatives' logit gradients add up to (C - 1) / C: softmax's size.
    logits = jnp.asarray(bias)[None]
    targets = jax.nn.one_hot(jnp.array([0]), num_concepts)
    gradient = np.asarray(jax.grad(losses.sigmoid_loss)(logits, targets))[0]
    assert gradient[1:].sum() == pytest.approx((num_concepts - 1) / num_concepts, rel=1e-4)


# ----------------------------------------------------------------------------- small stem


def _activation_sides(arch: str, stem: str, size: int = 32) -> dict[str, int]:
    """The spatial side of each block's output, from the shapes alone (nothing computed)."""
    model = models.create(arch, stem=stem)
    x = jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)
    variables = jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0), x)
    apply = functools.partial(model.apply, capture_intermediates=True, mutable=["intermediates"])
    _, state = jax.eval_shape(apply, variables, x)
    return {name: value["__call__"][0].shape[1] for name, value in state["intermediates"].items()
            if name != "__call__" and value["__call__"][0].ndim == 4}


def test_small_stem_keeps_the_resolution_of_32px_images():
    # ImageNet stem: 32 -> 8 into stage 1, 1x1 in stage 4. Small stem: 32 into stage 1, 4x4 in stage 4.
    imagenet, small = _activation_sides("resnet50", "imagenet"), _activation_sides("resnet50", "small")
    assert (imagenet["stage1_block0"], imagenet["stage4_block2"]) == (8, 1)
    assert (small["stem_conv"], small["stage1_block0"], small["stage4_block2"]) == (32, 32, 4)
    inception = _activation_sides("inception_bn", "small")
    assert (inception["conv1_3x3_s1"], inception["inception_3a"], inception["inception_5b"]) == (32, 16, 4)
    assert _activation_sides("inception_bn", "imagenet")["inception_5b"] == 1


def test_small_s2_stem_halves_the_resolution_of_32px_images():
    # One 3x3 stride-2 convolution, no max-pool: 32 -> 16 into stage 1, 2x2 in stage 4 (twice the
    # ImageNet stem's side, half the small stem's).
    resnet = _activation_sides("resnext50_32x4d", "small_s2")
    assert (resnet["stem_conv"], resnet["stage1_block0"], resnet["stage4_block2"]) == (16, 16, 2)
    inception = _activation_sides("inception_bn", "small_s2")
    assert (inception["conv1_3x3_s2"], inception["inception_3a"], inception["inception_5b"]) == (16, 8, 2)


def test_small_stem_refuses_pretrained_weights(tmp_path):
    config = tiny.config(stem="small", init_from=str(tmp_path / "resnet50.pth"))
    with pytest.raises(ValueError, match="stem"):
        prepare_run(config, tiny.digits())


# ----------------------------------------------------------------------------- weight EMA


def _weights(variables) -> dict[str, np.ndarray]:
    return {jax.tree_util.keystr(path): np.array(leaf) for path, leaf in jax.tree_util.tree_leaves_with_path(variables)}


def _average_by_hand(history: list[dict], decay: float, warmup: bool = True) -> dict[str, np.ndarray]:
    """The moving average of `history` (the weights at the start, then after each step), by the formula:
    after step t (0 for the first), average = d * average + (1 - d) * weights, d = min(decay, (1+t)/(10+t))."""
    average = history[0]
    for step, weights in enumerate(history[1:]):
        d = min(decay, (1 + step) / (10 + step)) if warmup else decay
        average = {name: d * average[name] + (1 - d) * weights[name] for name in average}
    return average


def test_ema_equals_the_hand_computed_average_of_the_weights():
    from jaxembed import parallel
    from jaxembed.train import compile_steps

    # decay 0.2: the warmup's (1+t)/(10+t) = 0.1, 0.18 rules the first two steps, 0.2 the last two.
    with jax.enable_x64(True):
        run = prepare_run(tiny.config(ema_decay=0.2, dtype="float64"), tiny.digits())
        steps = compile_steps(run)
        state = steps.init(jax.random.PRNGKey(0))
        history = [_weights(state.trained_variables)]
        assert tiny.relative_differences(_weights(state.ema), history[0]) == dict.fromkeys(history[0], 0.0)
        batches = loop.training_batches(run, 0)
        for _ in range(tiny.NUM_STEPS):
            state, _ = steps.train(state, parallel.global_batch(next(batches), run.mesh))
            history.append(_weights(state.trained_variables))
        average = _weights(state.ema)
        assert _weights(state.variables).keys() == average.keys()
        tiny.assert_same_state(_weights(state.variables), average, rtol=0.0)  # inference uses the average
    tiny.assert_same_state(average, _average_by_hand(history, 0.2), rtol=1e-12)
    # Controls: the last weights, and the average without the decay's warmup, fail the same check (by
    # ~1e-4 relative: four small steps move the weights little).
    for wrong in (history[-1], _average_by_hand(history, 0.2, warmup=False)):
        with pytest.raises(AssertionError, match="relative apart"):
            tiny.assert_same_state(average, wrong, rtol=1e-9)


def test_without_ema_the_state_keeps_no_average():
    run = prepare_run(tiny.config(), tiny.digits())
    from jaxembed.train import compile_steps

    state = compile_steps(run).init(jax.random.PRNGKey(0))
    assert state.ema is None and state.variables == state.trained_variables


def test_a_run_with_ema_is_loaded_and_embedded_through_its_average(tmp_path):
    import jaxembed

    trained = tiny.train_digits_run(str(tmp_path), ema_decay=0.2)
    run_dir = rundir.RunDir(trained.workdir)
    with run_dir.checkpoint_manager() as manager:
        saved = manager.restore(manager.latest_step())
    variables, _ = run_dir.variables()
    tiny.assert_same_state(_weights(variables), _weights(saved["ema"]), rtol=0.0)
    with pytest.raises(AssertionError, match="relative apart"):  # the last weights are another thing
        tiny.assert_same_state(_weights(variables), _weights({"params": saved["params"],
                                                              "batch_stats": saved["batch_stats"]}), rtol=1e-9)
    tiny.assert_same_state(_weights(jaxembed.load(trained.workdir).variables), _weights(saved["ema"]), rtol=0.0)


def test_held_out_evaluation_uses_the_average(monkeypatch):
    from jaxembed.inference import embed
    from jaxembed.train import compile_steps

    run = prepare_run(tiny.config(ema_decay=0.2), tiny.digits())
    steps = compile_steps(run)
    state = steps.init(jax.random.PRNGKey(0))
    state, _ = steps.train(state, next(loop.training_batches(run, 0)))
    average = {"params": jax.tree.map(lambda x: -x, state.params), "batch_stats": state.batch_stats}
    seen = []
    original = embed.embed_dataset

    def spy(apply_fn, variables, *args, **kwargs):
        seen.append(variables)
        return original(apply_fn, variables, *args, **kwargs)

    monkeypatch.setattr(embed, "embed_dataset", spy)
    loop.evaluate_run(run, state.replace(ema=average), steps)
    assert seen and seen[0] is average  # the model pass (a later pixel pass takes no variables)


# ----------------------------------------------------------------------------- logging and the summary


def test_logged_loss_is_the_mean_over_the_window(tmp_path):
    every_step, per_two, per_three = (tiny.config("inception_bn", log_every=n) for n in (1, 2, 3))
    for config, name in ((every_step, "one"), (per_two, "two"), (per_three, "three")):
        loop.train_and_evaluate(config, str(tmp_path / name), data=tiny.digits())
    losses_each = [r["loss"] for r in rundir.RunDir(str(tmp_path / "one")).metrics() if "loss" in r]
    logged = [r for r in rundir.RunDir(str(tmp_path / "two")).metrics() if "loss" in r]
    assert len(losses_each) == tiny.NUM_STEPS and [r["step"] for r in logged] == [2, 4]
    assert losses_each[0] != losses_each[1]
    for record, pair in zip(logged, (losses_each[0:2], losses_each[2:4])):
        assert record["loss"] == pytest.approx(np.mean(pair), rel=1e-6)
        assert record["window_steps"] == 2
    # 4 steps logged every 3: the window of steps 1-3, then the last step alone when the run ends.
    per_three_logged = [r for r in rundir.RunDir(str(tmp_path / "three")).metrics() if "loss" in r]
    assert [(r["step"], r["window_steps"]) for r in per_three_logged] == [(3, 3), (4, 1)]
    assert [r["loss"] for r in per_three_logged] == pytest.approx([np.mean(losses_each[:3]), losses_each[3]],
                                                                  rel=1e-6)
    assert [r["loss_max"] for r in per_three_logged] == pytest.approx([max(losses_each[:3]), losses_each[3]],
                                                                      rel=1e-6)
    # TensorBoard's event file beside metrics.jsonl holds the same numbers.
    assert _tensorboard_scalars(str(tmp_path / "two"), "loss") == pytest.approx(
        {r["step"]: r["loss"] for r in logged}, rel=1e-6)
    assert 0 <= _tensorboard_scalars(str(tmp_path / "two"), "eval/recall@1")[tiny.NUM_STEPS] <= 1



def test_logged_images_per_second_counts_the_whole_run_writes_included(tmp_path, monkeypatch):
    """With a fake clock: each step takes 1 s and each window's write 5 s. The windows must tile the run,
    so a window's rate counts the previous write too (an untimed gap would report 2 s per 2 steps)."""
    clock = [0.0]
    monkeypatch.setattr(hooks, "time", types.SimpleNamespace(perf_counter=lambda: clock[0]))

    class SlowWrites(rundir.RunDir):
        def append_metrics(self, record):
            clock[0] += 5.0
            super().append_metrics(record)

    config = tiny.config("inception_bn", log_every=2)
    run = types.SimpleNamespace(config=config, steps_per_epoch=6, schedule=lambda step: 0.1)
    log = hooks.MetricsLog(SlowWrites(str(tmp_path)), run, 0, 6)
    for step in range(6):
        clock[0] += 1.0
        log.record(step, {"loss": 1.0})
    log.close()
    rates = [r["images_per_second"] for r in rundir.RunDir(str(tmp_path)).metrics()]
    batch = config.batch_size
    # Window 1: steps at t=1, 2 (2 s); window 2: the write to t=7, steps to t=9 (7 s); window 3 likewise.
    assert rates == pytest.approx([2 * batch / 2, 2 * batch / 7, 2 * batch / 7], rel=1e-12)
    assert sum(2 * batch / rate for rate in rates) == pytest.approx(clock[0] - 5.0)  # all but the last write

def _tensorboard_scalars(workdir: str, tag: str) -> dict[int, float]:
    """`step -> value` of `tag` as TensorBoard's own reader (no TensorFlow) finds it in the event files."""
    from tensorboard.backend.event_processing import event_accumulator

    events = event_accumulator.EventAccumulator(workdir)
    events.Reload()
    return {scalar.step: scalar.value for scalar in events.Scalars(tag)}


def test_summary_gives_the_raw_pixel_recall_of_the_same_heldout_images(tmp_path):
    data = tiny.digits(step=5)
    summary = loop.train_and_evaluate(tiny.config("inception_bn"), str(tmp_path), data=data)
    heldout = rundir.RunDir(str(tmp_path)).heldout(data)
    # Independent reference: Pillow's centre crop, NumPy centring and a brute-force leave-one-out search.
    pixels = np.stack([data_lib.preprocess_for_eval(data_lib.decode_image(item), 32) for item in heldout.items])
    flat = pixels.reshape(len(pixels), -1).astype(np.float64)
    flat -= flat.mean(axis=0)
    flat /= np.linalg.norm(flat, axis=1, keepdims=True)
    similarity = flat @ flat.T
    np.fill_diagonal(similarity, -np.inf)
    labels = heldout.primary_labels
    expected = np.mean(labels[np.argmax(similarity, axis=1)] == labels)
    assert summary["eval/pixels_recall@1"] == pytest.approx(expected, abs=1e-9)
    assert 0 < expected < 1


def test_pixel_vectors_centre_on_the_given_mean():
    pixels = np.array([[[1.0, 3.0]], [[3.0, 7.0]]])
    # Own mean (2, 5): rows (-1, -2) and (1, 2), each of length sqrt(5).
    np.testing.assert_allclose(metrics.pixel_vectors(pixels), np.array([[-1, -2], [1, 2]]) / math.sqrt(5), rtol=1e-6)
    # Given mean (1, 3): the second row is (2, 4), also along (1, 2).
    np.testing.assert_allclose(metrics.pixel_vectors(pixels, mean=np.array([1.0, 3.0]))[1],
                               np.array([1, 2]) / math.sqrt(5), rtol=1e-6)


def test_new_options_are_recorded_and_checked_on_resume(tmp_path):
    config = tiny.config("inception_bn", warmup_epochs=0.5, max_steps=2)
    loop.train_and_evaluate(config, str(tmp_path), data=tiny.digits())
    assert rundir.RunDir(str(tmp_path)).config()["warmup_epochs"] == 0.5
    with pytest.raises(ValueError, match="warmup_epochs"):
        loop.train_and_evaluate(config.replace(warmup_epochs=1.0), str(tmp_path), data=tiny.digits())
    assert os.path.exists(tmp_path / "run.json")


# ----------------------------------------------------------------------------- classifier embedding


class _FirstPixels(flax_nn.Module):
    """A stand-in backbone: the first four normalised pixel values of each image as its features."""

    @flax_nn.compact
    def __call__(self, x, train: bool = False):
        return x.reshape(x.shape[0], -1)[:, :4]


def test_centred_embedding_subtracts_the_running_mean_of_training_batches():
    from jaxembed.models import heads

    model = heads.ClassifierModel(backbone=_FirstPixels(), num_classes=3, embedding_neck="center")
    rng = np.random.default_rng(0)
    batches = [rng.integers(0, 256, (5, 2, 2, 3), dtype=np.uint8) for _ in range(3)]
    variables = model.init(jax.random.key(0), batches[0])
    assert not np.asarray(variables["batch_stats"]["feature_mean"]).any()
    features = [np.asarray(heads.normalize_images(b, jnp.float32)).reshape(5, -1)[:, :4] for b in batches]
    mean = np.zeros(4)
    for batch, batch_features in zip(batches, features):
        _, updates = model.apply(variables, batch, train=True, mutable=["batch_stats"])
        variables = {**variables, **updates}
        mean = 0.9 * mean + 0.1 * batch_features.mean(axis=0)  # batch norm's running average, by hand
    np.testing.assert_allclose(variables["batch_stats"]["feature_mean"], mean, rtol=1e-5)
    embedding = np.asarray(model.apply(variables, batches[0])["embedding"])
    expected = features[0] - mean
    np.testing.assert_allclose(embedding, expected / np.linalg.norm(expected, axis=1, keepdims=True), rtol=1e-5)


def test_runs_recorded_before_a_default_changed_keep_their_setting(tmp_path):
    loop.train_and_evaluate(tiny.config("inception_bn", max_steps=1), str(tmp_path), data=tiny.digits())
    path = tmp_path / "run.json"
    record = json.loads(path.read_text())
    for name in ("flip", "embedding_neck", "warmup_epochs"):  # as a run.json written before they existed
        del record["config"][name]
    path.write_text(json.dumps(record))
    config = rundir.RunDir(str(tmp_path)).config()
    assert (config.flip, config.embedding_neck, config.warmup_epochs) == (True, "none", 0.0)
    assert tiny.config("inception_bn", max_steps=1).differences(record["config"]) == ["flip: True -> False"]


def test_the_bare_commands_cpu_demo_settings_are_valid_and_never_flip(capsys):
    from jaxembed.cli import train as cli

    for name in templates.NAMES:
        template = templates.get(name)
        args = cli.build_parser(template.name).parse_args(["--template", name])
        config = template.config_from_args(args, **cli.demo_settings(template, args))
        assert config.flip is False and config.image_size == 32 and config.warmup_epochs == 0.5, name
    assert "demo settings" in capsys.readouterr().out
