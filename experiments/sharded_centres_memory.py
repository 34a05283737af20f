"""Per-device memory of ArcFace class centres sharded over a `model` axis, and a 1M-class step on 8 CPU devices.

    python experiments/sharded_centres_memory.py                      # 1,000,000 classes x 512, then run
    python experiments/sharded_centres_memory.py --no_run             # the table only (compiles, allocates nothing)
    python experiments/sharded_centres_memory.py --num_classes 100000 --steps 5

Part 1, for 1, 2, 4 and 8 devices on `model` (`data` = 1): the per-device bytes of the centres, of
their gradient and of their SGD momentum, from the shard shape `jaxembed.parallel.centers_sharding`
gives; and XLA's own per-device accounting of the compiled train step (`memory_analysis`: arguments,
outputs, temporaries). Nothing is allocated for this part.

Part 2: the train step run on 8 fake CPU devices (1 x 8 mesh): a replicated projection
(feature_dim -> embed_dim) of a small random feature batch, `jaxembed.losses.arcface_loss(..., mesh=mesh)`
(the trainer's one ArcFace loss, class-sharded over the mesh), and SGD with
momentum 0.9 (the trainer's optimiser) on the projection and the centres. The centres and momentum are
created sharded (never whole on one device); it reports the real shard shapes, the time per step
(after a compiling first step) and the process's peak resident memory. All 8 fake devices share this
machine's memory and cores, so the peak RSS is the sum over devices and the time is a CPU's, not a
cluster's.

Prints a table and one JSON line.
"""

from __future__ import annotations

import os

# XLA reads the flag when its CPU backend starts: before jax is imported.
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import argparse  # noqa: E402 - after the XLA flag, on purpose
import functools  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import resource  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec  # noqa: E402

from jaxembed import losses, parallel  # noqa: E402

MODEL_SIZES = (1, 2, 4, 8)
MIB = 2**20


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def make_step(tx: optax.GradientTransformation, mesh, *, scale: float, margin: float):
    """`step(params, opt_state, features, labels) -> (params, opt_state, loss)`, pure.

    params: `projection` `(feature_dim, embed_dim)` replicated, `centers` `(embed_dim, num_classes)`
    sharded over `model`; features `(batch, feature_dim)`, labels `(batch,)` int32, rows over `data`.
    """

    def loss_fn(params, features, labels):
        embeddings = features @ params["projection"]
        return losses.arcface_loss(embeddings, params["centers"], labels, scale=scale, margin=margin, mesh=mesh)

    def step(params, opt_state, features, labels):
        loss, grads = jax.value_and_grad(loss_fn)(params, features, labels)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return step


def compile_step(args, model: int, tx):
    """The step jitted over a 1 x `model` mesh, its shardings, and the abstract arguments."""
    mesh = parallel.make_mesh(jax.devices()[:model], model_parallelism=model)  # data = 1
    params = {"projection": jax.ShapeDtypeStruct((args.feature_dim, args.embed_dim), jnp.float32),
              "centers": jax.ShapeDtypeStruct((args.embed_dim, args.num_classes), jnp.float32)}
    opt_state = jax.eval_shape(tx.init, params)
    param_shardings, opt_shardings = parallel.state_shardings(params, mesh), parallel.state_shardings(opt_state, mesh)
    rows = NamedSharding(mesh, PartitionSpec(parallel.DATA_AXIS))
    jitted = jax.jit(
        make_step(tx, mesh, scale=args.scale, margin=args.margin),
        in_shardings=(param_shardings, opt_shardings, rows, rows),
        out_shardings=(param_shardings, opt_shardings, NamedSharding(mesh, PartitionSpec())),
        donate_argnums=(0, 1),  # the new centres and momentum reuse the old buffers
    )
    abstract = (params, opt_state, jax.ShapeDtypeStruct((args.batch, args.feature_dim), jnp.float32),
                jax.ShapeDtypeStruct((args.batch,), jnp.int32))
    return mesh, jitted, (param_shardings, opt_shardings, rows), abstract


def memory_row(args, model: int, tx) -> dict:
    """Per-device bytes for `model` devices on the model axis, from shard shapes and the compiled step."""
    mesh, jitted, _, abstract = compile_step(args, model, tx)
    shard = parallel.centers_sharding(mesh).shard_shape((args.embed_dim, args.num_classes))
    centres = int(np.prod(shard)) * 4
    memory = jitted.lower(*abstract).compile().memory_analysis()
    return {
        "model_devices": model, "centres_shard_shape": list(shard),
        "centres_bytes": centres, "gradient_bytes": centres, "momentum_bytes": centres,
        "compiled_argument_bytes": memory.argument_size_in_bytes,
        "compiled_output_bytes": memory.output_size_in_bytes,
        "compiled_alias_bytes": memory.alias_size_in_bytes,
        "compiled_temp_bytes": memory.temp_size_in_bytes,
        # Donated arguments alias outputs, so they count once.
        "compiled_peak_bytes": memory.argument_size_in_bytes + memory.output_size_in_bytes
        - memory.alias_size_in_bytes + memory.temp_size_in_bytes,
    }


