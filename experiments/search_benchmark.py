"""Search speed and memory: exact JAX top-k against faiss, approximate faiss indexes, and a 10M-row layout.

    python experiments/search_benchmark.py                        # 1,000,000 x 128, 1,000 queries, k=10
    python experiments/search_benchmark.py --count 100000 --no_hnsw   # a quicker look

Needs faiss (`pip install -e '.[search]'`). Writes experiments/results/search_benchmark.json and .md.

Part 1, exact search: `jaxembed.topk.top_k` (blocked matmul + `lax.top_k`, the rows on a 1-device mesh,
and split over the 8 fake CPU devices) for a few block sizes, against `faiss.IndexFlatIP` with as many
OpenMP threads as XLA's CPU client uses (every core). float32 unit vectors clustered around random
centres (`--data random` for structureless ones); every timing is the median of `--repeats` calls after
one warm-up call, JAX and faiss interleaved so that other load on the
machine falls on both alike. Both must return the same neighbours (checked: recall@k of JAX against
faiss's exact answer).

Part 2, approximate search: faiss IVF (k-means cells, a few `nprobe`) and HNSW (a graph, a few
`efSearch`): build time, queries/s, recall@k against the exact answer, and the speed-up over the exact
JAX search.

Part 3, memory of a 10,000,000 x 512 float32 index (20.5 GB, more than this machine holds) split over 8
fake devices: each device's rows from the sharding (`NamedSharding.shard_shape`), and XLA's own
per-device accounting of the compiled search (`memory_analysis`), lowered from shapes only: nothing is
allocated.
"""

from __future__ import annotations

import os

# XLA reads the flag when its CPU backend starts: before jax is imported.
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import argparse  # noqa: E402 - after the XLA flag, on purpose
import platform  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402

import runner  # noqa: E402 - experiments/runner.py: this script's folder is on sys.path
from jaxembed import ann, topk  # noqa: E402

RESULTS = os.path.join(runner.REPO, "experiments", "results", "search_benchmark")


