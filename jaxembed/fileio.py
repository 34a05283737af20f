"""Safe files in a directory that one process writes and any number read.

Two rules, owned here for every directory jaxembed writes (run directories, search indexes):

- **One writer.** `exclusive_lock(directory)` takes an OS-level lock (`fcntl.flock`) on
  `directory/.lock`. The kernel drops it when the holding process dies, however it dies (kill -9
  included), so a crash never leaves a stale lock to clean by hand. The lock file records the
  holder's host and pid, for the message a second writer gets (`DirectoryBusy`).
- **Whole files only.** `write_json`, `write_bytes` and `atomic_file` write to a temporary name in
  the same directory and `os.replace` it onto the target (atomic on POSIX): a reader sees the old
  file or the new one, never half of one. `append_jsonl` appends one line per record with one `write`
  call, so a reader sees whole lines (it skips a last line cut short by a crash).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import tempfile
from collections.abc import Iterator
from typing import Any, BinaryIO

LOCK_NAME = ".lock"


class DirectoryBusy(RuntimeError):
    """Another live process holds the directory's write lock. Command-line tools exit with status 2."""

    def __init__(self, directory: str, holder: str):
        self.directory, self.holder = directory, holder
        super().__init__(
            f"{directory} is in use by another writer ({holder}); wait for it to finish, or stop that "
            "process, then run this command again")


@contextlib.contextmanager
def exclusive_lock(directory: str) -> Iterator[None]:
    """Holds the write lock of `directory` (created if missing) for the `with` block.

    Raises:
      DirectoryBusy: at once (no waiting) when another process holds it, naming its host and pid.
    """
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, LOCK_NAME)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lines = os.pread(fd, 512, 0).decode(errors="replace").splitlines()
            holder = (lines[0].strip() if lines else "") or "an unknown process"
            raise DirectoryBusy(os.path.abspath(directory), holder) from None
        # The record is written before the file is cut to its length, never after emptying it: a second
        # writer reading it meanwhile finds this holder on the first line (not an empty file).
        record = f"host {socket.gethostname()} pid {os.getpid()}\n".encode()
        os.pwrite(fd, record, 0)
        os.ftruncate(fd, len(record))
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[BinaryIO]:
    """A binary file to write that appears under `path` only once the `with` block completes.

    For large outputs written in pieces (`np.savez` of many embeddings) that should not be built in
    memory first; an exception inside the block leaves `path` as it was and no temporary file behind.
    """
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o644)  # mkstemp's 0600 would hide a run's files from other users
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Writes `data` to `path` atomically: readers never see a partly written file."""
    with atomic_file(path) as f:
        f.write(data)


def write_json(path: str | os.PathLike, value: Any) -> None:
    """`value` as indented JSON, written atomically."""
    write_bytes(path, (json.dumps(value, indent=2) + "\n").encode())


def read_json(path: str) -> Any:
    """The JSON value in `path`; FileNotFoundError names the file, ValueError names it when it does not parse."""
    with open(path) as f:
        text = f.read()
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON: {error}") from None


def append_jsonl(path: str, record: dict) -> None:
    """Appends `record` as one JSON line, in one write."""
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def read_jsonl(path: str) -> list[dict]:
    """The records of a JSON-lines file (none if it is missing); a last line cut short by a crash is skipped."""
    if not os.path.exists(path):
        return []
    records = []
    with open(path) as f:
        lines = f.read().split("\n")
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if number == len(lines):  # an unterminated last line: its writer was cut short
                continue
            raise ValueError(f"{path}:{number} is not valid JSON") from None
    return records
