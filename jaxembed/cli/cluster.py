"""`python -m jaxembed.cluster --index INDEX -k K [--out DIR]`: k-means of an index's images with contact sheets
(`jaxembed.search.cluster`)."""

from __future__ import annotations

import argparse
import json
import sys

from jaxembed.cli import runner

PROG = "python -m jaxembed.cluster"


def build_parser(prog: str = PROG) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description="Cluster the images of an index.")
    parser.add_argument("--index", required=True, help="an index directory (python -m jaxembed.index)")
    parser.add_argument("-k", type=int, required=True, help="the number of clusters")
    parser.add_argument("--out", help="output directory (default INDEX/clusters-K)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--sheet_size", type=int, default=100, help="the most thumbnails per contact sheet")
    return parser


def main(argv: list[str] | None = None, *, prog: str = PROG) -> int:
    args = build_parser(prog).parse_args(argv)

    def work() -> None:
        from jaxembed.search.cluster import cluster_index

        summary = cluster_index(args.index, args.k, out=args.out, seed=args.seed, sheet_size=args.sheet_size)
        print(json.dumps({key: summary[key] for key in ("out", "k")} | {
            "sizes": [c["size"] for c in summary["clusters"]]} | {
            key: summary[key] for key in ("scores",) if key in summary}))

    return runner.run_tool(prog, work)


if __name__ == "__main__":
    sys.exit(main())
