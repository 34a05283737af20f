"""Fault injection: kill -9 the trainer at random moments and resume; train and embed through bad files.

    python experiments/fault_injection.py [--trials 10] [--seed 0] [--out experiments/results/fault_injection.json]

1. Crash and resume: a tiny inception_bn run (12 steps, a checkpoint after every step, so many kills land
   during a save) is killed with SIGKILL at a random moment, then resumed, as many times as the trial's
   kill count says; its final parameters must equal an uninterrupted run's bit for bit.
2. Bad input: a folder of real Omniglot drawings (from ../shared) plus a generated corpus of bad and odd
   files is trained on and embedded; every bad file must be named in summary.json and in the embed log,
   and every good file must be used.
Prints a summary table and writes JSON.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import zipfile

import numpy as np
import runner  # experiments/runner.py: this script's folder is on sys.path

OMNIGLOT = os.path.join(runner.REPO, "..", "shared", "datasets", "omniglot", "images_background_small1.zip")
TINY_FLAGS = ["--template", "inception_bn", "--image_size", "32", "--batch_size", "8", "--num_epochs", "3",
              "--init_epochs", "1", "--step_epochs", "1", "--num_items_per_epoch", "32", "--per_item_lrate", "0.002",
              "--checkpoint_every", "1", "--keep_checkpoints", "2", "--log_every", "1", "--no_progress"]
TOTAL_STEPS = 12  # 3 epochs of 32 images in batches of 8


def _env() -> dict:
    env = dict(os.environ)
    env.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(tempfile.gettempdir(), "jaxembed-xla-cache"))
    env.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    return env


def train(workdir: str, extra: list[str] = (), kill_at_step: int | None = None, delay: float = 0.0) -> tuple[int, str]:
    """Runs the trainer; with `kill_at_step`, sends SIGKILL `delay` seconds after that step is logged.

    Returns (exit code, output); the exit code is -9 when the kill landed before the run ended.
    """
    from jaxembed import rundir

    run_dir = rundir.RunDir(workdir)
    command = [sys.executable, "-m", "jaxembed.train", *TINY_FLAGS, "--workdir", workdir, *extra]
    with tempfile.TemporaryFile("w+") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, text=True, env=_env())
        if kill_at_step is not None:
            while process.poll() is None:
                if _last_step(run_dir) >= kill_at_step:
                    time.sleep(delay)  # lands anywhere in the following steps, checkpoint saves included
                    process.send_signal(signal.SIGKILL)
                    break
                time.sleep(0.01)
        process.wait()
        log.seek(0)
        return process.returncode, log.read()


def _last_step(run_dir) -> int:
    """The last step logged to metrics.jsonl so far (0 before the first; a line being written is skipped)."""
    records = run_dir.metrics()
    return records[-1]["step"] if records else 0


def final_params(workdir: str) -> list[np.ndarray]:
    """The newest checkpoint's parameters and batch statistics, as NumPy arrays."""
    import jax

    from jaxembed import rundir

    variables, _ = rundir.RunDir(workdir).variables()
    return [np.asarray(x) for x in jax.tree.leaves(variables)]


def crash_trials(trials: int, rng: random.Random, root: str) -> dict:
    reference_dir = os.path.join(root, "reference")
    code, output = train(reference_dir)
    if code != 0:
        raise RuntimeError(f"reference run failed:\n{output[-3000:]}")
    reference = final_params(reference_dir)
    rows = []
    for trial in range(trials):
        workdir = os.path.join(root, f"trial{trial}")
        killed_at = []
        for _ in range(rng.randint(1, 3)):
            step, delay = rng.randint(1, TOTAL_STEPS - 1), rng.uniform(0.0, 1.0)
            code, output = train(workdir, kill_at_step=step, delay=delay)
            if code == -signal.SIGKILL:
                killed_at.append(f"step {step} + {delay:.2f} s")
        code, output = train(workdir)  # resume to the end
        equal = code == 0 and all(np.array_equal(a, b) for a, b in zip(reference, final_params(workdir), strict=True))
        fallbacks = output.count("is unreadable")
        rows.append({"trial": trial, "kills": len(killed_at), "killed_at": killed_at, "resumed_ok": code == 0,
                     "params_equal": bool(equal), "checkpoint_fallbacks": fallbacks})
        print(f"trial {trial}: killed at {killed_at}, resumed {'ok' if code == 0 else 'FAILED'}, "
              f"params {'equal' if equal else 'DIFFERENT'}", flush=True)
    return {"trials": rows}


