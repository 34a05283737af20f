"""Flip averaging (`jaxembed.load(flip_average=True)`) against each run's plain embedding.

    python experiments/fashion_mnist.py --settings inception_bn_small_s2   # or any finished run
    python experiments/flip_average.py /tmp/jaxembed-fashion-mnist/runs/inception_bn_small_s2 [RUN ...] \
        --test /tmp/jaxembed-fashion-mnist/test

Each RUN is scored with and without flip averaging on its own held-out images (the part of its training
data the trainer held out: the split to decide by) and, with --test, on a folder of test images, with
`fashion_mnist.scores`: classifier top-1 (ArcFace: nearest centre), leave-one-out Recall@1 and MAP@R, and
10-way one-shot. Writes experiments/results/flip_average.{json,md} (--out to change), with the command.
"""

from __future__ import annotations

import argparse
import os

import fashion_mnist  # experiments/fashion_mnist.py: this script's folder is on sys.path
import runner

METRICS = ("accuracy", "recall@1", "map@r", "one_shot_10way")


def score(workdir: str, images, *, flip_average: bool) -> dict:
    """`fashion_mnist.scores` of the run's newest checkpoint on `images`, read with or without flip averaging."""
    embedder, outputs = runner.embed(workdir, images, flip_average=flip_average)
    names = runner.concept_names(images, outputs["index"])
    return fashion_mnist.scores(outputs, names, concepts=embedder.concepts, task=embedder.task,
                                variables=embedder.variables, run=workdir)


def markdown(rows: list[dict], command: str) -> str:
    header = ["run", "images", *(f"{name}: plain -> flip-averaged" for name in METRICS)]
    cells = [[os.path.basename(row["run"]), f"{row['split']} ({row['plain']['num_test_images']})",
              *(f"{runner.number(row['plain'].get(name))} -> {runner.number(row['flip_averaged'].get(name))}"
                for name in METRICS)] for row in rows]
    return "\n".join([f"`{command}`", "", *runner.markdown_table(header, cells), ""])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", help="finished training workdirs")
    parser.add_argument("--test", help="a folder of test images (concept sub-folders) to score as well")
    parser.add_argument("--out", default=None, help="writes OUT.json and OUT.md (default: "
                                                    "experiments/results/flip_average)")
    args = parser.parse_args(argv)
    runner.refuse_unfinished(parser, args.runs)
    command = " ".join(["python experiments/flip_average.py", *args.runs, *(["--test", args.test] if args.test else []),
                        *(["--out", args.out] if args.out else [])])
    out = args.out or os.path.join(runner.REPO, "experiments", "results", "flip_average")

    from jaxembed import data as data_lib
    from jaxembed import rundir

    test = data_lib.load_source(args.test) if args.test else None
    rows = []
    for workdir in args.runs:
        run = rundir.RunDir(workdir)
        for split, images in (("holdout", run.heldout(run.data())), ("test", test)):
            if images is None:
                continue
            row = {"run": workdir, "split": split, "plain": score(workdir, images, flip_average=False),
                   "flip_averaged": score(workdir, images, flip_average=True)}
            print(markdown([row], command).splitlines()[-1], flush=True)
            rows.append(row)
    runner.write_results(out, {"command": command, "rows": rows}, markdown(rows, command))
    print(f"wrote {out}.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
