"""`python -m jaxembed.report --workdir DIR [--images SOURCE]`: the one-page visual report of a training run
(`jaxembed.eval.report`)."""

from __future__ import annotations

import argparse
import sys

from jaxembed.cli import runner

PROG = "python -m jaxembed.report"


def build_parser(prog: str = PROG) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description="Write a PNG + HTML report of a training run.")
    parser.add_argument("--workdir", required=True, help="a training workdir")
    parser.add_argument("--images", default=None, help="images to show: a folder, manifest, tfds:NAME[:SPLIT] or "
                                                       "'default' (default: the run's held-out split)")
    parser.add_argument("--out_dir", default=None, help="where to write (default: WORKDIR/report)")
    parser.add_argument("--max_images", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    return parser


def main(argv: list[str] | None = None, *, prog: str = PROG) -> int:
    args = build_parser(prog).parse_args(argv)

    def work() -> None:
        from jaxembed.eval.report import write_report

        paths = write_report(args.workdir, images_source=args.images, out_dir=args.out_dir,
                             max_images=args.max_images, seed=args.seed)
        print(f"wrote {paths.png}\nwrote {paths.html}")

    return runner.run_tool(prog, work, bad_input=(ImportError,))


if __name__ == "__main__":
    sys.exit(main())
