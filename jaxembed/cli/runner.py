"""What every `python -m jaxembed.<tool>` entry point does with an error: one line on stderr, an exit status.

Exit status 1: bad input (a missing file, a bad parameter: `FileNotFoundError`, `ValueError`).
Exit status 2: the output directory is locked by another writer (`fileio.DirectoryBusy`).
Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable

from jaxembed.fileio import DirectoryBusy

BAD_INPUT, BUSY = 1, 2


def setup_logging(format: str = "%(levelname)s %(name)s: %(message)s") -> None:
    """INFO logs on stderr for a command-line tool.

    `force`: importing orbax has already configured the root logger (absl's first message calls
    `logging.basicConfig()` at WARNING), which would make a plain call a no-op and hide every INFO line.
    """
    logging.basicConfig(level=logging.INFO, format=format, force=True)
    for chatty in ("absl", "jax"):  # orbax logs each checkpoint read and save through absl; jax its backends
        logging.getLogger(chatty).setLevel(logging.WARNING)


def run_tool(prog: str, work: Callable[[], None]) -> int:
    """Runs `work()` and returns the exit status, printing `prog: error: ...` on a known failure."""
    setup_logging()
    try:
        work()
    except DirectoryBusy as error:
        print(f"{prog}: error: {error}", file=sys.stderr)
        return BUSY
    except (FileNotFoundError, ValueError) as error:
        print(f"{prog}: error: {error}", file=sys.stderr)
        return BAD_INPUT
    return 0


# `jaxembed.load`'s keywords (and the tools' flags) that choose how a run's embedding is read: a classifier's
# from another block or pooling, a learned whitening fitted on the run's embeddings, and the average with
# each image's mirror image.
EMBEDDING_SETTINGS = ("embedding_layer", "embedding_pooling", "whitening", "flip_average")


def add_embedding_arguments(parser: argparse.ArgumentParser, *, whitening: bool = True) -> None:
    """`--embedding_layer`, `--embedding_pooling` (a classifier run's embedding read from another block or
    pooling than it was trained with; they change no parameter), with `whitening` `--whitening FILE`, and
    `--flip_average`: `jaxembed.load`'s keywords of the same names."""
    group = parser.add_argument_group("embedding (unset: the run's own)")
    group.add_argument("--embedding_layer", help="classifier runs: the backbone block whose output map, pooled, is "
                                                 "the embedding, e.g. inception_4c or stage3_block5 (the last block "
                                                 "by its name)")
    group.add_argument("--embedding_pooling", help="classifier runs: how that map is pooled: avg, max or gem "
                                                   "(generalised mean, p=3)")
    if whitening:
        group.add_argument("--whitening", help="a learned whitening `python -m jaxembed.whitening` fitted on this "
                                               "run's embeddings (with the same block and pooling): project by it")
    # default None, not False: only a given flag is a setting (and is recorded, e.g. in an index).
    group.add_argument("--flip_average", action="store_true", default=None,
                       help="average each image's embedding (and logits) with its mirror image's: for subjects "
                            "whose mirror image is the same concept (photos, products; not characters), twice the "
                            "compute")


def embedding_arguments(args: argparse.Namespace) -> dict[str, str | bool]:
    """The options of `add_embedding_arguments` that were given, as `jaxembed.load` keywords (a whitening file
    by its absolute path, so an index that records it finds it from any directory)."""
    given = {name: getattr(args, name) for name in EMBEDDING_SETTINGS if getattr(args, name, None) is not None}
    if "whitening" in given:
        given["whitening"] = os.path.abspath(given["whitening"])
    return given
