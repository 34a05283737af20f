"""What every `python -m jaxembed.<tool>` entry point does with an error: one line on stderr, an exit status.

Exit status 1: bad input (a missing file, a bad parameter: `FileNotFoundError`, `ValueError`).
Exit status 2: the output directory is locked by another writer (`fileio.DirectoryBusy`).
Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import logging
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


# `jaxembed.load`'s keywords (and the tools' flags) that read a classifier run's embedding from another block.
EMBEDDING_SETTINGS = ("embedding_layer", "embedding_pooling")


def add_embedding_arguments(parser: argparse.ArgumentParser) -> None:
    """`--embedding_layer` and `--embedding_pooling`: a classifier run's embedding read from another block or
    pooling than it was trained with (`jaxembed.load`'s keywords of the same names; they change no parameter)."""
    group = parser.add_argument_group("embedding (classifier runs; unset: the run's own)")
    group.add_argument("--embedding_layer", help="the backbone block whose output map, pooled, is the embedding, "
                                                 "e.g. inception_4c or stage3_block5 (the last block by its name)")
    group.add_argument("--embedding_pooling", help="how that map is pooled: avg, max or gem (generalised mean, p=3)")


def embedding_arguments(args: argparse.Namespace) -> dict[str, str]:
    """The options of `add_embedding_arguments` that were given, as `jaxembed.load` keywords."""
    return {name: getattr(args, name) for name in EMBEDDING_SETTINGS if getattr(args, name) is not None}
