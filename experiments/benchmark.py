"""Training and inference speed of the three templates in JAX, next to the same models in PyTorch.

    python experiments/benchmark.py                                  # CPU, fp32, 112 and 224 px
    python experiments/benchmark.py --templates inception_bn --sizes 112 --steps 5
    python experiments/benchmark.py --backend gpu --dtype bfloat16 --sizes 224 --no_torch   # issue #6

For each template (its default backbone) and image size it measures, on one device and one fixed
batch of random images (the same pixels on both sides):

* JAX: the trainer's own jitted step (`jaxembed.train.compile_steps`: donated state, SGD with
  momentum and weight decay, the template loss) and the jitted inference forward (`eval_step`,
  the model in eval mode), each as images/s, with its compile time;
* PyTorch (eager): torchvision's resnet101 / resnext101_32x8d, or the BN-Inception port of
  `experiments/torch_reference.py`, under the same heads and losses (ArcFace on a 512-d
  embedding; a linear classifier with softmax cross-entropy, or sigmoid with `--logreg 1`), trained
  with the same SGD; inference under `torch.inference_mode` in eval mode;
* the ratio JAX / PyTorch, and each number as a percentage of the machine's matmul roof (the best
  of a large square `jnp.dot` in the same dtype at the start and at the end of the run, and the same
  matmul in PyTorch), counting the model FLOPs of the JAX step: what XLA's `cost_analysis()` gives
  for the program as written, before XLA's optimisations (`model_flops`); PyTorch is credited with
  the same FLOPs. With `--peak_tflops` (default 989 on `--backend gpu`: H100 SXM bf16 dense) also
  the MFU, the same FLOPs against that peak.

Each measurement runs in its own process: PyTorch's because torchvision segfaults in a process that
has imported TensorFlow (`jaxembed.data` does), and all of them so that one side's threads, memory
and compilation caches never touch the other's. Both sides use the same number of CPU threads: by
default every CPU this process may run on (what XLA uses); `--threads N` pins both to N CPUs.
Times are medians of `--steps` individually timed steps after `--warmup` untimed ones. Progress goes
to stderr; the table and the JSON go to `--out`.md / .json (default experiments/results/benchmark).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time

import numpy as np
import runner  # experiments/runner.py: this script's folder is on sys.path (imports no TensorFlow)

HERE = os.path.dirname(os.path.abspath(__file__))
TEMPLATES = ("resnet_angular_margin", "inception_bn", "resnext")
RESULT_PREFIX = "BENCHMARK_RESULT "  # the worker's JSON line on stdout


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--templates", nargs="+", choices=TEMPLATES, default=list(TEMPLATES))
    parser.add_argument("--sizes", nargs="+", type=int, default=[112, 224], help="image sizes in pixels")
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per measurement (median kept)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps before them")
    parser.add_argument("--num_classes", type=int, default=1000, help="classes (ArcFace centres, classifier width)")
    parser.add_argument("--logreg", type=int, choices=(0, 1), default=0,
                        help="classifier templates: 0 softmax cross-entropy, 1 sigmoid (the template default)")
    parser.add_argument("--backend", choices=("cpu", "gpu"), default="cpu")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                        help="computation dtype (parameters stay float32; PyTorch uses autocast)")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads for both sides (default: every CPU this process may run on)")
    parser.add_argument("--no_torch", action="store_true", help="skip the PyTorch side")
    parser.add_argument("--conv_impl", choices=("auto", "native", "cpu"), default="auto",
                        help="how JAX computes convolutions (jaxembed.models.conv_forms); 'native' is XLA's "
                             "convolutions throughout, what jaxembed did before its CPU forms")
    parser.add_argument("--torch_channels_last", action=argparse.BooleanOptionalAction, default=None,
                        help="PyTorch in channels_last memory format (default: on GPU only)")
    parser.add_argument("--peak_tflops", type=float, default=None,
                        help="peak TFLOP/s for the MFU (default: 989 on --backend gpu, H100 SXM bf16 dense; "
                             "none on cpu)")
    parser.add_argument("--roof_size", type=int, default=None,
                        help="side of the square matmul measuring the roof (default: 2048 on cpu, 8192 on gpu)")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds allowed to each measuring process")
    parser.add_argument("--out", default=os.path.join(HERE, "results", "benchmark"),
                        help="writes OUT.md and OUT.json")
    parser.add_argument("--_worker", choices=("jax", "torch", "jax_roof", "torch_roof"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.peak_tflops is None and args.backend == "gpu":
        args.peak_tflops = 989.0
    if args.roof_size is None:
        args.roof_size = 8192 if args.backend == "gpu" else 2048
    if args.torch_channels_last is None:
        args.torch_channels_last = args.backend == "gpu"
    if min(args.steps, args.batch_size, args.num_classes) < 1 or args.warmup < 0:
        parser.error("--steps, --batch_size and --num_classes must be >= 1 and --warmup >= 0")
    return args


# ----------------------------------------------------------------------------- shared by both sides


def make_batch(batch_size: int, image_size: int, num_classes: int) -> dict[str, np.ndarray]:
    """The fixed batch: uint8 NHWC images (random, seed 0), labels 0, 1, ... and their one-hot rows."""
    images = np.random.default_rng(0).integers(0, 256, (batch_size, image_size, image_size, 3), dtype=np.uint8)
    label = (np.arange(batch_size) % num_classes).astype(np.int32)
    return {"image": images, "label": label, "labels": np.eye(num_classes, dtype=np.float32)[label]}


def template_config(name: str, args: argparse.Namespace, image_size: int):
    """The template's validated config at this size, batch and dtype (jaxembed.templates imports no TensorFlow)."""
    from jaxembed import templates

    template = templates.get(name)
    overrides = {"image_size": image_size, "batch_size": args.batch_size, "dtype": args.dtype, "progress": False}
    if "logreg" in template.hparams:
        overrides["logreg"] = args.logreg
    return template.config(**overrides)


