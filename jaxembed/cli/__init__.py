"""The command line: every command's parser and `main`, one module each, all run through `runner.run_tool`
(one error form, `<prog>: error: ...`, and one set of exit statuses: usage 2, bad input 1, busy workdir 2,
interrupted 130/143).

    jaxembed train --template inception_bn          # the console script: `jaxembed COMMAND ...`
    python -m jaxembed.train --template inception_bn  # the same command by its module

Each `jaxembed.cli.<name>` has `build_parser() -> argparse.ArgumentParser` and `main(argv=None) -> int`.
"""

from __future__ import annotations

import importlib
import sys

# command name -> its module, in the order a user meets them
COMMANDS = {
    "train": "jaxembed.cli.train",
    "embed": "jaxembed.cli.embed",
    "evaluate": "jaxembed.cli.evaluate",
    "report": "jaxembed.cli.report",
    "export": "jaxembed.cli.export",
    "index": "jaxembed.cli.index",
    "search": "jaxembed.cli.search",
    "cluster": "jaxembed.cli.cluster",
    "whitening": "jaxembed.cli.whitening",
    "convert_weights": "jaxembed.cli.convert_weights",
}

USAGE = ("usage: jaxembed COMMAND [ARGS ...]   (jaxembed COMMAND --help for its own)\ncommands: "
         + ", ".join(COMMANDS))


def main(argv: list[str] | None = None) -> int:
    """`jaxembed COMMAND ARGS...`: runs `jaxembed.cli.COMMAND.main(ARGS)` and returns its exit status."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE, file=sys.stdout if argv else sys.stderr)
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"{USAGE}\njaxembed: error: unknown command {name!r}", file=sys.stderr)
        return 2
    return importlib.import_module(COMMANDS[name]).main(rest, prog=f"jaxembed {name}")
