"""What every command does with an error: one line `<prog>: error: ...` on stderr, and an exit status.

Exit status 1: bad input (a missing file, a bad parameter: `FileNotFoundError`, `ValueError`, and what a
command adds). Exit status 2: a usage error (argparse's own, or `UsageError`), or the output directory is
locked by another writer (`fileio.DirectoryBusy`). 130 (143): interrupted by SIGINT (SIGTERM).
Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable

from jaxembed.fileio import DirectoryBusy
from jaxembed.inference import EMBEDDING_SETTINGS

BAD_INPUT, BUSY, USAGE, INTERRUPTED = 1, 2, 2, 130


class UsageError(Exception):
    """Settings that cannot run together, found after parsing (exit status 2, as argparse's own)."""


def setup_logging(format: str = "%(levelname)s %(name)s: %(message)s") -> None:
    """INFO logs on stderr for a command-line tool.

    `force`: importing orbax has already configured the root logger (absl's first message calls
    `logging.basicConfig()` at WARNING), which would make a plain call a no-op and hide every INFO line.
    """
    logging.basicConfig(level=logging.INFO, format=format, force=True)
    for chatty in ("absl", "jax"):  # orbax logs each checkpoint read and save through absl; jax its backends
        logging.getLogger(chatty).setLevel(logging.WARNING)


def run_tool(prog: str, work: Callable[[], int | None], *, bad_input: tuple[type[BaseException], ...] = (),
             log_format: str = "%(levelname)s %(name)s: %(message)s") -> int:
    """Runs `work()` and returns the exit status (its own, or 0), printing `prog: error: ...` on a known
    failure. `bad_input`: exception types that, besides `FileNotFoundError` and `ValueError`, are bad input."""
    setup_logging(log_format)
    try:
        return work() or 0
    except DirectoryBusy as error:
        print(f"{prog}: error: {error}", file=sys.stderr)
        return BUSY
    except UsageError as error:
        print(f"{prog}: error: {error}", file=sys.stderr)
        return USAGE
    except (FileNotFoundError, ValueError, *bad_input) as error:
        print(f"{prog}: error: {error}", file=sys.stderr)
        return BAD_INPUT
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return INTERRUPTED


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
