"""What a backbone returns: its pooled features or logits, and a block's output map beside them
(`models.create(arch, tap=...)`).

A classifier's last pooled features are shaped to separate its training concepts; an earlier block's
features can describe concepts it never saw better (measured on Omniglot: experiments/omniglot_embeddings.py).
A backbone built with `tap="<block name>"` returns `(features or logits, that block's (B, h, w, C) map)`
instead of the features alone; the block names are each backbone's `block_names()`.
"""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax.numpy as jnp


def check_tap(tap: str | None, block_names: Sequence[str], backbone: str) -> None:
    """ValueError naming the blocks when `tap` is not one of `block_names` (None: no tap, fine). The message
    says `embedding_layer`, the setting a tap comes from."""
    if tap is not None and tap not in block_names:
        raise ValueError(f"embedding_layer={tap!r} is not a block of {backbone}; its blocks: {', '.join(block_names)}")


def backbone_output(last_map, tapped_map, *, tap: str | None, num_classes: int | None, classifier_name: str):
    """What a backbone returns from its last block's map, inside its compact `__call__`: the globally
    average-pooled features, or with `num_classes` the logits of a linear classifier on them (a Dense
    named `classifier_name`, the name weight import expects); with a `tap`, `(that, tapped_map)`."""
    # Global average pooling in float32: any input size, and the mean over many positions stays accurate
    # under bfloat16.
    output = jnp.mean(last_map.astype(jnp.float32), axis=(1, 2))
    if num_classes is not None:
        # Tiny next to the backbone: logits in float32, not rounded to bfloat16 before the loss.
        output = nn.Dense(num_classes, dtype=jnp.float32, param_dtype=jnp.float32, name=classifier_name)(output)
    return with_tapped(output, tapped_map, tap)


def with_tapped(output, tapped_map, tap: str | None):
    """What a backbone returns: `output` alone without a tap, else `(output, tapped_map)`."""
    return output if tap is None else (output, tapped_map)
