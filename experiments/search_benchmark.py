"""Search speed and memory: exact search against faiss IndexFlatIP, approximate faiss indexes, and a 10M-row layout.

    python experiments/search_benchmark.py                        # 1M x 128 and 1M x 512, 1,000 queries, k=10, 100
    python experiments/search_benchmark.py --count 100000 --dims 128 --no_hnsw   # a quicker look

Needs faiss and threadpoolctl (`pip install -e '.[search]'`). Writes experiments/results/search_benchmark.json
and .md.

A fair race: OpenBLAS (bundled with NumPy and with the faiss wheel) picks its kernels from the CPU, unless
OPENBLAS_CORETYPE says otherwise; some machines set it (and OPENBLAS_L2_SIZE) in the environment, which makes
faiss's product run an old generic kernel. This script removes both from its own environment before any BLAS is
loaded (re-executing itself if NumPy was already imported), records what it removed, the BLAS libraries,
kernels and thread counts in use (`threadpoolctl.threadpool_info()`), and the rate of a plain float32 product
of the search's shape (the matmul roof: the products alone, no selection). Only this benchmark does this:
tests and CI run with the environment they are given.

Part 1, exact search, per dimension (`--dims`) and k (`--ks`): `jaxembed.search.Index.search` (on a CPU backend
the host path, `jaxembed.topk.host_top_k`: NumPy BLAS products and a group-maximum filter before an exact
merge), `jaxembed.topk.top_k` over a mesh of 1 and of 8 fake CPU devices (XLA's product and `lax.top_k`;
at the first k only), and `faiss.IndexFlatIP`, all in this process with the same threads (faiss's OpenMP threads
= the BLAS threads = the cores). float32 unit vectors clustered around random centres (`--data random` for
structureless ones); every timing is the median of `--repeats` calls after one warm-up call, the methods
interleaved so that other load on the machine falls on each alike. All must return faiss's neighbours
(recall@k against faiss's exact answer).

Part 2, approximate search (the first dimension, the first k): faiss IVF (k-means cells, a few `nprobe`) and
HNSW (a graph, a few `efSearch`): build time, queries/s, recall@k against the exact answer, and the speed-up
over the fastest exact jaxembed search.

Part 3, memory of a 10,000,000 x 512 float32 index (20.5 GB, more than this machine holds) split over 8
fake devices: each device's rows from the sharding (`NamedSharding.shard_shape`), and XLA's own
per-device accounting of the compiled search (`memory_analysis`), lowered from shapes only: nothing is
allocated.
"""

from __future__ import annotations

import os
import sys

# Variables that make OpenBLAS run other kernels than it would pick for this CPU: removed before any BLAS loads.
BLAS_OVERRIDES = ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")
REMOVED_MARK = "JAXEMBED_SEARCH_BENCHMARK_REMOVED"  # what the re-executed process was cleaned of


def clean_blas_environment() -> dict[str, str]:
    """Removes BLAS_OVERRIDES from this process's environment before a BLAS library loads: by deleting them when
    nothing has loaded one yet, otherwise by re-executing this script without them. Returns what was removed."""
    removed = {name: os.environ[name] for name in BLAS_OVERRIDES if name in os.environ}
    if removed and any(module in sys.modules for module in ("numpy", "faiss", "jax", "scipy")):
        env = {name: value for name, value in os.environ.items() if name not in BLAS_OVERRIDES}
        env[REMOVED_MARK] = ";".join(f"{name}={value}" for name, value in removed.items())
        os.execve(sys.executable, [sys.executable, *sys.argv], env)
    for name in removed:
        del os.environ[name]
    earlier = os.environ.pop(REMOVED_MARK, "")
    return {**dict(item.split("=", 1) for item in earlier.split(";") if item), **removed}


if __name__ == "__main__":
    REMOVED_BLAS_OVERRIDES = clean_blas_environment()

# XLA reads the flag when its CPU backend starts: before jax is imported.
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import argparse  # noqa: E402 - after the environment, on purpose
import platform  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402

import runner  # noqa: E402 - experiments/runner.py: this script's folder is on sys.path
from jaxembed.search import ann, topk  # noqa: E402
from jaxembed.search import query as search  # noqa: E402

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


def blas_info() -> list[dict]:
    """The BLAS and OpenMP libraries loaded in this process: library, version, kernel (architecture), threads."""
    from threadpoolctl import threadpool_info

    keys = ("user_api", "internal_api", "prefix", "version", "architecture", "threading_layer", "num_threads")
    return [{**{key: lib.get(key) for key in keys}, "library": os.path.basename(lib["filepath"])}
            for lib in threadpool_info()]


