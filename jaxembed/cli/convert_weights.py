"""`python -m jaxembed.convert_weights SOURCE.pth [--arch ARCH] [--out FILE.safetensors]`: a PyTorch state dict
converted once to .safetensors (`jaxembed.models.convert_weights`), so jaxembed loads it without torch."""

from __future__ import annotations

import argparse
import os
import sys

from jaxembed import models
from jaxembed.cli import runner
from jaxembed.models import convert_weights as convert_lib

PROG = "python -m jaxembed.convert_weights"


def build_parser(prog: str = PROG) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=convert_lib.__doc__.splitlines()[0])
    parser.add_argument("source", help="a .pth state dict (torchvision, or the BN-Inception port)")
    parser.add_argument("--out", default=None, help="output .safetensors file (default: beside the source)")
    parser.add_argument("--arch", choices=models.ARCHS, default=None, help="check the weights against this arch")
    return parser


def main(argv: list[str] | None = None, *, prog: str = PROG) -> int:
    args = build_parser(prog).parse_args(argv)
    destination = args.out or os.path.splitext(args.source)[0] + ".safetensors"

    def work() -> None:
        try:
            state = convert_lib.convert(args.source, destination, args.arch)
        except (ValueError, ImportError, OSError) as error:  # every message names the file it is about
            raise ValueError(convert_lib.naming(error, args.source, destination)) from error
        size_mb = sum(value.nbytes for value in state.values()) / 2**20
        print(f"wrote {destination}: {len(state)} tensors, {size_mb:.1f} MiB")

    return runner.run_tool(prog, work)


if __name__ == "__main__":
    sys.exit(main())
