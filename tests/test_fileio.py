"""One writer per directory (issue 20), with real processes: the OS lock of `jaxembed.fileio`, the trainer
command refused on a busy workdir, and readers that never lock; last, its other rule (whole files only).

A lock held by another *process* is what matters (the kernel's `flock` is per open file, and the
trainers the issue is about are separate processes), so every holder here is a subprocess: a few
lines of Python for the unit tests, and the real trainer command line (`tests/_lock_trainer.py`:
`python -m jaxembed.train` with the test backbone "tiny") for the trainer test. The trainers run on one
CPU device (their own XLA_FLAGS) and share the test session's compilation cache.
"""

from __future__ import annotations

import hashlib
import os
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

import jaxembed
from jaxembed import fileio, rundir

TESTS = os.path.dirname(os.path.abspath(__file__))
HOST = socket.gethostname()
# 2 epochs of 160 images in batches of 8: 40 steps, a checkpoint every 5 (seconds of training and
# evaluation after the first checkpoint; the second trainer, already started, is refused in milliseconds).
STEPS = 40
FLAGS = ["--template", "inception_bn", "--arch", "tiny", "--image_size", "32", "--batch_size", "8",
         "--num_epochs", "2", "--init_epochs", "1", "--step_epochs", "1", "--num_items_per_epoch", "160",
         "--per_item_lrate", "0.002", "--checkpoint_every", "5", "--keep_checkpoints", "2", "--log_every", "1",
         "--no_progress", "--min_crop_area", "0.7"]
TIMEOUT = 240  # for any one subprocess: generous, the machine is shared


