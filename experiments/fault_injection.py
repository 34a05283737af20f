"""Fault injection: kill -9 the trainer at random moments and resume; train and embed through bad files.

    python experiments/fault_injection.py [--trials 10] [--seed 0] [--out experiments/results/fault_injection.json]

1. Crash and resume: a tiny inception_bn run (12 steps, a checkpoint after every step, so many kills land
   during a save) is killed with SIGKILL at a random moment, then resumed, as many times as the trial's
   kill count says; its final parameters must equal an uninterrupted run's bit for bit.
2. Bad input: a folder of real Omniglot drawings (from ../shared) plus a generated corpus of bad and odd
   files is trained on and embedded; every bad file must be named in summary.json and in the embed log,
   and every good file must be used.
3. Kill -9 then the same command, ten times in a row (issue 20): one workdir, a longer run (24 steps);
   each launch is killed at a random moment after it holds the workdir's lock (during restore, compile,
   a step or a checkpoint save: 0-3 new steps logged, then 0-1 s), and the same command is run again at once. No launch may be refused
   with a stale lock (exit 2, "in use by another writer"); each must take the lock and resume from the
   newest checkpoint; the final parameters must equal an uninterrupted run's bit for bit.
4. Readers while a run trains (issue 20): threads poll `jaxembed.load(workdir)`, `RunDir.variables()`,
   summary.json, run.json, split.json, label_map.json and metrics.jsonl in a loop while the run trains in
   three launches (`--max_steps` 8, 16, then to the end: summary.json is rewritten by each),
   checkpointing every step and deleting all but the last two; every read and every failure to read or
   parse is counted, and every variables read must equal, bit for bit, a checkpoint of the same run
   trained undisturbed (which keeps every step's).
Prints a summary table and writes JSON and a Markdown table (atomically), e.g.

    python experiments/fault_injection.py --sections in_a_row readers --out experiments/results/fault_injection_lock.json
"""

from __future__ import annotations

import argparse
import hashlib
import os
import json
import logging
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
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


# The same tiny run, twice as long (24 steps): room for ten kills in a row.
LONG_FLAGS = [*TINY_FLAGS[:TINY_FLAGS.index("--num_items_per_epoch")], "--num_items_per_epoch", "64",
              *TINY_FLAGS[TINY_FLAGS.index("--num_items_per_epoch") + 2:]]
LONG_STEPS = 24
BUSY = "in use by another writer"  # fileio.DirectoryBusy's message: a stale lock would show it


def train(workdir: str, extra: list[str] = (), kill_at_step: int | None = None, delay: float = 0.0,
          flags: list[str] = TINY_FLAGS) -> tuple[int, str]:
    """Runs the trainer; with `kill_at_step`, sends SIGKILL `delay` seconds after that step is logged.

    Returns (exit code, output); the exit code is -9 when the kill landed before the run ended.
    """
    from jaxembed import rundir

    run_dir = rundir.RunDir(workdir)
    command = [sys.executable, "-m", "jaxembed.train", *flags, "--workdir", workdir, *extra]
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


def _lock_holder(workdir: str) -> str:
    """The lock file's record ("host H pid P") of the last holder ('' before any)."""
    try:
        with open(os.path.join(workdir, ".lock")) as f:
            return f.read().strip()
    except FileNotFoundError:
        return ""


def _logged_steps(run_dir) -> int:
    return sum("loss" in record for record in run_dir.metrics())


def reference_long(root: str) -> str:
    """The uninterrupted LONG_FLAGS run (trained on first use), keeping every step's checkpoint."""
    workdir = os.path.join(root, "reference_long")
    if not os.path.exists(os.path.join(workdir, "summary.json")):
        code, output = train(workdir, ["--keep_checkpoints", "100"], flags=LONG_FLAGS)
        if code != 0:
            raise RuntimeError(f"reference run failed:\n{output[-3000:]}")
    return workdir