def pin_threads(threads: int) -> None:
    """Runs this process on the first `threads` of its CPUs (XLA sizes its thread pool by them)."""
    cpus = sorted(os.sched_getaffinity(0))
    if threads < len(cpus):
        os.sched_setaffinity(0, cpus[:threads])


# ----------------------------------------------------------------------------- JAX side


def jax_worker(args: argparse.Namespace) -> dict:
    """The trainer's step and the inference forward of one template and size, timed in JAX."""
    import flax
    import jax
    import jaxlib

    jax.config.update("jax_enable_compilation_cache", False)  # compile times are real compilations
    from jaxembed import data as data_lib
    from jaxembed import parallel, schedules, tasks, train

    config = template_config(args.templates[0], args, args.sizes[0])
    schedule = schedules.learning_rate_schedule(
        batch_size=config.batch_size, per_item_lrate=config.per_item_lrate, init_epochs=config.init_epochs,
        step_epochs=config.step_epochs, num_epochs=config.num_epochs, items_per_epoch=1000 * config.batch_size)
    model = tasks.build_model(config, args.num_classes)
    # The head holds the backbone; only how its convolutions are computed changes (same parameters).
    model = model.clone(backbone=model.backbone.clone(conv_impl=args.conv_impl))
    # No images are loaded: the run's data only name its classes (what `Run.num_classes` counts).
    classes = data_lib.LabelledImages(items=(), labels=(), item_names=(),
                                      concepts=tuple(f"class{i:07d}" for i in range(args.num_classes)))
    run = train.Run(config=config, task=tasks.for_config(config), data=classes, train_data=classes,
                    eval_data=classes, heldout=np.zeros(0, np.int64), mesh=parallel.make_mesh(jax.local_devices()[:1]),
                    model=model, tx=train.build_optimizer(schedule, config), schedule=schedule,
                    steps_per_epoch=1000, total_steps=30_000)
    init, step, evaluate_batch = train.compile_steps(run)  # exactly the trainer's jits
    mesh = run.mesh  # one device

    state = init(jax.random.PRNGKey(0))
    batch = jax.device_put(make_batch(args.batch_size, config.image_size, args.num_classes),
                           parallel.batch_sharded(mesh))

    start = time.perf_counter()
    train_lowered = step.lower(state, batch)
    train_compiled = train_lowered.compile()
    train_compile_s = time.perf_counter() - start

    def train_once():
        nonlocal state
        state, metrics = train_compiled(state, batch)  # the state is donated, as in training
        jax.block_until_ready((state, metrics))
        return metrics

    train_times = runner.timed(train_once, args.steps, args.warmup)
    loss = float(train_once()["loss"])

    variables = state.variables
    start = time.perf_counter()
    infer_lowered = evaluate_batch.lower(variables, batch["image"])
    infer_compiled = infer_lowered.compile()
    infer_compile_s = time.perf_counter() - start
    infer_times = runner.timed(lambda: jax.block_until_ready(infer_compiled(variables, batch["image"])),
                               args.steps, args.warmup)
    device = jax.local_devices()[0]
    return {
        "arch": config.arch, "loss": loss, "device": getattr(device, "device_kind", str(device)),
        "train_step_s": train_times, "train_compile_s": train_compile_s,
        "infer_step_s": infer_times, "infer_compile_s": infer_compile_s,
        "train_flops": model_flops(train_lowered, train_compiled),
        "train_flops_compiled": flops_of(train_compiled),
        "infer_flops": model_flops(infer_lowered, infer_compiled),
        "infer_flops_compiled": flops_of(infer_compiled),
        "versions": {"jax": jax.__version__, "jaxlib": jaxlib.__version__, "flax": flax.__version__,
                     "backend": jax.default_backend()},
    }


