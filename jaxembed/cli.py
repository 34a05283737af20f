"""What every `python -m jaxembed.<tool>` entry point does with an error: one line on stderr, an exit status.

Exit status 1: bad input (a missing file, a bad parameter: `FileNotFoundError`, `ValueError`).
Exit status 2: the output directory is locked by another writer (`fileio.DirectoryBusy`).
Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable

from jaxembed.fileio import DirectoryBusy

BAD_INPUT, BUSY = 1, 2


def run_tool(prog: str, work: Callable[[], None]) -> int:
    """Runs `work()` and returns the exit status, printing `prog: error: ...` on a known failure."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("absl").setLevel(logging.WARNING)  # orbax logs every checkpoint read at INFO
    try:
        work()
    except DirectoryBusy as error:
        print(f"{prog}: error: {error}", file=sys.stderr)
        return BUSY
    except (FileNotFoundError, ValueError) as error:
        print(f"{prog}: error: {error}", file=sys.stderr)
        return BAD_INPUT
    return 0