def _digest(variables) -> str:
    """sha256 of a variables tree's leaves, in tree order (bit for bit: any torn read changes it)."""
    import jax

    digest = hashlib.sha256()
    for leaf in jax.tree.leaves(variables):
        leaf = np.ascontiguousarray(np.asarray(leaf))
        digest.update(f"{leaf.dtype}{leaf.shape}".encode())
        digest.update(leaf.tobytes())
    return digest.hexdigest()


def kill_resume_in_a_row(kills: int, rng: random.Random, root: str) -> dict:
    """`kills` launches of the same command on one workdir, each killed with SIGKILL at a random moment
    after it took the lock, then one launch to the end; see the module's docstring (3)."""
    from jaxembed import rundir

    reference = final_params(reference_long(root))
    workdir = os.path.join(root, "in_a_row")
    run_dir = rundir.RunDir(workdir)
    command = [sys.executable, "-m", "jaxembed.train", *LONG_FLAGS, "--workdir", workdir]
    launches = []
    for launch in range(kills + 1):
        final = launch == kills
        # Kill after this launch has logged `new_steps` new steps, plus up to a second. 0: anywhere from
        # taking the lock on (restore, compile, the first step); 1: most often during the save of that
        # step's checkpoint (a step's record is written as the next step starts, while its checkpoint is
        # saved); 2-3: after one or two more checkpoints were finished, so the run makes progress.
        new_steps, delay = rng.randint(0, 3), rng.uniform(0.0, 1.0)
        log_path = os.path.join(root, f"in_a_row_{launch}.log")
        before = _logged_steps(run_dir)
        with open(log_path, "w") as log:
            started = time.perf_counter()
            process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, text=True, env=_env())
        lock_s = resumed_s = None
        killed = False
        while process.poll() is None:
            now = time.perf_counter() - started
            if lock_s is None and _lock_holder(workdir).endswith(f"pid {process.pid}"):
                lock_s = now
            if resumed_s is None and "resumed from the checkpoint at step" in _read(log_path):
                resumed_s = now
            if not final and lock_s is not None and _logged_steps(run_dir) >= before + new_steps:
                time.sleep(delay)
                process.send_signal(signal.SIGKILL)
                killed = True
                break
            time.sleep(0.01)
        code = process.wait()
        output = _read(log_path)
        resumed_from = [int(line.rsplit(" ", 1)[1]) for line in output.splitlines()
                        if "resumed from the checkpoint at step" in line]
        row = {"launch": launch, "exit_code": code, "killed": killed and code == -signal.SIGKILL,
               "kill_after_new_steps": None if final else new_steps,
               "kill_delay_s": None if final else round(delay, 3),
               "seconds_to_lock": None if lock_s is None else round(lock_s, 2),
               "seconds_to_resume": None if resumed_s is None else round(resumed_s, 2),
               "resumed_from_step": resumed_from[0] if resumed_from else None,
               "steps_logged": _logged_steps(run_dir) - before,
               "stale_lock_error": code == 2 or BUSY in output,
               "checkpoint_fallbacks": output.count("is unreadable")}
        launches.append(row)
        print(f"launch {launch}: exit {code}, lock after {row['seconds_to_lock']} s, resumed from step "
              f"{row['resumed_from_step']} after {row['seconds_to_resume']} s, {row['steps_logged']} steps logged"
              f"{', killed' if row['killed'] else ''}{', STALE LOCK' if row['stale_lock_error'] else ''}", flush=True)
        if not final and not row["killed"]:
            print(f"launch {launch} ended (exit {code}) before its kill:\n{output[-2000:]}", flush=True)
    ours = final_params(workdir)
    equal = len(ours) == len(reference) and all(
        a.dtype == b.dtype and np.array_equal(a, b) for a, b in zip(reference, ours, strict=True))
    kills_delivered = sum(row["killed"] for row in launches)
    return {"kills_requested": kills, "kills_delivered": kills_delivered,
            "launches_that_took_the_lock": sum(row["seconds_to_lock"] is not None for row in launches),
            "resumes_after_a_kill": sum(row["resumed_from_step"] is not None for row in launches[1:]),
            "stale_lock_errors": sum(row["stale_lock_error"] for row in launches),
            "final_exit_code": launches[-1]["exit_code"], "params_equal": bool(equal),
            "total_steps": LONG_STEPS, "launches": launches}