def model_flops(lowered, compiled) -> float | None:
    """The FLOPs of the program as written (`lowered`), what MFU counts; the `compiled` program's only
    when the lowered one has no cost analysis.

    Not the compiled count first: on GPU, XLA turns convolutions into cuDNN custom calls, which its
    cost analysis of the compiled program does not count (an H200 run credited BN-Inception training
    at 224 px with 0.27 GFLOP per image, about a twentieth of its convolutions); the lowered program
    still holds XLA convolutions, which the analysis counts (tests/test_benchmark.py checks one against
    the textbook count on CPU; not yet rerun on a GPU). On CPU the two counts of the committed rows
    differ by 0-6%, the compiled one higher."""
    return flops_of(lowered) or flops_of(compiled)


def flops_of(stage) -> float | None:
    """The FLOPs of one call of a lowered or compiled JAX function as XLA's cost analysis counts them."""
    analysis = stage.cost_analysis()
    if isinstance(analysis, (list, tuple)):  # older JAX: one dict per device program
        analysis = analysis[0] if analysis else None
    return float(analysis["flops"]) if analysis and analysis.get("flops") else None


def jax_roof_worker(args: argparse.Namespace) -> dict:
    """GFLOP/s of a large square `jnp.dot` in the benchmark dtype, best of 5."""
    import jax
    import jax.numpy as jnp

    n, dtype = args.roof_size, jnp.dtype(args.dtype)
    a = jax.random.normal(jax.random.PRNGKey(0), (n, n), dtype)
    b = jax.random.normal(jax.random.PRNGKey(1), (n, n), dtype)
    dot = jax.jit(jnp.dot)
    times = runner.timed(lambda: dot(a, b).block_until_ready(), 5, 1)
    return {"gflops": 2 * n**3 / min(times) / 1e9, "size": n, "dtype": args.dtype,
            "device": getattr(jax.devices()[0], "device_kind", "")}


# ----------------------------------------------------------------------------- PyTorch side


def torch_worker(args: argparse.Namespace) -> dict:
    """The same template model, one SGD step and the inference forward, timed in eager PyTorch."""
    import torch

    import torch_reference as reference  # this directory is on sys.path: this file runs as a script

    config = template_config(args.templates[0], args, args.sizes[0])
    device = torch.device("cuda" if args.backend == "gpu" else "cpu")
    memory_format = torch.channels_last if args.torch_channels_last else torch.contiguous_format
    head = config.template.head
    torch.manual_seed(0)
    model = reference.template_model(head, config.arch, args.num_classes,
                                     embeddings_size=config.get("embeddings_size", 512))
    model = model.to(device, memory_format=memory_format)
    loss_fn = reference.template_loss(head, logreg=config.get("logreg", 0),
                                      angular_scale=config.get("angular_scale", 64),
                                      angular_margin=config.get("angular_margin", 0.5))
    optimizer = reference.sgd(model, learning_rate=config.learning_rate)

    numpy_batch = make_batch(args.batch_size, config.image_size, args.num_classes)
    batch = {
        "image": torch.from_numpy(numpy_batch["image"]).permute(0, 3, 1, 2).to(device).contiguous(
            memory_format=memory_format),
        "label": torch.from_numpy(numpy_batch["label"]).long().to(device),
        "labels": torch.from_numpy(numpy_batch["labels"]).to(device),
    }

    def autocast():
        return torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.dtype == "bfloat16")

    synchronize = torch.cuda.synchronize if device.type == "cuda" else lambda: None
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True

    def train_once():
        optimizer.zero_grad(set_to_none=True)
        with autocast():
            loss = loss_fn(model, model(batch["image"]), batch)
        loss.backward()
        optimizer.step()
        synchronize()
        return loss

    model.train()
    train_times = runner.timed(train_once, args.steps, args.warmup)
    loss = float(train_once().detach())

    model.eval()

    def infer_once():
        with torch.inference_mode(), autocast():
            model(batch["image"])
        synchronize()

    infer_times = runner.timed(infer_once, args.steps, args.warmup)
    return {"arch": config.arch, "loss": loss, "train_step_s": train_times, "infer_step_s": infer_times,
            "threads": torch.get_num_threads(), "channels_last": args.torch_channels_last,
            "versions": {"torch": torch.__version__}}


