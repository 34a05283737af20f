"""Whether two computations of the same training step agree, measured against how far the step moves.

Device layouts (1 device, 8 devices, 2 processes, a class-sharded mesh) compute the same step with
float32 sums in different orders. Mostly that changes values by about 1e-6, relative. But a ReLU whose
input lies within rounding of zero can be on in one layout and off in the other, and in the tests' tiny
runs (batch 8, batch norm over 1x1 maps at 32 px) one such unit is one image's gradient through one
channel, added or dropped. Measured with tests/test_train.py's inception_bn step on 1 and on 8 devices:
the forward passes agree to 4e-5 and have exactly one ReLU of 2,560 in inception_5b's 3x3 branch on
different sides of zero; that alone puts the two updates 3% apart (`difference` below), every layer
beneath it included. The same step on one device with the batch's rows permuted: 7e-5. With one of
the 8 images replaced by another (a mistake about which data a device sees): 150%.

So a step is compared as `||ours - reference|| / ||reference - start||`, per part of the state, and
`STEP_TOLERANCE` sits between rounding and a one-image mistake: the largest rounding measured by the
tests that use it was 3.6% (tests/test_multiprocess.py, momentum after step 2 on one device), 5 times
below it; the one-image mistake 7.5 times above. An absolute or parameter-relative tolerance cannot do
this: which side of zero the ReLU lands on is a coin toss that no float tolerance covers.
"""

from __future__ import annotations

import jax
import numpy as np

STEP_TOLERANCE = 0.2
PARTS = ("params", "batch_stats", "opt_state")


def state_leaves(state) -> dict[str, np.ndarray]:
    """Parameters, batch-norm statistics and optimiser state of a `TrainState`, by path, as numpy copies
    (taken before a step that donates the state's buffers)."""
    tree = {part: getattr(state, part) for part in PARTS}
    return {jax.tree_util.keystr(path): np.array(leaf) for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def difference(ours: dict, reference: dict, start: dict, part: str) -> float:
    """`||ours - reference|| / ||reference - start||` over the leaves of one part ("params", ...)."""
    assert ours.keys() == reference.keys() == start.keys()
    names = [name for name in reference if name.startswith(f"['{part}']")]
    for name in names:  # counters (the schedule's step count) are compared exactly, not measured
        if not np.issubdtype(reference[name].dtype, np.floating):
            np.testing.assert_array_equal(ours[name], reference[name], err_msg=name)
    names = [name for name in names if np.issubdtype(reference[name].dtype, np.floating)]
    assert names, f"no floating-point leaves in {part}"
    apart = sum(float(np.sum((ours[n] - reference[n]) ** 2)) for n in names)
    moved = sum(float(np.sum((reference[n] - start[n]) ** 2)) for n in names)
    assert moved > 0, f"the step did not change {part}"
    return (apart / moved) ** 0.5


def assert_same_step(ours: dict, reference: dict, start: dict, context: str = "") -> None:
    for part in PARTS:
        measured = difference(ours, reference, start, part)
        assert measured <= STEP_TOLERANCE, f"{part}{context}: {measured:.3g} of the step apart"