def _read(path: str) -> str:
    with open(path, errors="replace") as f:
        return f.read()


class _Counter:
    """Reads and failures of one kind of read, with the first few failures' messages."""

    def __init__(self):
        self.reads = self.failures = self.not_yet = 0
        self.errors: list[str] = []

    def fail(self, error: BaseException) -> None:
        self.failures += 1
        if len(self.errors) < 5:
            self.errors.append(f"{type(error).__name__}: {str(error)[:300]}")

    def as_dict(self) -> dict:
        return {"reads": self.reads, "failures": self.failures, "not_yet_written": self.not_yet,
                "errors": self.errors}


def _poll_files(workdir: str, stop: threading.Event, counts: dict[str, _Counter]) -> None:
    """Reads and parses the run's JSON files in a tight loop: each file once it exists must parse whole."""
    from jaxembed import rundir

    run_dir = rundir.RunDir(workdir)
    seen = set()
    while not stop.is_set():
        for name in ("summary.json", "run.json", "split.json", "label_map.json"):
            counter = counts[name]
            try:
                with open(os.path.join(workdir, name)) as f:
                    text = f.read()
            except FileNotFoundError as error:
                if name in seen:  # replaced atomically: once there, never missing
                    counter.fail(error)
                else:
                    counter.not_yet += 1
                continue
            seen.add(name)
            counter.reads += 1
            try:
                json.loads(text)
            except ValueError as error:
                counter.fail(error)
        counter = counts["metrics.jsonl"]
        try:
            with open(os.path.join(workdir, "metrics.jsonl")) as f:
                text = f.read()
        except FileNotFoundError:
            counter.not_yet += 1
        else:
            counter.reads += 1
            lines = text.split("\n")
            if lines[-1]:  # a line being appended (readers skip it; counted, not a failure)
                counts["metrics.jsonl partial last line"].reads += 1
            for line in lines[:-1]:
                try:
                    json.loads(line)
                except ValueError as error:
                    counter.fail(error)
                    break
        for kind, read in (("RunDir.summary()", run_dir.summary), ("RunDir.metrics()", run_dir.metrics)):
            try:
                value = read()
            except Exception as error:  # noqa: BLE001 - counted
                counts[kind].fail(error)
            else:
                counts[kind].reads += 1 if value else 0
                counts[kind].not_yet += 0 if value else 1
        time.sleep(0.002)


def _poll_load(workdir: str, stop: threading.Event, counts: dict[str, _Counter], seen: list) -> None:
    """`jaxembed.load(workdir)` and `RunDir(workdir).variables()` in turn, in a loop. Before the run's
    first checkpoint a FileNotFoundError is "not yet written"; after the first success any exception is
    a failure. Appends (reader, step or None, digest of the variables) to `seen`, checked afterwards."""
    import jaxembed
    from jaxembed import rundir

    loaded = False
    while not stop.is_set():
        for kind in ("jaxembed.load", "RunDir.variables()"):
            counter = counts[kind]
            try:
                if kind == "jaxembed.load":
                    variables, step = jaxembed.load(workdir).variables, None
                else:
                    variables, step = rundir.RunDir(workdir).variables()
                seen.append((kind, step, _digest(variables)))
            except FileNotFoundError as error:
                if loaded:
                    counter.fail(error)
                else:
                    counter.not_yet += 1
                    time.sleep(0.05)
            except Exception as error:  # noqa: BLE001 - counted
                counter.fail(error)
                traceback.print_exc()
            else:
                loaded = True
                counter.reads += 1


