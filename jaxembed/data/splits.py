"""Deterministic train/held-out splits: by image (same concepts) or by concept (unseen concepts)."""

from __future__ import annotations

import logging

import numpy as np

from jaxembed.data.dataset import LabelledImages

logger = logging.getLogger(__name__)


def split_by_images(
    data: LabelledImages, holdout_fraction: float, seed: int
) -> tuple[LabelledImages, LabelledImages]:
    """Holds out about `holdout_fraction` of the images, stratified by primary concept.

    Each concept gives its share of images (largest-remainder rounding, so small concepts still add
    up to the requested total) and keeps at least one image in training when it has two or more. Both
    sides keep the full `concepts` tuple, so label indices mean the same on both.

    Returns:
      `(train, heldout)`, each in the original order; deterministic for a given `seed`.

    Raises:
      ValueError: `holdout_fraction` outside (0, 1), or fewer than 2 images.
    """
    _check_fraction(holdout_fraction)
    if len(data) < 2:
        raise ValueError(f"cannot split {len(data)} image(s) into two non-empty parts")
    rng = np.random.default_rng(seed)
    primary = data.primary_labels
    counts = np.bincount(primary, minlength=data.num_concepts)
    # Keep one image of each concept in training, unless no concept has two (then any split loses some).
    capacity = np.maximum(counts - 1, 0) if (counts > 1).any() else counts
    target = int(min(max(1, round(holdout_fraction * len(data))), len(data) - 1, capacity.sum()))
    quota = holdout_fraction * counts
    taken = np.minimum(np.floor(quota).astype(np.int64), capacity)
    # Largest fractional remainder first; random among ties so no concept is always favoured.
    order = np.lexsort((rng.random(len(counts)), -(quota - np.floor(quota))))
    while taken.sum() < target:
        for concept in order:
            if taken.sum() == target:
                break
            if taken[concept] < capacity[concept]:
                taken[concept] += 1
    # Within each concept, a random order decides which images go.
    shuffled = rng.permutation(len(data))
    by_concept = shuffled[np.argsort(primary[shuffled], kind="stable")]
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    held = np.concatenate([by_concept[start : start + take] for start, take in zip(starts, taken)])
    is_held = np.zeros(len(data), bool)
    is_held[held] = True
    return data.subset(np.flatnonzero(~is_held)), data.subset(np.flatnonzero(is_held))


def split_by_concepts(
    data: LabelledImages, holdout_fraction: float, seed: int
) -> tuple[LabelledImages, LabelledImages]:
    """Holds out about `holdout_fraction` of the concepts with all their images (class-disjoint sides).

    For measuring retrieval on concepts the model never saw. Each side's `concepts` holds only its own
    concepts (labels re-indexed), so the training side can size its classifier. A multi-label image
    showing concepts from both sides belongs to neither; how many were dropped is logged.

    Returns:
      `(train, heldout)`, each in the original order; deterministic for a given `seed`.

    Raises:
      ValueError: `holdout_fraction` outside (0, 1), fewer than 2 concepts, or a side left empty.
    """
    _check_fraction(holdout_fraction)
    if data.num_concepts < 2:
        raise ValueError(f"cannot split {data.num_concepts} concept(s) into two non-empty parts")
    rng = np.random.default_rng(seed)
    num_held = min(max(1, round(holdout_fraction * data.num_concepts)), data.num_concepts - 1)
    held_concepts = set(rng.permutation(data.num_concepts)[:num_held].tolist())
    train, heldout, mixed = [], [], 0
    for index, label in enumerate(data.labels):
        held_count = sum(concept in held_concepts for concept in label)
        if held_count == len(label):
            heldout.append(index)
        elif held_count == 0:
            train.append(index)
        else:
            mixed += 1
    if mixed:
        logger.warning("split_by_concepts: %d images show concepts from both sides and are in neither", mixed)
    if not train or not heldout:
        raise ValueError(
            f"split_by_concepts left a side empty ({len(train)} train, {len(heldout)} held-out images, "
            f"{mixed} dropped as mixed)"
        )
    return data.subset(train).with_own_concepts(), data.subset(heldout).with_own_concepts()


def _check_fraction(holdout_fraction: float) -> None:
    if not 0 < holdout_fraction < 1:
        raise ValueError(f"holdout_fraction must be in (0, 1), got holdout_fraction={holdout_fraction}")