def bad_corpus(folder: str) -> dict[str, str]:
    """Writes bad and odd files into concept folders; returns {relative path: 'bad' or 'good'}."""
    from PIL import Image

    kinds = {}

    def put(relative, payload, kind):
        path = os.path.join(folder, relative)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        if isinstance(payload, Image.Image):
            payload.save(path)
        else:
            with open(path, "wb") as f:
                f.write(payload)
        kinds[relative] = kind

    gray = Image.fromarray(np.random.default_rng(0).integers(0, 255, (60, 80), np.uint8))
    import io

    buffer = io.BytesIO()
    gray.convert("RGB").save(buffer, "JPEG")
    jpeg = buffer.getvalue()
    buffer = io.BytesIO()
    gray.save(buffer, "PNG")
    png = buffer.getvalue()
    odd = "Odd concept ü/"
    put(odd + "corrupt.jpg", jpeg[:20] + b"\x00" * 200 + jpeg[220:], "bad")
    put(odd + "truncated.png", png[: len(png) // 2], "bad")
    put(odd + "zero.jpg", b"", "bad")
    put(odd + "text.jpg", b"this is not an image\n", "bad")
    put(odd + "gray ü.png", gray, "good")
    put(odd + "rgba.png", gray.convert("RGBA"), "good")
    put(odd + "palette.png", gray.convert("P"), "good")
    put(odd + "cmyk.jpg", gray.convert("CMYK"), "good")
    put(odd + "sixteen.png", Image.fromarray((np.asarray(gray).astype(np.uint16) * 257)), "good")
    put(odd + "tiny.png", Image.new("RGB", (1, 1), (10, 200, 30)), "good")
    put(odd + "large.jpg", gray.resize((4000, 3000)), "good")
    put(odd + "duplicate.jpg", jpeg, "good")
    put(odd + "duplicate copy.jpg", jpeg, "good")
    os.makedirs(os.path.join(folder, "empty concept"), exist_ok=True)
    return kinds


def bad_input_run(root: str) -> dict:
    folder = os.path.join(root, "images")
    with zipfile.ZipFile(OMNIGLOT) as archive:
        names = [n for n in archive.namelist() if n.endswith(".png") and "/Balinese/character0" in n]
        for name in names[:60]:
            target = os.path.join(folder, os.path.relpath(name, "images_background_small1"))
            os.makedirs(os.path.dirname(target), exist_ok=True)
            with open(target, "wb") as f:
                f.write(archive.read(name))
    kinds = bad_corpus(folder)
    good_total = sum(1 for _, _, files in os.walk(folder) for _ in files) - sum(k == "bad" for k in kinds.values())
    workdir = os.path.join(root, "run")
    code, output = train(workdir, ["--data", folder, "--num_epochs", "1", "--holdout_fraction", "0.2"])
    if code != 0:
        raise RuntimeError(f"training on the bad corpus failed:\n{output[-3000:]}")
    from jaxembed import rundir

    summary = rundir.RunDir(workdir).summary()
    named = {os.path.relpath(b["path"], folder) for b in summary["bad_files"]}
    bad = {path for path, kind in kinds.items() if kind == "bad"}
    embed_out = os.path.join(root, "embeddings.npz")
    embed = subprocess.run([sys.executable, "-m", "jaxembed.embed", "--workdir", workdir, "--images", folder,
                            "--out", embed_out], capture_output=True, text=True, env=_env())
    embedded = np.load(embed_out)["paths"] if embed.returncode == 0 else []
    return {
        "train_exit_code": code, "bad_files": len(bad), "bad_files_named_in_summary": len(bad & named),
        "empty_folder_named": any("empty concept" in p for p in named),
        "good_files": good_total, "good_files_embedded": len(embedded),
        "embed_exit_code": embed.returncode,
        "bad_files_named_in_embed_log": sum(os.path.basename(p) in embed.stderr for p in bad),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=os.path.join(runner.REPO, "experiments", "results", "fault_injection.json"))
    args = parser.parse_args(argv)
    root = tempfile.mkdtemp(prefix="jaxembed-faults-")
    try:
        results = {"bad_input": bad_input_run(root), **crash_trials(args.trials, random.Random(args.seed), root)}
    finally:
        shutil.rmtree(root, ignore_errors=True)
    runner.write_results(os.path.splitext(args.out)[0], results)
    trials, bad = results["trials"], results["bad_input"]
    table = runner.markdown_table(["check", "result"], [
        ["crash trials (kill -9 at random moments, 1-3 kills each)", len(trials)],
        ["kills delivered", sum(t["kills"] for t in trials)],
        ["runs resumed to the end", f"{sum(t['resumed_ok'] for t in trials)} / {len(trials)}"],
        ["final parameters bitwise equal to the uninterrupted run",
         f"{sum(t['params_equal'] for t in trials)} / {len(trials)}"],
        ["unreadable checkpoints fallen back from", sum(t["checkpoint_fallbacks"] for t in trials)],
        ["bad files named in summary.json", f"{bad['bad_files_named_in_summary']} / {bad['bad_files']}"],
        ["empty concept folder named", bad["empty_folder_named"]],
        ["good files embedded", f"{bad['good_files_embedded']} / {bad['good_files']}"],
        ["bad files named by the embed command", f"{bad['bad_files_named_in_embed_log']} / {bad['bad_files']}"]])
    print("\n" + "\n".join(table))


if __name__ == "__main__":
    main()