def matmul_roof(vectors: np.ndarray, queries: np.ndarray, repeats: int) -> dict:
    """The plain float32 products of the search, `vectors @ queries.T` in blocks of the host search's rows, and
    nothing else: the most queries/s a search built on this BLAS product can reach."""
    block = topk.host_block_rows(len(queries), 1)
    tile = np.empty((block, len(queries)), np.float32)

    def products():
        for start in range(0, len(vectors), block):
            rows = vectors[start:start + block]
            np.matmul(rows, queries.T, out=tile[:len(rows)])

    times = runner.timed(products, repeats, warmup=1)
    seconds = min(times)
    flops = 2 * len(vectors) * vectors.shape[1] * len(queries)
    return {"block_rows": block, "seconds": seconds, "all_seconds": times, "gflops_per_second": flops / seconds / 1e9,
            "queries_per_second": len(queries) / seconds}


def exact_rows(args, vectors, queries, faiss_flat, k: int, mesh: bool) -> tuple[list[dict], np.ndarray]:
    """Part 1: queries/s of faiss's flat index, jaxembed's exact search (host, and over meshes when `mesh`)."""
    index = search.Index(vectors, (), ())  # paths are not needed to search
    searches = {"faiss IndexFlatIP": lambda: faiss_flat.search(queries, k),
                "jaxembed Index.search (host: NumPy BLAS + group-max filter)": lambda: index.search(queries, k)}
    for devices in (args.mesh_devices if mesh else ()):
        rows = topk.place_rows(vectors, topk.row_mesh(jax.devices()[:devices]))
        searches[f"jaxembed topk.top_k, mesh of {devices} device(s), block {rows.layout.block}"] = (
            lambda rows=rows: jax.block_until_ready(topk.top_k(rows, queries, k)))
    results = {name: fn() for name, fn in searches.items()}  # warm-up (compiles); its answers are checked below
    times = {name: [] for name in searches}
    for _ in range(args.repeats):  # interleaved, so that outside load hits every method alike
        for name, fn in searches.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    exact = results["faiss IndexFlatIP"][1]
    table = []
    for name in searches:
        seconds = statistics.median(times[name])
        table.append({"method": name, "seconds": seconds, "best_seconds": min(times[name]), "all_seconds": times[name],
                      "queries_per_second": len(queries) / seconds,
                      "recall_vs_faiss_flat": recall(np.asarray(results[name][1]), exact)})
    return table, exact


