"""Images per second of the grain input pipeline, against the tf.data one it replaced and the train step.

    python experiments/data_throughput.py                      # Omniglot small1, 112 and 224 px, workers 0 1 2
    python experiments/data_throughput.py --data default --sizes 224 --workers 0 2 --no_step

For each image size: the steady-state rate of `train_batches` (after its first batch, timed apart: the
start-up, which with workers includes starting their processes) for each `--workers`, and one evaluation
pass (`eval_batches`, start-up included). Beside them, in the same command:

* the tf.data pipeline of `--tfdata_commit` (the last commit that had it), read from git and timed on the
  same images and settings (it needs TensorFlow: the `[tfds]` extra; skipped when absent);
* the trainer's step alone at each template's default size, 224 px, on this machine (`benchmark.py`'s
  JAX worker, batch `--batch_size`, float32): the rate the pipeline has to keep up with.

Writes experiments/results/data_throughput.{json,md} (`--out`). Medians of `--repeats` runs; the machine
may be shared, so its load average is recorded.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import zipfile

import runner  # experiments/runner.py: this script's folder is on sys.path

HERE = os.path.dirname(os.path.abspath(__file__))
OMNIGLOT_ZIP = os.path.join(HERE, "..", "..", "shared", "datasets", "omniglot", "images_background_small1.zip")
TFDATA_COMMIT = "8049f15"  # the last commit whose jaxembed/data/pipeline.py was on tf.data
STEP_TEMPLATES = ("resnet_angular_margin", "inception_bn", "resnext")


def time_train(make_batches, num_batches: int) -> tuple[float, float]:
    """(steady-state images/s over num_batches after the first, seconds to the first batch)."""
    start = time.perf_counter()
    batches = make_batches()
    first = next(batches)
    first_batch_s = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(num_batches):
        next(batches)
    rate = num_batches * len(first["index"]) / (time.perf_counter() - start)
    getattr(batches, "close", lambda: None)()
    return rate, first_batch_s


def time_eval(make_batches) -> float:
    """Images/s of one whole eval pass, start-up included (what each evaluation costs)."""
    start = time.perf_counter()
    num_images = sum(int(batch["mask"].sum()) for batch in make_batches())
    return num_images / (time.perf_counter() - start)


def tfdata_pipeline(commit: str):
    """The tf.data pipeline module of `commit` (its transforms beside it), or None without TensorFlow."""
    if importlib.util.find_spec("tensorflow") is None:
        return None
    folder = tempfile.mkdtemp(prefix="tfdata_pipeline_")
    for name in ("pipeline", "transforms"):
        source = subprocess.run(["git", "show", f"{commit}:jaxembed/data/{name}.py"], cwd=runner.REPO, check=True,
                                capture_output=True, text=True).stdout
        source = source.replace("from jaxembed.data.transforms import", "from tfdata_transforms import")
        with open(os.path.join(folder, f"tfdata_{name}.py"), "w") as f:
            f.write(source)
    sys.path.insert(0, folder)
    import tfdata_pipeline  # noqa: PLC0415 - written just above

    return tfdata_pipeline


def step_rate(template: str, batch_size: int) -> float | None:
    """Images/s of the trainer's step alone at 224 px on this machine (benchmark.py's JAX worker)."""
    import benchmark  # noqa: PLC0415 - only this part needs it

    args = benchmark.parse_args(["--sizes", "224", "--batch_size", str(batch_size), "--templates", template,
                                 "--no_torch", "--steps", "2", "--warmup", "1", "--num_classes", "100"])
    result = benchmark.run_worker("jax", args, template, 224)
    return None if "error" in result else batch_size / statistics.median(result["train_step_s"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=None, help="a load_source spec (default: Omniglot small1 if found)")
    parser.add_argument("--sizes", type=int, nargs="+", default=[112, 224])
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--batches", type=int, default=40, help="steady-state batches timed per setting")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--tfdata_commit", default=TFDATA_COMMIT, help="'' to skip the tf.data comparison")
    parser.add_argument("--no_step", action="store_true", help="skip the train-step rates (minutes on a CPU)")
    parser.add_argument("--out", default=os.path.join(HERE, "results", "data_throughput"))
    args = parser.parse_args(argv)
    if min(args.workers) < 0:
        parser.error(f"--workers must be >= 0, got {args.workers}")
    from jaxembed.data import Augmentation, eval_batches, load_source, train_batches

    load_average = os.getloadavg()[0]
    scratch = tempfile.mkdtemp()
    spec, name = args.data, args.data or "default"
    if spec is None and os.path.exists(OMNIGLOT_ZIP):
        with zipfile.ZipFile(OMNIGLOT_ZIP) as archive:
            archive.extractall(scratch)
        spec, name = os.path.join(scratch, "images_background_small1"), "omniglot images_background_small1"
    data = load_source(spec)
    old = tfdata_pipeline(args.tfdata_commit) if args.tfdata_commit else None

    pipelines = {f"grain, workers={w}": (lambda size, w=w: train_batches(
        data, image_size=size, batch_size=args.batch_size, seed=0, augmentation=Augmentation(), workers=w),
        lambda size, w=w: eval_batches(data, image_size=size, batch_size=args.batch_size, workers=w))
        for w in args.workers}
    if old is not None:
        pipelines[f"tf.data ({args.tfdata_commit})"] = (
            lambda size: old.train_batches(data, image_size=size, batch_size=args.batch_size, seed=0),
            lambda size: old.eval_batches(data, image_size=size, batch_size=args.batch_size))
    rows = []
    for size in args.sizes:
        for pipeline, (train, evaluate) in pipelines.items():
            train_runs = [time_train(lambda: train(size), args.batches) for _ in range(args.repeats)]
            eval_runs = [time_eval(lambda: evaluate(size)) for _ in range(args.repeats)]
            rows.append({"image_size": size, "pipeline": pipeline,
                         "train_images_per_s": round(statistics.median(rate for rate, _ in train_runs)),
                         "train_first_batch_s": round(statistics.median(first for _, first in train_runs), 3),
                         "eval_images_per_s": round(statistics.median(eval_runs))})
            print(rows[-1], file=sys.stderr, flush=True)
    steps = [] if args.no_step else [{"template": t, "image_size": 224, "batch_size": 16,
                                      "step_images_per_s": step_rate(t, 16)} for t in STEP_TEMPLATES]
    report = {"command": " ".join(["python experiments/data_throughput.py", *(argv or sys.argv[1:])]),
              "data": name, "num_images": len(data), "cpu_count": os.cpu_count(), "machine": platform.machine(),
              "load_average_1min_before": round(load_average, 2), "batch_size": args.batch_size,
              "pipelines": rows, "train_steps": steps}
    table = [f"Input pipeline on {name} ({len(data)} images), batch {args.batch_size}, {os.cpu_count()} CPU cores, "
             f"load average {load_average:.1f} before the run; medians of {args.repeats} runs "
             f"(`{report['command']}`).", "",
             *runner.markdown_table(["image size", "pipeline", "train images/s", "first batch s", "eval pass images/s"],
                                    [[r["image_size"], r["pipeline"], f"{r['train_images_per_s']:,}",
                                      f"{r['train_first_batch_s']:.2f}", f"{r['eval_images_per_s']:,}"] for r in rows])]
    if steps:
        table += ["", "The trainer's step alone on the same machine (224 px, batch 16, float32):", "",
                  *runner.markdown_table(["template", "step images/s"],
                                         [[s["template"], runner.number(s["step_images_per_s"], 1)] for s in steps])]
    runner.write_results(args.out, report, "\n".join(table) + "\n")
    print("\n".join(table))
    return 0


if __name__ == "__main__":
    sys.exit(main())
