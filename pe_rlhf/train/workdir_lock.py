"""One run at a time in a workdir: an exclusive lock on `<workdir>/.lock` while a run writes there.

The lock is the kernel's (`flock`), so it goes with its process: a run killed at any moment leaves a
lock file that no process holds, and the next run takes it over (saying whose it was). While held, the
file records the holder (pid, host, start time, command); a second run on the workdir is refused with
that record before it writes anything. Released, the file is removed (a process that locked the file
just as it was removed sees that the path no longer names it, and starts again).

A process may take a workdir it already holds (`experiments/run.py`, then the training loop inside it);
a multi-stage driver's stages each take their own sub-workdir. Multi-host: only process 0 takes the lock.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import socket
import sys
import time

import jax

LOCK = ".lock"
log = logging.getLogger(__name__)
_held: dict[str, list] = {}  # a workdir this process holds (real path) -> [its lock file's descriptor, depth]


class WorkdirLockedError(RuntimeError):
    """Another running process holds the workdir."""


def _record(fd: int) -> dict | None:
    """The holder's record in the lock file, None when there is none (a free workdir)."""
    text = os.pread(fd, 1 << 16, 0).decode("utf-8", "replace").strip()
    if not text:
        return None
    try:
        return json.loads(text)
    except ValueError:
        return {"pid": "?", "started": f"? (unreadable record {text[:80]!r})"}


def _describe(holder: dict | None) -> str:
    if holder is None:
        return "a process that has not written its record yet"
    host = f" on {holder['host']}" if holder.get("host") else ""
    return f"pid {holder.get('pid')}{host}, started {holder.get('started')} ({holder.get('command', '?')})"


@contextlib.contextmanager
def workdir_lock(workdir: str):
    """Hold `workdir` exclusively for the block; `WorkdirLockedError` if another live process holds it."""
    key = os.path.realpath(workdir)
    if jax.process_index() != 0 or key in _held:  # another host's process, or this process holds it already
        with _nested(key):
            yield
        return
    fd = _take(workdir)
    if fd is None:
        yield
        return
    _held[key] = [fd, 1]
    try:
        yield
    finally:
        _held[key][1] -= 1
        if _held[key][1] == 0:
            del _held[key]
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(workdir, LOCK))  # while still locked: see `_take`
            os.close(fd)  # releases the lock


@contextlib.contextmanager
def _nested(key: str):
    if key in _held:
        _held[key][1] += 1
    try:
        yield
    finally:
        if key in _held:
            _held[key][1] -= 1


def _take(workdir: str) -> int | None:
    """The descriptor of `workdir`'s lock file, locked and holding this process's record (None where the
    filesystem has no locks)."""
    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(workdir, LOCK)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(fd)
            os.close(fd)
            raise WorkdirLockedError(
                f"{workdir} is in use by another run: {_describe(holder)} holds {path}. Two runs writing one "
                "workdir would mix their checkpoints and metrics: wait for that run to end (or stop it), or use "
                "another --workdir") from None
        except OSError as e:  # a filesystem without locks: run unprotected rather than not at all
            os.close(fd)
            log.warning("%s: cannot lock the workdir (%s); a second run on it would not be refused", path, e)
            return None
        if _same_file(fd, path):
            break
        os.close(fd)  # its holder removed this file on release after we opened it: lock the one at `path`
    stale = _record(fd)
    if stale is not None:
        print(f"{workdir}: taking over the lock left by {_describe(stale)}, which no longer holds it (its "
              "process ended without releasing it: killed?)")
    record = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S %z"),
              "command": " ".join(sys.argv)[:300]}
    os.ftruncate(fd, 0)
    os.pwrite(fd, (json.dumps(record) + "\n").encode(), 0)
    return fd


def _holder(fd: int) -> dict | None:
    """The record of the process that holds the lock (it writes it just after taking the lock)."""
    for _ in range(10):
        holder = _record(fd)
        if holder is not None:
            return holder
        time.sleep(0.05)
    return None


def _same_file(fd: int, path: str) -> bool:
    try:
        return os.stat(path).st_ino == os.fstat(fd).st_ino
    except FileNotFoundError:
        return False