def run_on_devices(args, tx) -> dict:
    """Runs the step on a 1 x 8 mesh with real (randomly initialised) sharded centres."""
    model = 8
    mesh, jitted, (param_shardings, opt_shardings, rows), _ = compile_step(args, model, tx)
    rss_before = peak_rss_bytes()

    @functools.partial(jax.jit, out_shardings=(param_shardings, opt_shardings))
    def init(key):
        # Created inside jit with out_shardings, so each device only ever holds its own block of classes.
        # One embedding dimension at a time: XLA's CPU random-number generator keeps three temporaries
        # the size of its output, which for the whole matrix would make initialisation, not the train
        # step, the peak this experiment measures (4 shards per device instead of 1).
        projection_key, centers_key = jax.random.split(key)

        def centers_row(i):
            row = jax.random.normal(jax.random.fold_in(centers_key, i), (args.num_classes,)) * 0.01
            return jax.lax.with_sharding_constraint(row, NamedSharding(mesh, PartitionSpec(parallel.MODEL_AXIS)))

        params = {"projection": jax.random.normal(projection_key, (args.feature_dim, args.embed_dim)) * 0.05,
                  "centers": jax.lax.map(centers_row, jnp.arange(args.embed_dim))}
        return params, tx.init(params)

    params, opt_state = jax.block_until_ready(init(jax.random.PRNGKey(0)))  # dispatch is asynchronous
    rng = np.random.default_rng(0)
    # A new random batch every step (made before timing): a repeated batch would be fitted at once.
    batches = [(jax.device_put(rng.normal(size=(args.batch, args.feature_dim)).astype(np.float32), rows),
                jax.device_put(rng.integers(0, args.num_classes, size=args.batch).astype(np.int32), rows))
               for _ in range(args.steps + 1)]
    shard_shapes = sorted({tuple(s.data.shape) for s in params["centers"].addressable_shards})
    momentum = [leaf for path, leaf in jax.tree_util.tree_leaves_with_path(opt_state)
                if "centers" in jax.tree_util.keystr(path)]
    momentum_shapes = sorted({tuple(s.data.shape) for leaf in momentum for s in leaf.addressable_shards})
    rss_after_init = peak_rss_bytes()

    start = time.perf_counter()
    params, opt_state, loss = jitted(params, opt_state, *batches[0])
    losses = [float(loss)]
    first_step_s = time.perf_counter() - start  # compiling included
    step_times = []
    for batch in batches[1:]:
        start = time.perf_counter()
        params, opt_state, loss = jitted(params, opt_state, *batch)
        losses.append(float(loss))  # float() waits for the step to finish
        step_times.append(time.perf_counter() - start)
    return {
        "mesh": {"data": 1, "model": model}, "centres_shard_shapes": [list(s) for s in shard_shapes],
        "momentum_shard_shapes": [list(s) for s in momentum_shapes],
        "first_step_s_with_compile": first_step_s, "step_s_median": float(np.median(step_times)),
        "step_s_all": step_times, "losses": losses,
        "peak_rss_bytes_before_init": rss_before, "peak_rss_bytes_after_init": rss_after_init,
        "peak_rss_bytes_after_steps": peak_rss_bytes(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num_classes", type=int, default=1_000_000)
    parser.add_argument("--embed_dim", type=int, default=512)
    parser.add_argument("--feature_dim", type=int, default=256)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--scale", type=float, default=64.0)
    parser.add_argument("--margin", type=float, default=0.5)
    parser.add_argument("--learning_rate", type=float, default=0.01)
    parser.add_argument("--steps", type=int, default=3, help="timed steps after the first")
    parser.add_argument("--no_run", action="store_true", help="only the table (nothing allocated)")
    args = parser.parse_args()
    if args.num_classes % max(MODEL_SIZES):
        parser.error(f"--num_classes={args.num_classes} must be divisible by {max(MODEL_SIZES)}")
    tx = optax.sgd(args.learning_rate, momentum=0.9)

    rows = [memory_row(args, model, tx) for model in MODEL_SIZES]
    print(f"centres {args.embed_dim} x {args.num_classes:,} float32, batch {args.batch}; per device (MiB):")
    header = ("model devices", "shard shape", "centres", "gradient", "momentum", "XLA args", "XLA temp", "XLA peak")
    print(" | ".join(header))
    for row in rows:
        print(" | ".join([
            str(row["model_devices"]), "x".join(map(str, row["centres_shard_shape"])),
            *(f"{row[key] / MIB:,.1f}" for key in ("centres_bytes", "gradient_bytes", "momentum_bytes",
                                                   "compiled_argument_bytes", "compiled_temp_bytes",
                                                   "compiled_peak_bytes")),
        ]))
    result = {"experiment": "sharded_centres_memory", "num_classes": args.num_classes, "embed_dim": args.embed_dim,
              "feature_dim": args.feature_dim, "batch": args.batch, "jax": jax.__version__,
              "machine": platform.machine(), "cpu_count": os.cpu_count(), "load_average_1min": os.getloadavg()[0],
              "per_device": rows}
    if not args.no_run:
        run = run_on_devices(args, tx)
        result["run"] = run
        print(f"\nrun on {jax.device_count()} fake CPU devices, mesh data=1 x model=8: centres shards "
              f"{run['centres_shard_shapes']}, momentum shards {run['momentum_shard_shapes']}")
        print(f"first step (with compile) {run['first_step_s_with_compile']:.1f} s; then median "
              f"{run['step_s_median']:.2f} s/step over {args.steps}; losses {[round(x, 3) for x in run['losses']]}")
        print(f"peak RSS (all 8 devices share this process): {run['peak_rss_bytes_before_init'] / MIB:,.0f} MiB "
              f"before init, {run['peak_rss_bytes_after_init'] / MIB:,.0f} MiB after init, "
              f"{run['peak_rss_bytes_after_steps'] / MIB:,.0f} MiB after the steps")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
