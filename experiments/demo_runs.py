"""Times the bare `python -m jaxembed.train --template NAME` for every template and tabulates the results.

    python experiments/demo_runs.py [--templates inception_bn ...] [--out experiments/results/demo_runs.json]
    python experiments/demo_runs.py --seeds 0 1 2 3 4 [--flags "--crop pad --crop_padding 4" ...]

Each run uses a fresh workdir, so nothing resumes. On a CPU the trainer applies its printed demo
settings (the embedded default digits, 32 px, a few epochs). Prints a Markdown table and writes it
beside the JSON (OUT with .md). With --seeds, each template runs once per seed (the seed also draws
the held-out images) and per --flags variant (none: the bare command), without report pages, into
experiments/results/demo_seeds.json: how much one seed's row can be trusted.
"""

from __future__ import annotations

import argparse
import os
import shlex
import statistics
import sys
import tempfile
from collections.abc import Sequence

import runner  # experiments/runner.py: this script's folder is on sys.path
from jaxembed import templates


def run_template(name: str, workdir: str, *, seed: int | None = None, flags: Sequence[str] = ()) -> dict:
    """One run of the command; the bare one (no seed, no flags) also gets its report page in results/curves."""
    args = ["--template", name, *([] if seed is None else ["--seed", str(seed)]), *flags]
    run = runner.train([*args, "--no_progress"], workdir)
    row = {"template": name, "command": shlex.join(["python", "-m", "jaxembed.train", *args]),
           "wall_seconds": run.seconds, "config": run.run_dir.record()["config"], "summary": run.summary()}
    if seed is None and not flags:
        return {**row, **runner.loss_curve_record(run, f"demo_{name}")}
    return {**row, "seed": seed, "flags": shlex.join(flags), "largest_loss_spike": run.largest_loss_spike()}


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


SPIKE = 3.0  # issue 18: no step loss above 3x its window's mean after warmup


def seeds_markdown(rows: list[dict]) -> str:
    """Per template and flags: the runs' spread over seeds, then every run."""
    number = runner.number
    groups: dict[tuple[str, str], list[dict]] = {}
    for row in rows:
        groups.setdefault((row["template"], row["flags"]), []).append(row)
    summary = []
    for (template, flags), runs in groups.items():
        recall = [r["summary"]["eval/recall@1"] for r in runs]
        pixels = [r["summary"]["eval/pixels_recall@1"] for r in runs]
        map_r = [r["summary"]["eval/map@r"] for r in runs]
        spikes = [r["largest_loss_spike"] for r in runs]
        summary.append([template, flags or "(none)", len(runs), f"{number(statistics.mean(recall))} ({number(min(recall))})",
                        number(statistics.mean(pixels)), number(statistics.mean(map_r)),
                        f"{sum(s > SPIKE for s in spikes)} of {len(runs)}", f"{max(spikes):.1f}x"])
    cells = [[r["template"], r["flags"] or "(none)", r["seed"], number(r["summary"]["eval/recall@1"]),
              number(r["summary"]["eval/pixels_recall@1"]), number(r["summary"]["eval/map@r"]),
              f"{r['largest_loss_spike']:.2f}x", f"{r['wall_seconds'] / 60:.1f} min"] for r in rows]
    return "\n".join([
        *runner.markdown_table(["template", "flags", "runs", "Recall@1 mean (min)", "raw pixels Recall@1 mean",
                                "MAP@R mean", f"runs with a step loss > {SPIKE:g}x its window mean", "largest"],
                               summary), "",
        *runner.markdown_table(["template", "flags", "seed", "Recall@1", "raw pixels Recall@1", "MAP@R",
                                "largest step loss / window mean", "wall time"], cells)]) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--templates", nargs="*", choices=templates.NAMES, default=list(templates.NAMES))
    parser.add_argument("--seeds", nargs="+", type=int, default=None, help="one run per seed (and --flags variant)")
    parser.add_argument("--flags", action="append", default=None,
                        help="with --seeds: trainer flags of a variant, quoted; repeat for more ('' is the bare command)")
    parser.add_argument("--out", default=None, help="default experiments/results/demo_runs.json "
                                                    "(with --seeds: demo_seeds.json)")
    args = parser.parse_args(argv)
    if args.flags is not None and args.seeds is None:
        parser.error("--flags needs --seeds")
    out = args.out or os.path.join(runner.RESULTS, "demo_runs.json" if args.seeds is None else "demo_seeds.json")
    variants = [shlex.split(flags) for flags in (args.flags or [""])]
    rows = []
    for seed in args.seeds or [None]:
        for flags in variants:
            for name in args.templates:
                with tempfile.TemporaryDirectory() as workdir:
                    rows.append(run_template(name, os.path.join(workdir, "run"), seed=seed, flags=flags))
                print(f"{rows[-1]['command']}: {rows[-1]['wall_seconds']:.0f} s", file=sys.stderr, flush=True)
                if args.seeds is not None:  # a long series: what has finished is kept
                    runner.write_results(os.path.splitext(out)[0], rows, seeds_markdown(rows))
    table = markdown(rows) if args.seeds is None else seeds_markdown(rows)
    runner.write_results(os.path.splitext(out)[0], rows, table)
    print(table, end="")


if __name__ == "__main__":
    main()