def _env(**extra) -> dict:
    return {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1", "JAX_PLATFORMS": "cpu", **extra}


def _trainer(workdir: str, log_path: str, **env) -> subprocess.Popen:
    """The real trainer command on `workdir` in a new process: stdout piped, stderr to `log_path`."""
    with open(log_path, "w") as log:
        return subprocess.Popen([sys.executable, os.path.join(TESTS, "_lock_trainer.py"), *FLAGS, "--workdir", workdir],
                                stdout=subprocess.PIPE, stderr=log, text=True, env=_env(**env))


HOLD = """
import sys, time
from jaxembed import fileio
with fileio.exclusive_lock(sys.argv[1]):
    print("held", flush=True)
    time.sleep(600)
"""


def _holder(directory: str) -> subprocess.Popen:
    """A process holding `directory`'s lock (until killed); returns once it holds it."""
    process = subprocess.Popen([sys.executable, "-c", HOLD, directory], stdout=subprocess.PIPE, text=True, env=_env())
    assert process.stdout.readline().strip() == "held", "the holder process did not get the lock"
    return process


def _snapshot(directory: str) -> dict[str, tuple]:
    """Every file and folder under `directory`: (inode, size, mtime in ns, sha256 of the bytes)."""
    entries = {}
    for root, folders, files in os.walk(directory):
        for name in folders + files:
            path = os.path.join(root, name)
            stat = os.stat(path)
            digest = None
            if name in files:
                with open(path, "rb") as f:
                    digest = hashlib.sha256(f.read()).hexdigest()
            entries[os.path.relpath(path, directory)] = (stat.st_ino, stat.st_size, stat.st_mtime_ns, digest)
    return entries


def _lock_record(path: str) -> str | None:
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return f.read().strip()


def _stop(*processes: subprocess.Popen) -> None:
    for process in processes:
        if process.poll() is None:
            process.kill()
        process.wait()


def _leaves(workdir: str) -> tuple[list[np.ndarray], int]:
    variables, step = rundir.RunDir(workdir).variables()
    return [np.asarray(leaf) for leaf in jax.tree.leaves(variables)], step


# ----------------------------------------------------------------------------- the lock itself


def test_a_second_process_is_refused_at_once_naming_the_holder_and_writes_nothing(tmp_path):
    directory = str(tmp_path / "run")
    holder = _holder(directory)
    try:
        before = _snapshot(directory)
        started = time.perf_counter()
        with pytest.raises(fileio.DirectoryBusy) as refused:
            with fileio.exclusive_lock(directory):
                pytest.fail("got a lock another process holds")
        assert time.perf_counter() - started < 1.0  # no waiting
        message = str(refused.value)
        assert directory in message and f"host {HOST} pid {holder.pid}" in message, message
        assert "wait for it to finish, or stop that process" in message
        assert _snapshot(directory) == before  # the .lock file's bytes and time included
        assert holder.poll() is None
    finally:
        _stop(holder)


def test_the_lock_dies_with_its_holder_under_kill_9(tmp_path):
    directory = str(tmp_path / "run")
    for _ in range(3):  # kill -9 the holder, again and again: never a stale lock
        holder = _holder(directory)
        assert _lock_record(os.path.join(directory, fileio.LOCK_NAME)) == f"host {HOST} pid {holder.pid}"
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    with fileio.exclusive_lock(directory):  # at once: the kernel released the dead holder's lock
        assert _lock_record(os.path.join(directory, fileio.LOCK_NAME)) == f"host {HOST} pid {os.getpid()}"
        with pytest.raises(fileio.DirectoryBusy):  # and it is a lock again, against this process too
            with fileio.exclusive_lock(directory):
                pass
    with fileio.exclusive_lock(directory):  # released at the end of the block
        pass


# ----------------------------------------------------------------------------- trainers in real processes


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An undisturbed run of the trainer command, started in the background (`.wait()` for its workdir)."""
    root = tmp_path_factory.mktemp("reference")
    workdir = str(root / "run")
    process = _trainer(workdir, str(root / "train.log"))

    class Reference:
        def wait(self) -> str:
            process.communicate(timeout=TIMEOUT)
            assert process.returncode == 0, (root / "train.log").read_text()[-3000:]
            return workdir

    yield Reference()
    _stop(process)


def test_a_second_trainer_exits_2_at_once_and_the_first_finishes_as_if_alone(tmp_path, reference):
    workdir = str(tmp_path / "run")
    go = str(tmp_path / "go")
    first = _trainer(workdir, str(tmp_path / "first.log"))
    # The second trainer imports everything now and runs the same command when `go` appears.
    second = _trainer(workdir, str(tmp_path / "second.log"), JAXEMBED_TEST_GO=go)
    try:
        assert second.stdout.readline().strip() == "ready", (tmp_path / "second.log").read_text()[-3000:]
        lock_file, checkpoints = os.path.join(workdir, fileio.LOCK_NAME), os.path.join(workdir, "checkpoints")
        deadline = time.monotonic() + TIMEOUT
        while True:  # until the first trainer holds the lock and has saved a checkpoint
            assert first.poll() is None, "the first trainer ended before the second was ready: " + (
                tmp_path / "first.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "the first trainer did not reach its first checkpoint"
            held = _lock_record(lock_file) == f"host {HOST} pid {first.pid}"
            if held and os.path.isdir(checkpoints) and any(name.isdigit() for name in os.listdir(checkpoints)):
                break
            time.sleep(0.02)
        unchanged = {name: _snapshot(workdir)[name] for name in (".lock", "run.json", "split.json", "label_map.json")}
        open(go, "w").close()
        started, refused = time.perf_counter(), None
        while second.poll() is None and time.perf_counter() - started < TIMEOUT:
            if refused is None and "is in use by another writer" in (tmp_path / "second.log").read_text():
                refused = time.perf_counter() - started
            time.sleep(0.01)
        output, _ = second.communicate(timeout=TIMEOUT)
        exited = time.perf_counter() - started
        refused = exited if refused is None else refused  # the message came with the exit
        assert first.poll() is None, "the first trainer finished before the second was refused: lengthen the run"
        error = (tmp_path / "second.log").read_text()
        assert second.returncode == 2, error[-3000:]
        print(f"\nsecond trainer: refused {refused:.2f} s and exited 2 {exited:.2f} s after running the command")
        # At once: the lock is tried first thing, and a refused trainer skips the libraries' teardown
        # (TensorFlow's alone takes 1-10 s on a loaded two-core machine).
        assert refused < 2 and exited < 5, (refused, exited)
        assert f"{workdir} is in use by another writer (host {HOST} pid {first.pid})" in error, error[-3000:]
        assert "wait for it to finish, or stop that process, then run this command again" in error
        assert "workdir:" not in output and '"step"' not in output  # no summary: it trained nothing
        now = _snapshot(workdir)
        assert {name: now[name] for name in unchanged} == unchanged

        first.communicate(timeout=TIMEOUT)
        assert first.returncode == 0, (tmp_path / "first.log").read_text()[-3000:]
    finally:
        _stop(first, second)
    # Every step logged once, in order, by the first trainer alone (the last one may be read after the
    # loop rather than logged).
    trained = [record["step"] for record in rundir.RunDir(workdir).metrics() if "loss" in record]
    assert trained in (list(range(1, STEPS)), list(range(1, STEPS + 1))), trained
    ours, step = _leaves(workdir)
    theirs, reference_step = _leaves(reference.wait())
    assert step == reference_step == STEPS
    assert len(ours) == len(theirs)
    for a, b in zip(ours, theirs, strict=True):
        assert a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a, b)  # bit for bit


def test_readers_never_lock_nor_write(reference):
    workdir = reference.wait()
    holder = _holder(workdir)  # another process holds the workdir, as a trainer would
    try:
        before = _snapshot(workdir)
        run = rundir.RunDir(workdir)
        assert run.summary()["finished"] and run.summary()["step"] == STEPS
        assert [r["step"] for r in run.metrics() if "loss" in r][:STEPS - 1] == list(range(1, STEPS))
        assert run.config().arch == "tiny" and len(run.concepts()) == 10
        embedder = jaxembed.load(workdir)
        variables, step = run.variables()
        assert step == STEPS
        for a, b in zip(jax.tree.leaves(embedder.variables), jax.tree.leaves(variables), strict=True):
            assert np.array_equal(np.asarray(a), np.asarray(b))
        assert _snapshot(workdir) == before  # read, not written: not even the lock file was touched
        assert holder.poll() is None
        with pytest.raises(fileio.DirectoryBusy):  # the holder still holds it
            with fileio.exclusive_lock(workdir):
                pass
    finally:
        _stop(holder)


def test_a_reader_whose_checkpoint_is_deleted_while_it_reads_reads_the_newer_one(reference, tmp_path, monkeypatch):
    """The trainer keeps `keep_checkpoints`: the newest checkpoint a reader chose can be deleted while it
    reads, when the trainer saves two more. Here that happens inside the reader's first restore."""
    import shutil

    import orbax.checkpoint as ocp

    workdir = shutil.copytree(reference.wait(), str(tmp_path / "run"))
    checkpoints = os.path.join(workdir, "checkpoints")
    expected, newest = _leaves(workdir)
    restore, calls = ocp.CheckpointManager.restore, []

    def restore_while_the_trainer_moves_on(manager, step, *args, **kwargs):
        calls.append(step)
        if len(calls) == 1:  # the trainer saves a newer checkpoint and deletes this one, mid-read
            shutil.copytree(os.path.join(checkpoints, str(step)), os.path.join(checkpoints, str(step + 5)))
            shutil.rmtree(os.path.join(checkpoints, str(step)))
        return restore(manager, step, *args, **kwargs)

    monkeypatch.setattr(ocp.CheckpointManager, "restore", restore_while_the_trainer_moves_on)
    variables, step = rundir.RunDir(workdir).variables()
    assert calls == [newest, newest + 5] and step == newest + 5
    for a, b in zip(jax.tree.leaves(variables), expected, strict=True):
        assert np.array_equal(np.asarray(a), b)
    with pytest.raises(Exception):  # a step asked for by number is not replaced by another
        rundir.RunDir(workdir).variables(newest)


def test_atomic_file_keeps_the_old_file_when_its_writer_fails(tmp_path):
    """fileio's other rule, whole files only: a writer that fails part way leaves the old contents
    under the name and no temporary file; one that completes replaces them."""
    path = tmp_path / "embeddings.npz"
    path.write_bytes(b"old contents")
    with pytest.raises(RuntimeError, match="disk full"):
        with fileio.atomic_file(path) as f:
            f.write(b"half of the new")
            raise RuntimeError("disk full")
    assert path.read_bytes() == b"old contents" and os.listdir(tmp_path) == ["embeddings.npz"]
    with fileio.atomic_file(path) as f:
        f.write(b"new ")
        f.write(b"contents")
    assert path.read_bytes() == b"new contents" and os.listdir(tmp_path) == ["embeddings.npz"]
    assert os.stat(path).st_mode & 0o777 == 0o644  # readable by others, as an open(path, "w") file would be