def approximate_rows(args, vectors, queries, k: int, exact: np.ndarray, exact_seconds: float) -> list[dict]:
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
            seconds = median_seconds(lambda: ann.search(index, queries, k), args.repeats)
            table.append({"method": f"faiss {kind.upper()}", "setting": f"{knob}={setting}",
                          "build_seconds": build_seconds, "seconds": seconds,
                          "queries_per_second": len(queries) / seconds,
                          "recall_at_k": recall(ann.search(index, queries, k)[1], exact),
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
    removed = ", ".join(f"{name}={value}" for name, value in setup["removed_blas_overrides"].items()) or "none were set"
    lines = [f"Search on {setup['count']:,} float32 unit vectors, {data}, {setup['queries']:,} queries; "
             f"{setup['cpu_threads']} CPU threads ({setup['machine']}; faiss {setup['faiss']}, jax {setup['jax']}, "
             f"numpy {setup['numpy']}); median of {setup['repeats']} timed calls after a warm-up, the methods "
             "interleaved in one process.", "",
             f"BLAS overrides removed from the environment before any BLAS loaded: {removed}. "
             "Libraries in use (threadpoolctl):", ""]
    lines += runner.markdown_table(["library", "API", "version", "kernel", "threads"],
                                   [[b["library"], b["internal_api"], b["version"] or "-", b["architecture"] or "-",
                                     b["num_threads"]] for b in setup["blas"]])
    lines += ["", "Exact search. *vs faiss*: queries/s over faiss's (medians); *of roof*: queries/s over those of "
              "the plain float32 products alone (NumPy's BLAS, the host search's blocks; its rate in the section's "
              "title); *best s*: the fastest timed call; *vs faiss, best of each*: faiss's fastest call over this "
              "method's. On a machine shared with other work faiss's times vary far more than jaxembed's (its "
              "OpenMP threads wait for cores); where the two ratios disagree, neither is the quiet-machine figure.", ""]
    for config in result["exact"]:
        roof = config["matmul_roof"]
        lines += [f"{setup['count']:,} x {config['dim']}, k={config['k']} (matmul roof {roof['gflops_per_second']:.0f} "
                  f"GFLOP/s, {roof['queries_per_second']:.0f} queries/s):", ""]
        faiss_best = config["rows"][0]["best_seconds"]
        lines += runner.markdown_table(
            ["method", "seconds", "queries/s", "vs faiss", "of roof", "best s", "vs faiss, best of each",
             "recall@k vs faiss"],
            [[r["method"], runner.number(r["seconds"], 2), f"{r['queries_per_second']:.0f}",
              f"{r['queries_per_second'] / config['faiss_flat_queries_per_second']:.2f}x",
              f"{r['queries_per_second'] / roof['queries_per_second']:.2f}", runner.number(r["best_seconds"], 2),
              f"{faiss_best / r['best_seconds']:.2f}x", runner.number(r["recall_vs_faiss_flat"])]
             for r in config["rows"]])
        lines.append("")
    first = result["exact"][0]
    lines += [f"Approximate (faiss; {setup['count']:,} x {first['dim']}, k={first['k']}), against the fastest exact "
              "jaxembed search:", ""]
    lines += runner.markdown_table(
        ["method", "setting", "build s", "queries/s", f"recall@{first['k']}", "speed-up"],
        [[r["method"], r["setting"], runner.number(r["build_seconds"], 1), f"{r['queries_per_second']:.0f}",
          runner.number(r["recall_at_k"]), f"{r['speed_up_over_jax_exact']:.1f}x"] for r in result["approximate"]])
    big = result["layout"]
    lines += ["", f"A {big['count']:,} x {big['dim']} float32 index ({big['whole_index_bytes'] / 1e9:.1f} GB) over "
              f"{big['devices']} devices: {big['rows_per_device']:,} rows ({big['shard_bytes'] / 1e9:.2f} GB, "
              f"{big['shard_fraction_of_index']:.4f} of the index) per device from the sharding; the compiled "
              f"search's arguments take {big['compiled_argument_bytes_per_device'] / 1e9:.2f} GB per device "
              f"(rows + queries) and its temporaries {big['compiled_temp_bytes_per_device'] / 1e6:.0f} MB."]
    return "\n".join(lines) + "\n"


def make_vectors(args, dim: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    if args.data == "random":
        return unit_vectors(args.count, dim, rng), unit_vectors(args.queries, dim, rng)
    centres = unit_vectors(args.concepts, dim, rng)
    return tuple(clustered_vectors(n, dim, centres, args.spread, rng) for n in (args.count, args.queries))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=1_000_000)
    parser.add_argument("--dims", type=int, nargs="+", default=[128, 512])
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--ks", type=int, nargs="+", default=[10, 100])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--mesh_devices", type=int, nargs="*", default=[1, 8],
                        help="meshes of the jax.sharding top_k rows (at the first k of each dimension)")
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
    configs, approximate = [], []
    for number, dim in enumerate(args.dims):
        vectors, queries = make_vectors(args, dim)
        flat = faiss.IndexFlatIP(dim)
        flat.add(vectors)
        roof = matmul_roof(vectors, queries, args.repeats)
        print(f"{dim}: matmul roof {roof['gflops_per_second']:.0f} GFLOP/s", flush=True)
        for k in args.ks:
            rows, exact = exact_rows(args, vectors, queries, flat, k, mesh=k == args.ks[0])
            faiss_qps = rows[0]["queries_per_second"]
            configs.append({"dim": dim, "k": k, "rows": rows, "matmul_roof": roof,
                            "faiss_flat_queries_per_second": faiss_qps})
            for r in rows:
                print(f"{dim} k={k} {r['method']}: {r['queries_per_second']:.0f} q/s "
                      f"({r['queries_per_second'] / faiss_qps:.2f}x faiss), recall {r['recall_vs_faiss_flat']:.4f}",
                      flush=True)
            if number == 0 and k == args.ks[0]:
                best = min(r["seconds"] for r in rows if r["method"].startswith("jaxembed"))
                approximate = approximate_rows(args, vectors, queries, k, exact, best)
        del vectors, queries, flat
    result = {
        "setup": {"data": args.data, "concepts": args.concepts, "spread": args.spread, "count": args.count,
                  "dims": args.dims, "queries": args.queries, "ks": args.ks, "repeats": args.repeats,
                  "cpu_threads": threads, "faiss_omp_threads": faiss.omp_get_max_threads(),
                  "machine": f"{platform.machine()}, {platform.processor() or 'cpu'}",
                  "jax": jax.__version__, "faiss": faiss.__version__, "numpy": np.__version__,
                  "removed_blas_overrides": REMOVED_BLAS_OVERRIDES, "blas": blas_info()},
        "exact": configs, "approximate": approximate,
        "layout": layout_row(10_000_000, 512, args.queries, args.ks[0]),
    }
    table = markdown(result)
    runner.write_results(RESULTS, result, table)
    print(table)


if __name__ == "__main__":
    main()
