"""Data worker processes and the training process's death: workers never outlive it."""

import os
import signal
import subprocess
import sys
import time

ORPHAN_SCRIPT = """
import multiprocessing, sys, time
from jaxembed import data

if __name__ == "__main__":
    batches = data.train_batches(data.load_source(None), image_size=8, batch_size=32, seed=0, workers=1)
    next(batches)
    print(*[child.pid for child in multiprocessing.active_children() if "prefetch" in child.name], flush=True)
    time.sleep(600)
"""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:  # a zombie (ended, not yet reaped by init) counts as ended
        return f.read().rsplit(")", 1)[1].split()[0] != "Z"


def test_workers_end_when_the_training_process_is_killed_outright(tmp_path):
    """kill -9 runs no clean-up in the trainer: its workers must notice and end rather than live on, orphaned."""
    script = tmp_path / "trainer.py"
    script.write_text(ORPHAN_SCRIPT)
    trainer = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    try:
        workers = [int(pid) for pid in trainer.stdout.readline().split()]
    finally:
        trainer.kill()
        trainer.wait(timeout=60)
    assert len(workers) == 1
    deadline = time.monotonic() + 20
    while any(map(_alive, workers)) and time.monotonic() < deadline:
        time.sleep(0.2)
    survivors = [pid for pid in workers if _alive(pid)]
    for pid in survivors:  # never leave them behind, even when the test fails
        os.kill(pid, signal.SIGKILL)
    assert not survivors
