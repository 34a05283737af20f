"""Times the bare `python -m jaxembed.train --template NAME` for every template and tabulates the results.

    python experiments/demo_runs.py [--templates inception_bn ...] [--out experiments/results/demo_runs.json]

Each run uses a fresh workdir, so nothing resumes. On a CPU the trainer applies its printed demo
settings (the embedded default digits, 32 px, a few epochs). Prints a Markdown table and writes it
beside the JSON (OUT with .md).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

import runner  # experiments/runner.py: this script's folder is on sys.path
from jaxembed import templates


def run_template(name: str, workdir: str) -> dict:
    run = runner.train(["--template", name, "--no_progress"], workdir)
    return {"template": name, "command": f"python -m jaxembed.train --template {name}", "wall_seconds": run.seconds,
            "config": run.run_dir.record()["config"], "summary": run.summary(),
            **runner.loss_curve_record(run, f"demo_{name}")}


def markdown(rows: list[dict]) -> str:
    number = runner.number
    cells = []
    for row in rows:
        s, c = row["summary"], row["config"]
        cells.append([row["template"], c["arch"], c["image_size"], s["step"], f"{row['wall_seconds'] / 60:.1f} min",
                      number(s.get("eval/recall@1")), number(s.get("eval/pixels_recall@1")),
                      number(s.get("eval/recall@5")), number(s.get("eval/map@r")),
                      number(s.get("eval/top1", s.get("eval/mAP"))), runner.loss_curve_cell(row)])
    return "\n".join(runner.markdown_table(["template", "arch", "image_size", "steps", "wall time", "Recall@1",
                                            "raw pixels Recall@1", "Recall@5", "MAP@R", "top-1 / mAP",
                                            "largest step loss / window mean"],
                                           cells)) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--templates", nargs="*", choices=templates.NAMES, default=list(templates.NAMES))
    parser.add_argument("--out", default=os.path.join(runner.REPO, "experiments", "results", "demo_runs.json"))
    args = parser.parse_args(argv)
    rows = []
    for name in args.templates:
        with tempfile.TemporaryDirectory() as workdir:
            rows.append(run_template(name, os.path.join(workdir, "run")))
        print(f"{name}: {rows[-1]['wall_seconds']:.0f} s", file=sys.stderr, flush=True)
    table = markdown(rows)
    runner.write_results(os.path.splitext(args.out)[0], rows, table)
    print(table, end="")


if __name__ == "__main__":
    main()