def readers_while_training(root: str) -> dict:
    """Polls the run's files and `jaxembed.load` while it trains; see the module's docstring (4)."""
    workdir = os.path.join(root, "polled")
    kinds = ["summary.json", "run.json", "split.json", "label_map.json", "metrics.jsonl",
             "metrics.jsonl partial last line", "RunDir.summary()", "RunDir.metrics()"]
    counts = {kind: _Counter() for kind in kinds}
    loads = {kind: _Counter() for kind in ("jaxembed.load", "RunDir.variables()")}
    seen = []
    reference = reference_long(root)  # first: it must not run while the polled run trains
    retried = _Counter()  # reads whose checkpoint the trainer deleted mid-read (RunDir.variables reads anew)

    class CountRetries(logging.Handler):
        def emit(self, record):
            if "was replaced while being read" in record.getMessage():
                retried.reads += 1

    rundir_log = logging.getLogger("jaxembed.rundir")
    handler, level = CountRetries(), rundir_log.level
    rundir_log.addHandler(handler)
    rundir_log.setLevel(logging.INFO)
    stop = threading.Event()
    threads = [threading.Thread(target=_poll_files, args=(workdir, stop, counts), daemon=True),
               threading.Thread(target=_poll_load, args=(workdir, stop, loads, seen), daemon=True)]
    for thread in threads:
        thread.start()
    started = time.perf_counter()
    exit_codes = []
    try:
        for max_steps in (8, 16, None):
            extra = ["--max_steps", str(max_steps)] if max_steps else []
            code, output = train(workdir, extra, flags=LONG_FLAGS)
            exit_codes.append(code)
            if code != 0:
                raise RuntimeError(f"the polled run failed (exit {code}):\n{output[-3000:]}")
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=120)
        rundir_log.removeHandler(handler)
        rundir_log.setLevel(level)
    seconds = time.perf_counter() - started
    # Every variables read must be, bit for bit, one whole checkpoint of the same run trained undisturbed
    # (RunDir.variables(): the one of the step it names; jaxembed.load: one of some step).
    from jaxembed import rundir

    expected = {step: _digest(rundir.RunDir(reference).variables(step)[0]) for step in range(1, LONG_STEPS + 1)}
    steps_of = {digest: step for step, digest in expected.items()}
    steps_read = set()
    for kind, step, digest in seen:
        if (expected.get(step) != digest) if step is not None else (digest not in steps_of):
            loads[kind].fail(ValueError(f"read variables (step {step}) equal to no checkpoint of the reference run"))
        steps_read.add(step if step is not None else steps_of.get(digest))
    reads = {kind: counter.as_dict() for kind, counter in counts.items()}
    reads.update({kind: counter.as_dict() for kind, counter in loads.items()})
    return {"training_seconds": round(seconds, 1), "launches": len(exit_codes), "exit_codes": exit_codes,
            "distinct_checkpoint_steps_read": len(steps_read - {None}),
            "variables_reads_retried_after_their_checkpoint_was_deleted": retried.reads,
            "reads": reads,
            "total_reads": sum(c["reads"] for k, c in reads.items() if k != "metrics.jsonl partial last line"),
            "total_failures": sum(c["failures"] for c in reads.values())}


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


