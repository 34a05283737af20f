"""Reading a backbone block's output map beside its pooled features (`models.create(arch, tap=...)`).

A classifier's last pooled features are shaped to separate its training concepts; an earlier block's
features can describe concepts it never saw better (measured on Omniglot: experiments/omniglot_embeddings.py).
A backbone built with `tap="<block name>"` returns `(features or logits, that block's (B, h, w, C) map)`
instead of the features alone; the block names are each backbone's `block_names()`.
"""

from __future__ import annotations

from typing import Sequence


def check_tap(tap: str | None, block_names: Sequence[str], backbone: str) -> None:
    """ValueError naming the blocks when `tap` is not one of `block_names` (None: no tap, fine). The message
    says `embedding_layer`, the setting a tap comes from."""
    if tap is not None and tap not in block_names:
        raise ValueError(f"embedding_layer={tap!r} is not a block of {backbone}; its blocks: {', '.join(block_names)}")


def with_tapped(output, tapped_map, tap: str | None):
    """What a backbone returns: `output` alone without a tap, else `(output, tapped_map)`."""
    return output if tap is None else (output, tapped_map)