def unit_vectors(count: int, dim: int, rng: np.random.Generator) -> np.ndarray:
    vectors = rng.standard_normal((count, dim), dtype=np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def clustered_vectors(count: int, dim: int, centres: np.ndarray, spread: float, rng: np.random.Generator) -> np.ndarray:
    """Unit vectors around random `centres` (C, dim): what embeddings of many concepts look like, unlike
    structureless random vectors, on which no approximate index finds much (exact search does not care)."""
    vectors = np.empty((count, dim), np.float32)
    for start in range(0, count, 100_000):  # in parts, to keep the temporaries small
        stop = min(start + 100_000, count)
        picked = centres[rng.integers(0, len(centres), stop - start)]
        noise = rng.standard_normal((stop - start, dim), dtype=np.float32) * (spread / np.sqrt(dim))
        vectors[start:stop] = picked + noise
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def recall(found: np.ndarray, exact: np.ndarray) -> float:
    """Mean share of the exact top-k ids that `found` (Q, k) holds."""
    return float(np.mean([len(set(a.tolist()) & set(e.tolist())) / len(e) for a, e in zip(found, exact)]))


def median_seconds(fn, repeats: int) -> float:
    return statistics.median(runner.timed(fn, repeats, warmup=1))


def exact_rows(args, vectors, queries, faiss_flat) -> tuple[list[dict], np.ndarray]:
    """Part 1: queries/s of JAX's exact search per mesh and block size, and faiss's flat index."""
    searches = {"faiss IndexFlatIP": lambda: faiss_flat.search(queries, args.k)}
    for devices in (1, 8):
        for block_rows in args.block_rows:
            rows = topk.place_rows(vectors, topk.row_mesh(jax.devices()[:devices]), block_rows=block_rows)
            searches[f"jax exact, {devices} device(s), block {rows.layout.block}"] = (
                lambda rows=rows: jax.block_until_ready(topk.top_k(rows, queries, args.k)))
    for fn in searches.values():  # warm-up (compiles)
        fn()
    times = {name: [] for name in searches}
    for _ in range(args.repeats):  # interleaved, so that outside load hits every method alike
        for name, fn in searches.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    _, exact = faiss_flat.search(queries, args.k)
    table = []
    for name, fn in searches.items():
        found = fn()[1]
        table.append({"method": name, "seconds": statistics.median(times[name]), "all_seconds": times[name],
                      "queries_per_second": len(queries) / statistics.median(times[name]),
                      "recall_vs_faiss_flat": recall(np.asarray(found), exact)})
    return table, exact


def approximate_rows(args, vectors, queries, exact: np.ndarray, exact_seconds: float) -> list[dict]:
    """Part 2: faiss IVF and HNSW at a few search settings."""
    table = []
    kinds = [("ivf", "nprobe", args.ivf_probes)] + ([] if args.no_hnsw else [("hnsw", "efSearch", args.ef_search)])
    for kind, knob, settings in kinds:
        start = time.perf_counter()
        index = ann.build(vectors, kind)
        build_seconds = time.perf_counter() - start
        for setting in settings:
            if kind == "ivf":
                index.nprobe = setting
            else:
                index.hnsw.efSearch = setting
            seconds = median_seconds(lambda: ann.search(index, queries, args.k), args.repeats)
            table.append({"method": f"faiss {kind.upper()}", "setting": f"{knob}={setting}",
                          "build_seconds": build_seconds, "seconds": seconds,
                          "queries_per_second": len(queries) / seconds,
                          "recall_at_k": recall(ann.search(index, queries, args.k)[1], exact),
                          "speed_up_over_jax_exact": exact_seconds / seconds})
    return table


def layout_row(count: int, dim: int, num_queries: int, k: int) -> dict:
    """Part 3: per-device bytes of a `count` x `dim` float32 index over 8 devices, allocating nothing."""
    mesh = topk.row_mesh(jax.devices()[:8])
    layout = topk.row_layout(count, 8)
    shard_shape = topk.row_sharding(mesh).shard_shape((layout.padded_count, dim))
    memory = topk.lower_top_k(layout, dim, mesh, num_queries, k).compile().memory_analysis()
    whole = count * dim * 4
    return {"count": count, "dim": dim, "devices": 8, "whole_index_bytes": whole,
            "rows_per_device": layout.rows_per_device, "block": layout.block, "shard_shape": list(shard_shape),
            "shard_bytes": int(np.prod(shard_shape)) * 4, "shard_fraction_of_index": np.prod(shard_shape) * 4 / whole,
            "compiled_argument_bytes_per_device": memory.argument_size_in_bytes,
            "compiled_temp_bytes_per_device": memory.temp_size_in_bytes}


def markdown(result: dict) -> str:
    setup = result["setup"]
    data = ("random" if setup["data"] == "random" else
            f"clustered ({setup['concepts']:,} random centres, noise norm {setup['spread']})")
    lines = [f"Search on {setup['count']:,} x {setup['dim']} float32 unit vectors, {data}, {setup['queries']:,} queries, "
             f"k={setup['k']}; {setup['cpu_threads']} CPU threads ({setup['machine']}); median of "
             f"{setup['repeats']} timed calls after a warm-up.", "", "Exact:", ""]
    lines += runner.markdown_table(
        ["method", "seconds", "queries/s", "vs faiss flat", "recall@k vs faiss flat"],
        [[r["method"], runner.number(r["seconds"], 2), f"{r['queries_per_second']:.0f}",
          f"{r['queries_per_second'] / result['faiss_flat_queries_per_second']:.2f}x",
          runner.number(r["recall_vs_faiss_flat"])] for r in result["exact"]])
    lines += ["", "Approximate (faiss), against the best exact JAX time:", ""]
    lines += runner.markdown_table(
        ["method", "setting", "build s", "queries/s", f"recall@{setup['k']}", "speed-up"],
        [[r["method"], r["setting"], runner.number(r["build_seconds"], 1), f"{r['queries_per_second']:.0f}",
          runner.number(r["recall_at_k"]), f"{r['speed_up_over_jax_exact']:.1f}x"] for r in result["approximate"]])
    big = result["layout"]
    lines += ["", f"A {big['count']:,} x {big['dim']} float32 index ({big['whole_index_bytes'] / 1e9:.1f} GB) over "
              f"{big['devices']} devices: {big['rows_per_device']:,} rows ({big['shard_bytes'] / 1e9:.2f} GB, "
              f"{big['shard_fraction_of_index']:.4f} of the index) per device from the sharding; the compiled "
              f"search's arguments take {big['compiled_argument_bytes_per_device'] / 1e9:.2f} GB per device "
              f"(rows + queries) and its temporaries {big['compiled_temp_bytes_per_device'] / 1e6:.0f} MB."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("-k", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--block_rows", type=int, nargs="+", default=[8192, 32768, 131072])
    parser.add_argument("--ivf_probes", type=int, nargs="+", default=[16, 64])
    parser.add_argument("--ef_search", type=int, nargs="+", default=[64, 256])
    parser.add_argument("--no_hnsw", action="store_true", help="skip HNSW (its build is the slowest part)")
    parser.add_argument("--data", choices=["clustered", "random"], default="clustered")
    parser.add_argument("--concepts", type=int, default=10_000, help="clustered data: the number of centres")
    parser.add_argument("--spread", type=float, default=0.75, help="clustered data: noise norm around a centre")
    args = parser.parse_args()
    import faiss

    threads = os.cpu_count()
    faiss.omp_set_num_threads(threads)
    rng = np.random.default_rng(0)
    if args.data == "random":
        vectors, queries = unit_vectors(args.count, args.dim, rng), unit_vectors(args.queries, args.dim, rng)
    else:
        centres = unit_vectors(args.concepts, args.dim, rng)
        vectors, queries = (clustered_vectors(n, args.dim, centres, args.spread, rng) for n in (args.count, args.queries))
    flat = faiss.IndexFlatIP(args.dim)
    flat.add(vectors)
    exact_table, exact = exact_rows(args, vectors, queries, flat)
    faiss_qps = next(r["queries_per_second"] for r in exact_table if r["method"].startswith("faiss"))
    best_jax = min(r["seconds"] for r in exact_table if r["method"].startswith("jax"))
    result = {
        "setup": {"data": args.data, "concepts": args.concepts, "spread": args.spread,
                  "count": args.count, "dim": args.dim, "queries": args.queries, "k": args.k, "repeats": args.repeats,
                  "cpu_threads": threads, "machine": f"{platform.machine()}, {platform.processor() or 'cpu'}",
                  "jax": jax.__version__, "faiss": faiss.__version__},
        "exact": exact_table, "faiss_flat_queries_per_second": faiss_qps,
        "best_jax_vs_faiss_flat": (args.queries / best_jax) / faiss_qps,
        "approximate": approximate_rows(args, vectors, queries, exact, best_jax),
        "layout": layout_row(10_000_000, 512, args.queries, args.k),
    }
    table = markdown(result)
    runner.write_results(RESULTS, result, table)
    print(table)


if __name__ == "__main__":
    main()
