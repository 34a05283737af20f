"""`python -m jaxembed.index --workdir DIR --images FOLDER|MANIFEST --out INDEX`: a collection of images embedded
into a search index directory (`jaxembed.search.index`)."""

from __future__ import annotations

import argparse
import json
import sys

from jaxembed.cli import runner
from jaxembed.search import index as index_lib

PROG = "python -m jaxembed.index"


def build_parser(prog: str = PROG) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=index_lib.__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", required=True, help="the training workdir whose newest checkpoint embeds")
    parser.add_argument("--images", required=True,
                        help="a folder of images (concept sub-folders optional) or a .csv/.jsonl manifest")
    parser.add_argument("--out", required=True, help="the index directory (created, or added to)")
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--chunk_size", type=int, default=index_lib.DEFAULT_CHUNK_SIZE,
                        help="images per chunk file (a multiple of batch_size)")
    parser.add_argument("--no_progress", action="store_true", help="no progress bar")
    runner.add_embedding_arguments(parser)
    return parser


def main(argv: list[str] | None = None, *, prog: str = PROG) -> int:
    args = build_parser(prog).parse_args(argv)

    def work() -> None:
        summary = index_lib.build_index(args.workdir, args.images, args.out, batch_size=args.batch_size,
                                        chunk_size=args.chunk_size, progress=not args.no_progress,
                                        embedding=runner.embedding_arguments(args))
        print(json.dumps(summary))

    return runner.run_tool(prog, work)


if __name__ == "__main__":
    sys.exit(main())
