"""`python -m jaxembed.export --workdir DIR --out PATH [--batch_size N]`: a trained embedder as StableHLO plus
variables (`jaxembed.inference.export`), loadable with only jax and numpy."""

from __future__ import annotations

import argparse
import sys

from jaxembed.cli import runner

PROG = "python -m jaxembed.export"


def build_parser(prog: str = PROG) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Export a trained embedder as StableHLO plus variables, loadable with only jax and numpy.")
    parser.add_argument("--workdir", required=True, help="a training workdir (its newest checkpoint is exported)")
    parser.add_argument("--out", required=True, help="the directory to write")
    parser.add_argument("--batch_size", type=int, default=None, help="fix the batch size (default: any)")
    runner.add_embedding_arguments(parser)
    return parser


def main(argv: list[str] | None = None, *, prog: str = PROG) -> int:
    args = build_parser(prog).parse_args(argv)

    def work() -> None:
        from jaxembed.inference.embed import load  # the model code is needed to export, never to load
        from jaxembed.inference.export import export_embedder

        embedder = load(args.workdir, **runner.embedding_arguments(args))
        export_embedder(embedder, args.out, batch_size=args.batch_size)
        print(f"exported {args.workdir} ({embedder.config.template.name}, {embedder.image_size}px) to {args.out}")

    return runner.run_tool(prog, work)


if __name__ == "__main__":
    sys.exit(main())
