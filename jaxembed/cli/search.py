"""`python -m jaxembed.search --index INDEX --query IMAGE|FOLDER -k K [--json] [--html OUT.html]`: visual search
in an index (`jaxembed.search.query`)."""

from __future__ import annotations

import argparse
import json
import sys

from jaxembed.cli import runner

PROG = "python -m jaxembed.search"


def build_parser(prog: str = PROG) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description="Search an index with query images.")
    parser.add_argument("--index", required=True, help="an index directory (python -m jaxembed.index)")
    parser.add_argument("--query", required=True, help="an image file, or a folder/manifest of images")
    parser.add_argument("-k", type=int, default=10, help="results per query")
    parser.add_argument("--json", action="store_true", help="print JSON instead of text")
    parser.add_argument("--html", help="also write an HTML page of the queries and their results here")
    parser.add_argument("--exclude_self", action="store_true", help="leave out the query image itself")
    parser.add_argument("--approximate", action="store_true",
                        help="approximate search: lax.approx_max_k on TPU, a faiss HNSW graph elsewhere")
    return parser


def main(argv: list[str] | None = None, *, prog: str = PROG) -> int:
    args = build_parser(prog).parse_args(argv)

    def work() -> None:
        from jaxembed import fileio
        from jaxembed.search import gallery
        from jaxembed.search.query import Index, format_results, search_images

        index = Index.load(args.index)
        if args.k > len(index) > 0:
            print(f"{prog}: note: -k {args.k} is more than the {len(index)} indexed images: "
                  f"returning all {len(index)}", file=sys.stderr)
        results = search_images(index, args.query, args.k, exclude_self=args.exclude_self,
                                approximate=args.approximate)
        if args.html:
            fileio.write_bytes(args.html, gallery.search_page(results).encode())
        print(json.dumps(results, indent=1) if args.json else format_results(results))

    return runner.run_tool(prog, work)


if __name__ == "__main__":
    sys.exit(main())
