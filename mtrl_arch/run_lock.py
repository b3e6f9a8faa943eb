"""One writer per run directory: an OS lock that ``train`` and ``train --resume`` hold for the life of the run.

The lock is ``flock(LOCK_EX | LOCK_NB)`` on ``RUN_DIR/.lock``. The kernel drops it when the holder's last
descriptor of that open file goes, so a run killed by SIGKILL leaves no stale lock: the file stays (it names
the last holder, for a person and for the refusal's message) but only the flock counts, never the file.
The descriptor is close-on-exec (children that exec, such as W&B's service, never hold it) and is closed
in every forked child (``os.register_at_fork``: multiprocessing ``fork`` workers, e.g. an async vector
env's or a DataLoader's), so no child that outlives a killed run keeps the run locked. A second writer is
refused at once (ConfigError, exit code 2) with the holder's PID and host. Readers (``eval``, ``report``,
``arch``) take no lock. On NFS, Linux emulates flock with POSIX locks, which the server keeps per client.

Taking the lock is also the run directory's first write, so the faults of a start surface here, before
anything else is written: a read-only directory, a file in its place (ConfigError, exit 2), or a full
disk (:class:`~mtrl_arch.errors.RunWriteError`, exit 4; :data:`START_ROOM` bytes must be writable). A new
run that ends before writing anything but the lock (refused, no data, a full disk) leaves no directory
behind.
"""
from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import time
from pathlib import Path

from .errors import ConfigError, RunWriteError

LOCK_NAME = ".lock"
START_ROOM = 1 << 20  # bytes a start must be able to write (config, first log lines, W&B's files)

# errnos of a write that failed for want of space or by the device, not by where the user pointed the run
_NO_ROOM = {errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.EFBIG}

_held: set[int] = set()  # descriptors of the locks this process holds


def _close_in_child() -> None:
    # a forked child holds copies of the parent's descriptors, and an flock lives as long as any copy
    for fd in _held:
        try:
            os.close(fd)
        except OSError:
            pass
    _held.clear()


os.register_at_fork(after_in_child=_close_in_child)


def write_fault(e: OSError, run_dir: Path, what: str = "") -> Exception:
    """The one-line error for an OSError met writing ``run_dir``: RunWriteError (exit 4) for a full disk or a
    failing device, ConfigError (exit 2) where the place itself cannot hold a run (read-only, a file)."""
    why = e.strerror or str(e)
    what = f" {what}" if what else ""
    if e.errno in _NO_ROOM:
        return RunWriteError(f"could not write{what} in run directory {run_dir} ({why}); nothing was left "
                             "half-written: free space there, or give another run_dir")
    if e.errno in (errno.ENOTDIR, errno.EEXIST):
        blocker = next((p for p in (run_dir, *run_dir.parents) if p.exists() and not p.is_dir()), run_dir)
        return ConfigError(f"run directory {run_dir}: {blocker} is a file, not a directory; give another run_dir")
    return ConfigError(f"cannot write to run directory {run_dir} ({why}); a run writes its logs and checkpoints "
                       "there: make it writable, or give another run_dir (to resume: copy the run and resume the copy)")


def _holder(path: Path) -> str:
    """Who holds the lock at ``path``, from the record the holder writes just after its room check (until
    then the file holds the last holder's record and the check's bytes, or nothing: not yet a record)."""
    for _ in range(40):
        try:
            raw = path.read_bytes()
            if raw.endswith(b"\n") and raw.count(b"\n") == 1:
                d = json.loads(raw)
                return f"PID {d['pid']} on host {d['host']} (since {d['started']})"
        except (OSError, ValueError, KeyError, TypeError):
            pass
        time.sleep(0.05)
    return "a process whose PID could not be read"


def _write_all(fd: int, data: bytes, offset: int) -> None:
    view, done = memoryview(data), 0
    while done < len(data):  # a write may be short when the disk fills: the next one raises ENOSPC
        done += os.pwrite(fd, view[done:], offset + done)


class RunLock:
    """The held lock of one run directory; :meth:`release` (or leaving the ``with``) lets it go."""

    def __init__(self, run_dir: Path, fd: int, made: list[Path], made_file: bool):
        self.run_dir, self.path, self._fd = run_dir, run_dir / LOCK_NAME, fd
        self._made, self._made_file = made, made_file  # what this start created: removed if nothing followed

    def release(self) -> None:
        if self._fd < 0:
            return
        try:  # a new run that wrote nothing but the lock leaves nothing (as before the lock existed)
            if self._made_file and {p.name for p in self.run_dir.iterdir()} <= {LOCK_NAME}:
                self.path.unlink(missing_ok=True)  # still locked: a process that opened it sees it gone, retries
                for d in reversed(self._made):
                    d.rmdir()
        except OSError:
            pass
        _held.discard(self._fd)
        os.close(self._fd)
        self._fd = -1

    def __enter__(self) -> "RunLock":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def lock_run_dir(run_dir: Path, create: bool = False) -> RunLock:
    """Lock ``run_dir`` for this process, or raise ConfigError naming the holder.

    ``create``: make the directory (and its missing parents) first, for a new run; a resume's exists. Then
    :data:`START_ROOM` bytes are written to the lock file and cut back, so that a full disk stops the start
    here rather than half-way through the run's first files, and the holder's record replaces the last one.
    """
    run_dir = Path(run_dir)
    made = [p for p in (run_dir, *run_dir.parents) if not p.exists()] if create else []
    made.reverse()  # outermost first
    try:
        if create:
            run_dir.mkdir(parents=True, exist_ok=True)
        elif not run_dir.is_dir():
            raise ConfigError(f"{run_dir} is not a directory; give the run directory `mtrl-arch train` made")
        while True:
            path = run_dir / LOCK_NAME
            made_file = not path.exists()
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise ConfigError(f"run directory {run_dir} is in use by another `mtrl-arch train`: "
                                  f"{_holder(path)}; wait for it to end or stop it, or give another run_dir") from None
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(path))
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)  # a new run's lock file removed by its holder between our open and flock: start again
    except OSError as e:
        _remove_made(made)
        raise write_fault(e, run_dir) from None
    except BaseException:
        _remove_made(made)
        raise
    _held.add(fd)
    lock = RunLock(run_dir, fd, made, made_file)
    record = json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                         "started": time.strftime("%Y-%m-%dT%H:%M:%S")}).encode() + b"\n"
    size = os.fstat(fd).st_size  # the last holder's record stays until there is room to start
    try:
        _write_all(fd, bytes(START_ROOM), size)
        os.fsync(fd)
        os.ftruncate(fd, 0)
        _write_all(fd, record, 0)
    except OSError as e:
        try:  # a start refused for want of room adds and changes nothing, the lock file included
            if made_file:
                path.unlink()
            else:
                os.ftruncate(fd, size)
        except OSError:
            pass
        lock.release()
        raise write_fault(e, run_dir, f"the run's first {START_ROOM >> 20} MiB") from None
    return lock


def _remove_made(made: list[Path]) -> None:
    for d in reversed(made):
        try:
            d.rmdir()
        except OSError:
            break
