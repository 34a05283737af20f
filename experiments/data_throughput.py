"""Images per second of the input pipeline (train_batches, eval_batches) at several image sizes.

    python experiments/data_throughput.py                     # Omniglot small1 if present, else default
    python experiments/data_throughput.py --data default --sizes 112 224 --batch_size 64

Prints a table and one JSON line. Training: the first batch (pipeline start-up) is timed apart from the
steady state over --batches further batches. Evaluation: whole passes, start-up included.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
import zipfile

from jaxembed.data import eval_batches, load_source, train_batches

OMNIGLOT_ZIP = os.path.join(
    os.path.dirname(__file__), "..", "..", "shared", "datasets", "omniglot", "images_background_small1.zip"
)


def time_train(data, image_size: int, batch_size: int, num_batches: int) -> tuple[float, float]:
    """(steady-state images/s over num_batches after the first, seconds to the first batch)."""
    batches = train_batches(data, image_size=image_size, batch_size=batch_size, seed=0)
    start = time.perf_counter()
    next(batches)
    first_batch_s = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(num_batches):
        next(batches)
    return num_batches * batch_size / (time.perf_counter() - start), first_batch_s


def time_eval(data, image_size: int, batch_size: int) -> float:
    """Images/s of one whole eval pass, start-up included (what each evaluation costs)."""
    start = time.perf_counter()
    batches = eval_batches(data, image_size=image_size, batch_size=batch_size)
    num_images = sum(int(batch["mask"].sum()) for batch in batches)
    return num_images / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--data", default=None, help="a load_source spec (default: Omniglot small1 if found, else 'default')"
    )
    parser.add_argument("--sizes", type=int, nargs="+", default=[112, 224])
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--batches", type=int, default=40, help="steady-state batches timed per setting")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    load_average = os.getloadavg()[0]  # other work on the machine slows the pipeline down

    with tempfile.TemporaryDirectory() as scratch:
        spec, name = args.data, args.data or "default"
        if spec is None and os.path.exists(OMNIGLOT_ZIP):
            with zipfile.ZipFile(OMNIGLOT_ZIP) as archive:
                archive.extractall(scratch)
            spec, name = os.path.join(scratch, "images_background_small1"), "omniglot images_background_small1"
        start = time.perf_counter()
        data = load_source(spec)
        load_s = time.perf_counter() - start

        rows = []
        for image_size in args.sizes:
            # Medians over repeats: the machine may be shared, and single timings wander.
            train_runs = [time_train(data, image_size, args.batch_size, args.batches) for _ in range(args.repeats)]
            eval_runs = [time_eval(data, image_size, args.batch_size) for _ in range(args.repeats)]
            rows.append({
                "image_size": image_size,
                "train_images_per_s": round(statistics.median(rate for rate, _ in train_runs)),
                "train_first_batch_s": round(statistics.median(first for _, first in train_runs), 3),
                "eval_images_per_s": round(statistics.median(eval_runs)),
            })

    print(f"data: {name} ({len(data)} images, {data.num_concepts} concepts; load + verify {load_s:.2f} s)")
    print(f"machine: {os.cpu_count()} CPU cores ({platform.machine()}), 1-min load average before the run "
          f"{load_average:.2f}; batch_size {args.batch_size}; medians of {args.repeats} runs")
    print(f"{'image_size':>10} {'train images/s':>15} {'first batch s':>14} {'eval pass images/s':>19}")
    for row in rows:
        print(
            f"{row['image_size']:>10} {row['train_images_per_s']:>15} {row['train_first_batch_s']:>14.3f}"
            f" {row['eval_images_per_s']:>19}"
        )
    print(json.dumps({
        "data": name, "num_images": len(data), "load_and_verify_s": round(load_s, 3),
        "cpu_count": os.cpu_count(), "load_average_1min": round(load_average, 2), "batch_size": args.batch_size,
        "results": rows,
    }))


if __name__ == "__main__":
    main()