def torch_roof_worker(args: argparse.Namespace) -> dict:
    """GFLOP/s of the same square matmul in PyTorch, best of 5."""
    import torch

    device = "cuda" if args.backend == "gpu" else "cpu"
    n, dtype = args.roof_size, getattr(torch, args.dtype)
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    synchronize = torch.cuda.synchronize if device == "cuda" else lambda: None
    times = runner.timed(lambda: (a @ b, synchronize()), 5, 1)
    return {"gflops": 2 * n**3 / min(times) / 1e9, "size": n, "dtype": args.dtype}


WORKERS = {"jax": jax_worker, "jax_roof": jax_roof_worker, "torch": torch_worker, "torch_roof": torch_roof_worker}


def worker_main(args: argparse.Namespace) -> None:
    threads = args.threads or len(os.sched_getaffinity(0))
    pin_threads(threads)
    if args._worker.startswith("torch"):
        import torch

        torch.set_num_threads(threads)
    result = WORKERS[args._worker](args)
    print(RESULT_PREFIX + json.dumps(result), flush=True)


# ----------------------------------------------------------------------------- the driver


def run_worker(kind: str, args: argparse.Namespace, template: str = TEMPLATES[0], size: int = 32) -> dict:
    """Runs one measurement in a fresh interpreter; its result, or {"error": ...}."""
    flags = ["--templates", template, "--sizes", str(size), "--batch_size", str(args.batch_size),
             "--steps", str(args.steps), "--warmup", str(args.warmup), "--num_classes", str(args.num_classes),
             "--logreg", str(args.logreg), "--backend", args.backend, "--dtype", args.dtype,
             "--roof_size", str(args.roof_size), "--conv_impl", args.conv_impl,
             "--torch_channels_last" if args.torch_channels_last else "--no-torch_channels_last"]
    if args.threads:
        flags += ["--threads", str(args.threads)]
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL=os.environ.get("TF_CPP_MIN_LOG_LEVEL", "2"))
    if args.backend == "cpu":
        env["JAX_PLATFORMS"] = "cpu"
    command = [sys.executable, os.path.abspath(__file__), "--_worker", kind, *flags]
    try:
        # stderr passes through: compiler warnings and errors show up where they happen.
        done = subprocess.run(command, stdout=subprocess.PIPE, text=True, env=env, timeout=args.timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {args.timeout:g} s"}
    lines = [line for line in done.stdout.splitlines() if line.startswith(RESULT_PREFIX)]
    if done.returncode != 0 or not lines:
        return {"error": f"exit status {done.returncode}"}
    return json.loads(lines[-1][len(RESULT_PREFIX):])


def summarise(side: dict, batch_size: int, roof_gflops: float, peak_tflops: float | None,
              flops: dict[str, float]) -> dict:
    """images/s, achieved GFLOP/s, % of roof and MFU of one side, from its step times."""
    summary = {}
    for phase in ("train", "infer"):
        seconds = statistics.median(side[f"{phase}_step_s"])
        achieved = flops[phase] / seconds / 1e9
        summary[phase] = {"images_per_s": batch_size / seconds, "step_s": seconds, "gflops": achieved,
                          "pct_roof": 100 * achieved / roof_gflops}
        if peak_tflops:
            summary[phase]["mfu_pct"] = 100 * achieved / (peak_tflops * 1e3)
    return summary


def add_summaries(rows: list[dict], roof_gflops: float, batch_size: int, peak_tflops: float | None) -> None:
    """Adds to each row's sides their images/s, GFLOP/s, % of roof (and MFU), and the JAX/PyTorch ratios.

    Both sides are credited with the FLOPs of the compiled JAX step (`train_flops`, `infer_flops`).
    """
    for row in rows:
        jax_side, torch_side = row["jax"], row.get("torch", {})
        if "error" in jax_side:
            continue
        flops = {"train": jax_side["train_flops"], "infer": jax_side["infer_flops"]}
        jax_side["train_gflop_per_image"] = flops["train"] / batch_size / 1e9
        jax_side["infer_gflop_per_image"] = flops["infer"] / batch_size / 1e9
        jax_side.update(summarise(jax_side, batch_size, roof_gflops, peak_tflops, flops))
        if torch_side and "error" not in torch_side:
            torch_side.update(summarise(torch_side, batch_size, roof_gflops, peak_tflops, flops))
            row["ratio"] = {phase: jax_side[phase]["images_per_s"] / torch_side[phase]["images_per_s"]
                            for phase in ("train", "infer")}


def machine_info(args: argparse.Namespace) -> dict:
    model = platform.processor()
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            model = next((line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")), model)
    except OSError:
        pass
    try:
        # "-dirty" when the tree that ran differs from the commit (a copy synced to another machine
        # may carry an older .git than its files).
        commit = subprocess.run(["git", "describe", "--always", "--dirty", "--abbrev=7"], cwd=HERE,
                                capture_output=True, text=True).stdout.strip() or None
    except OSError:
        commit = None
    return {"cpu": model, "cpu_count": os.cpu_count(), "cpus_usable": len(os.sched_getaffinity(0)),
            "threads": args.threads or len(os.sched_getaffinity(0)), "platform": platform.platform(),
            "python": platform.python_version(), "git_commit": commit,
            "load_average_at_start": os.getloadavg()[0]}


def fmt(value, digits: int = 1) -> str:
    return runner.number(value, digits)


def markdown(report: dict) -> str:
    machine, args = report["machine"], report["settings"]
    mfu = args["peak_tflops"] is not None
    roof = report["roof"]
    lines = [
        f"# Benchmark: images/s of the templates, JAX vs PyTorch ({args['backend']}, {args['dtype']}, "
        f"batch {args['batch_size']})",
        "",
        f"Command: `{report['command']}`",
        "",
        f"Machine: {machine.get('device') or machine['cpu']}; CPU {machine['cpu']}, {machine['cpus_usable']} usable "
        f"of {machine['cpu_count']} CPUs, {machine['threads']} threads per side; "
        + ", ".join(f"{k} {v}" for k, v in machine["versions"].items() if v)
        + f"; git {machine['git_commit']}; load average {fmt(machine['load_average_at_start'], 2)} at the start, "
        f"{fmt(machine.get('load_average_at_end'), 2)} at the end.",
        "",
        f"Roof: {fmt(roof['gflops'])} GFLOP/s, the best {roof['size']}x{roof['size']} {roof['dtype']} matmul "
        f"(`jnp.dot` at the start {fmt(roof['jax_start'])}, at the end {fmt(roof['jax_end'])}; PyTorch "
        f"{fmt(roof.get('torch'))})." + (f" MFU against {args['peak_tflops']:g} TFLOP/s." if mfu else ""),
        "FLOPs: XLA's cost analysis of the compiled JAX step, credited to both sides. Times: median of "
        f"{args['steps']} steps after {args['warmup']} warm-up.",
        "",
    ]
    pct = "% MFU" if mfu else "% roof"
    header = ["template", "arch", "px", "JAX train img/s", pct, "PyTorch train img/s", pct, "JAX/PyTorch train",
              "JAX infer img/s", pct, "PyTorch infer img/s", pct, "JAX/PyTorch infer",
              "JAX compile train / infer (s)", "GFLOP/img train / infer"]
    key = "mfu_pct" if mfu else "pct_roof"
    rows = []
    for row in report["rows"]:
        jax_side, torch_side = row.get("jax", {}), row.get("torch", {})
        cells = [row["template"], row["arch"], str(row["image_size"])]
        for phase in ("train", "infer"):
            j, t = jax_side.get(phase, {}), torch_side.get(phase, {})
            cells += [fmt(j.get("images_per_s")) if j else jax_side.get("error", "-"), fmt(j.get(key)),
                      fmt(t.get("images_per_s")) if t else torch_side.get("error", "-"), fmt(t.get(key)),
                      fmt(row.get("ratio", {}).get(phase), 2)]
        cells += [f"{fmt(jax_side.get('train_compile_s'))} / {fmt(jax_side.get('infer_compile_s'))}",
                  f"{fmt(jax_side.get('train_gflop_per_image'), 2)} / {fmt(jax_side.get('infer_gflop_per_image'), 2)}"]
        rows.append(cells)
    lines += runner.markdown_table(header, rows)
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args._worker:
        worker_main(args)
        return 0
    for name in args.templates:  # refuse bad sizes and batch sizes before measuring anything
        for size in args.sizes:
            try:
                template_config(name, args, size)
            except ValueError as error:
                print(f"benchmark: error: {error}", file=sys.stderr)
                return 2

    def progress(message: str) -> None:
        print(f"[benchmark {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)

    machine = machine_info(args)
    if machine["load_average_at_start"] > 0.5 * machine["cpus_usable"] and args.backend == "cpu":
        progress(f"warning: load average {machine['load_average_at_start']:.1f} on {machine['cpus_usable']} CPUs: "
                 "other work will slow both sides down, PyTorch's OpenMP threads most")
    progress(f"roof: {args.roof_size}^2 {args.dtype} matmul")
    jax_roof_start = run_worker("jax_roof", args)
    torch_roof = {} if args.no_torch else run_worker("torch_roof", args)
    rows, versions = [], {}
    configs = [(name, size) for name in args.templates for size in args.sizes]
    for index, (name, size) in enumerate(configs, 1):
        row = {"template": name, "arch": template_config(name, args, size).arch, "image_size": size}
        for side in ("jax",) if args.no_torch else ("jax", "torch"):
            progress(f"[{index}/{len(configs)}] {name} {row['arch']} {size} px: {side} ...")
            start = time.perf_counter()
            result = row[side] = run_worker(side, args, name, size)
            result["wall_s"] = time.perf_counter() - start
            versions.update(result.pop("versions", {}))
            progress(f"[{index}/{len(configs)}] {name} {size} px: {side} " + (
                result["error"] if "error" in result else
                f"train {args.batch_size / statistics.median(result['train_step_s']):.1f} img/s, "
                f"infer {args.batch_size / statistics.median(result['infer_step_s']):.1f} img/s"
                f" ({result['wall_s']:.0f} s)"))
        rows.append(row)
    jax_roof_end = run_worker("jax_roof", args)
    machine["load_average_at_end"] = os.getloadavg()[0]
    if args.backend == "gpu":
        machine["device"] = jax_roof_start.get("device")
    machine["versions"] = versions

    # The machine's roof, whichever library reaches it (PyTorch's CPU matmul is often the faster one).
    roofs = [r["gflops"] for r in (jax_roof_start, jax_roof_end, torch_roof) if "gflops" in r]
    roof = {"gflops": max(roofs) if roofs else float("nan"), "size": args.roof_size, "dtype": args.dtype,
            "jax_start": jax_roof_start.get("gflops"), "jax_end": jax_roof_end.get("gflops"),
            "torch": torch_roof.get("gflops")}
    add_summaries(rows, roof["gflops"], args.batch_size, args.peak_tflops)

    report = {
        "command": shlex.join(["python", os.path.relpath(os.path.abspath(__file__)), *argv]),
        "settings": {k: v for k, v in vars(args).items() if not k.startswith("_") and k != "out"},
        "machine": machine, "roof": roof, "rows": rows,
    }
    table = markdown(report)
    runner.write_results(args.out, report, table)
    print(table)
    print(f"wrote {args.out}.md and {args.out}.json", file=sys.stderr)
    failed = [f"{row['template']} {row['image_size']} px {side}" for row in rows for side in ("jax", "torch")
              if "error" in row.get(side, {})]
    if failed:
        print(f"benchmark: failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
