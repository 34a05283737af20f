"""Times the bare `python -m jaxembed.train --template NAME` for every template and tabulates the results.

    python experiments/demo_runs.py [--templates inception_bn ...] [--out experiments/results/demo_runs.json]

Each run uses a fresh workdir, so nothing resumes. On a CPU the trainer applies its printed demo
settings (the embedded default digits, 32 px, a few epochs). Prints a Markdown table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

from jaxembed import templates


def run_template(name: str, workdir: str) -> dict:
    command = [sys.executable, "-m", "jaxembed.train", "--template", name, "--workdir", workdir, "--no_progress"]
    start = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed ({result.returncode}):\n{result.stderr[-3000:]}")
    with open(os.path.join(workdir, "summary.json")) as f:
        summary = json.load(f)
    with open(os.path.join(workdir, "run.json")) as f:
        config = json.load(f)["config"]
    return {"template": name, "command": f"python -m jaxembed.train --template {name}", "wall_seconds": seconds,
            "config": config, "summary": summary}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--templates", nargs="*", default=list(templates.NAMES))
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "demo_runs.json"))
    args = parser.parse_args()
    rows = []
    for name in args.templates:
        with tempfile.TemporaryDirectory() as workdir:
            rows.append(run_template(name, workdir))
        print(f"{name}: {rows[-1]['wall_seconds']:.0f} s", file=sys.stderr, flush=True)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(rows, f, indent=2)
    print("| template | arch | image_size | steps | wall time | Recall@1 | Recall@5 | MAP@R | top-1 / mAP |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for row in rows:
        s, c = row["summary"], row["config"]
        classifier = s.get("eval/top1", s.get("eval/mAP"))
        classifier_text = "-" if classifier is None else f"{classifier:.3f}"
        print(f"| {row['template']} | {c['arch']} | {c['image_size']} | {s['step']} | {row['wall_seconds'] / 60:.1f} min "
              f"| {s['eval/recall@1']:.3f} | {s['eval/recall@5']:.3f} | {s.get('eval/map@r', float('nan')):.3f} "
              f"| {classifier_text} |")


if __name__ == "__main__":
    main()