SECTIONS = ("bad_input", "crash", "in_a_row", "readers")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS),
                        help="which parts to run (default: all)")
    parser.add_argument("--trials", type=int, default=10, help="crash: trials of 1-3 kills each")
    parser.add_argument("--kills_in_a_row", type=int, default=10, help="in_a_row: kills before the last launch")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=os.path.join(runner.REPO, "experiments", "results", "fault_injection.json"))
    args = parser.parse_args(argv)
    root = tempfile.mkdtemp(prefix="jaxembed-faults-")
    prefix = os.path.splitext(args.out)[0]
    results = {"sections": args.sections, "seed": args.seed, "complete": False}
    try:
        # After each part, the results so far are written (whole, atomically): a later failure keeps them.
        if "bad_input" in args.sections:
            results["bad_input"] = bad_input_run(root)
            runner.write_results(prefix, results)
        if "crash" in args.sections:
            results.update(crash_trials(args.trials, random.Random(args.seed), root))
            runner.write_results(prefix, results)
        if "in_a_row" in args.sections:
            results["kill_resume_in_a_row"] = kill_resume_in_a_row(args.kills_in_a_row, random.Random(args.seed),
                                                                   root)
            runner.write_results(prefix, results)
        if "readers" in args.sections:
            results["readers_while_training"] = readers_while_training(root)
        results["complete"] = True
    finally:
        shutil.rmtree(root, ignore_errors=True)
    rows = []
    if "trials" in results:
        trials = results["trials"]
        rows += [["crash trials (kill -9 at random moments, 1-3 kills each)", len(trials)],
                 ["kills delivered", sum(t["kills"] for t in trials)],
                 ["runs resumed to the end", f"{sum(t['resumed_ok'] for t in trials)} / {len(trials)}"],
                 ["final parameters bitwise equal to the uninterrupted run",
                  f"{sum(t['params_equal'] for t in trials)} / {len(trials)}"],
                 ["unreadable checkpoints fallen back from", sum(t["checkpoint_fallbacks"] for t in trials)]]
    if "bad_input" in results:
        bad = results["bad_input"]
        rows += [["bad files named in summary.json", f"{bad['bad_files_named_in_summary']} / {bad['bad_files']}"],
                 ["empty concept folder named", bad["empty_folder_named"]],
                 ["good files embedded", f"{bad['good_files_embedded']} / {bad['good_files']}"],
                 ["bad files named by the embed command",
                  f"{bad['bad_files_named_in_embed_log']} / {bad['bad_files']}"]]
    if "kill_resume_in_a_row" in results:
        row = results["kill_resume_in_a_row"]
        launches = row["launches"]
        to_lock = [r["seconds_to_lock"] for r in launches if r["seconds_to_lock"] is not None]
        rows += [["kill -9 then the same command, in a row: kills delivered",
                  f"{row['kills_delivered']} / {row['kills_requested']}"],
                 ["launches refused with a stale lock (exit 2)", f"{row['stale_lock_errors']} / {len(launches)}"],
                 ["launches that took the lock", f"{row['launches_that_took_the_lock']} / {len(launches)}"],
                 ["seconds from launch to holding the lock (min / max; imports included)",
                  f"{min(to_lock):.1f} / {max(to_lock):.1f}" if to_lock else "-"],
                 ["relaunches that resumed from a checkpoint", f"{row['resumes_after_a_kill']} / {len(launches) - 1}"],
                 ["final launch exit code", row["final_exit_code"]],
                 ["final parameters bitwise equal to the uninterrupted run", row["params_equal"]]]
    if "readers_while_training" in results:
        polled = results["readers_while_training"]
        for kind, counts in polled["reads"].items():
            if kind == "metrics.jsonl partial last line":
                rows.append(["reads that saw metrics.jsonl's last line mid-append (skipped by readers)",
                             counts["reads"]])
            else:
                rows.append([f"reader polling {kind} while training: reads / failures",
                             f"{counts['reads']} / {counts['failures']}"])
        rows.append(["polled training (3 launches, 24 steps, checkpoint every step, 2 kept), seconds",
                     polled["training_seconds"]])
        rows.append(["distinct checkpoints read while training", polled["distinct_checkpoint_steps_read"]])
        rows.append(["checkpoint reads redone because the trainer deleted that checkpoint mid-read",
                     polled["variables_reads_retried_after_their_checkpoint_was_deleted"]])
    table = "\n".join(runner.markdown_table(["check", "result"], rows))
    runner.write_results(prefix, results, table + "\n")
    print("\n" + table)


if __name__ == "__main__":
    main()
