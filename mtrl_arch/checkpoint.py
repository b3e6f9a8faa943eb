"""Atomic, checksummed checkpoints; the newest readable one wins.

A checkpoint is one file, ``ckpt-<step>.pt``: a fixed-size JSON header (format, version,
step, payload size, SHA-256 of the payload, caller's ``meta``) followed by the
``torch.save`` payload. It is written to a hidden temporary file in the same folder
(write, flush, fsync), renamed over the final name (atomic on POSIX) and the folder is
fsynced, so a crash or SIGKILL at any moment leaves either the old set of checkpoints or
the new one, never a half-written file under a checkpoint's name. One file with the sum
inside (not a ``.sha256`` beside it) means there is no window in which sum and payload
disagree.

Loading checks size and checksum; a damaged or truncated newest checkpoint is reported
in one line on stderr and the previous one is used. The payload is read with ``weights_only=True``
(:mod:`mtrl_arch.safe_load`): a checkpoint whose pickle names anything but plain data is refused, never
skipped as damaged (the sum proves nothing about who wrote it). Format 2 holds tensors, numbers, strings
and containers only; format 1 also held numpy arrays (the numpy RNG state, episode and replay arrays),
read with numpy's array types allowed. The newest ``keep`` checkpoints are kept. A failed write (full
disk, I/O error) raises :class:`CheckpointWriteError` and removes only its own temporary file: the
previous checkpoints are untouched.

A finished run's model file (``model.pt``) is written by :func:`save_model_file`: atomically too, and with
bytes that depend only on what it holds, so that a resumed run writes the uninterrupted run's file.

Public API (shared by the RL and supervised loops): :func:`save_checkpoint`,
:func:`load_latest`, :func:`read_checkpoint`, :func:`read_header`, :func:`save_model_file`, :func:`rng_state`,
:func:`set_rng_state`, :func:`rng_preserved`, :func:`assert_finite`, and the errors below.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import random
import sys
from collections import OrderedDict
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np
import torch

from .safe_load import NUMPY_ARRAY_GLOBALS, UntrustedFileError, torch_load

FORMAT = "mtrl-arch/checkpoint"
VERSION = 2  # 2: no numpy objects in the payload (1: numpy arrays, read with safe_load.NUMPY_ARRAY_GLOBALS)
HEADER_SIZE = 4096  # bytes; JSON padded with spaces, ends in a newline


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be read (damaged, truncated, wrong format)."""


class CheckpointWriteError(CheckpointError):
    """A checkpoint could not be written (e.g. disk full); the previous ones are intact."""


class CheckpointVersionError(CheckpointError):
    """A checkpoint written by a newer mtrl-arch (not damage: never skipped silently)."""


class NonFiniteError(RuntimeError):
    """A loss or parameter became NaN/inf; the run stops and keeps its last good checkpoint."""


class StopRequested(Exception):
    """Raised inside an evaluation when SIGINT/SIGTERM arrived, to end it early (every loop's evaluations)."""


# ---- RNG --------------------------------------------------------------------------------------
def rng_state() -> dict[str, Any]:
    """Every random stream of the process, as plain data: numpy's uint32 key as an int64 tensor (no numpy object
    to unpickle; a uint32 tensor does not survive plain pickling, which data-parallel ranks use to share state)."""
    npy = np.random.get_state(legacy=False)
    npy["state"] = {**npy["state"], "key": torch.from_numpy(npy["state"]["key"].astype(np.int64))}
    return {"torch": torch.get_rng_state(), "numpy": npy, "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(s: dict[str, Any]) -> None:
    """Restore :func:`rng_state`'s streams (also format 1's, whose numpy state is numpy's legacy tuple)."""
    torch.set_rng_state(s["torch"])
    npy = s["numpy"]
    if isinstance(npy, dict):
        npy = {**npy, "state": {**npy["state"], "key": np.asarray(npy["state"]["key"], dtype=np.uint32)}}
    np.random.set_state(npy)
    random.setstate(s["python"])
    if s.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


@contextmanager
def rng_preserved() -> Iterator[None]:
    """Every random stream of the process (:func:`rng_state`) on exit as it was on entry, exceptions included.

    The loops evaluate inside it: an evaluation may draw (a search network samples its architecture in
    each forward, LTB's and AdaShare's Gumbel draws in RL even for deterministic actions; a DataLoader
    draws its workers' seed), and a run evaluated where an uninterrupted one is not (at the end of a
    budget, then resumed with a larger one; in an evaluation abandoned by a signal) would go on
    differently if those draws came from the training's streams.
    """
    s = rng_state()
    try:
        yield
    finally:
        set_rng_state(s)


# ---- finiteness -------------------------------------------------------------------------------
def assert_finite(named: Iterable[tuple[str, torch.Tensor]], where: str, what: str = "parameter") -> None:
    """Raise :class:`NonFiniteError` naming the first non-finite tensor.

    One fused reduction per call (norms of all tensors at once), so the check costs one
    device sync, not one per tensor.
    """
    named = [(n, t) for n, t in named if t.is_floating_point() and t.numel()]
    if not named:
        return
    norms = torch._foreach_norm([t.detach() for _, t in named])
    ok = torch.isfinite(torch.stack([n.float().to(norms[0].device) for n in norms]))
    if bool(ok.all()):
        return
    bad = named[int((~ok).nonzero()[0])][0]
    raise NonFiniteError(f"non-finite {what} {bad} {where}")


# ---- files ------------------------------------------------------------------------------------
def _steps(folder: Path) -> list[int]:
    out = []
    for p in folder.glob("ckpt-*.pt"):
        s = p.name[len("ckpt-"):-len(".pt")]
        if s.isdigit():
            out.append(int(s))
    return sorted(out)


def list_steps(folder: str | Path) -> list[int]:
    """Steps of the checkpoints in ``folder``, oldest first (damaged ones included until read)."""
    folder = Path(folder)
    return _steps(folder) if folder.is_dir() else []


def checkpoint_path(folder: str | Path, step: int) -> Path:
    return Path(folder) / f"ckpt-{int(step)}.pt"


class _HashingWriter:
    """File wrapper that hashes and counts what torch.save writes (no second pass, no copy)."""

    def __init__(self, f):
        self.f, self.sha, self.size = f, hashlib.sha256(), 0
        self.error: OSError | None = None  # torch re-raises write errors without their errno; keep it

    def write(self, b) -> int:
        self.sha.update(b)
        self.size += len(b)
        try:
            return self.f.write(b)
        except OSError as e:
            self.error = e
            raise

    def flush(self) -> None:
        self.f.flush()


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # e.g. platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def save_checkpoint(folder: str | Path, step: int, state: dict[str, Any], keep: int = 2,
                    meta: dict[str, Any] | None = None) -> Path:
    """Write ``state`` atomically as ``folder/ckpt-<step>.pt``; keep the newest ``keep``.

    ``meta`` (small, JSON-serialisable) goes into the header, readable without loading the
    payload (:func:`read_header`): the loops put the config fields a resume must match there.
    """
    folder = Path(folder)
    path = checkpoint_path(folder, step)
    tmp = folder / f".ckpt-{int(step)}.pt.{os.getpid()}.tmp"
    w = None
    try:
        folder.mkdir(parents=True, exist_ok=True)
        for stale in folder.glob(".ckpt-*.tmp"):  # left by a process killed mid-write
            stale.unlink(missing_ok=True)
        with open(tmp, "wb") as f:
            f.write(b" " * HEADER_SIZE)
            w = _HashingWriter(f)
            torch.save(state, w)
            header = json.dumps({"format": FORMAT, "version": VERSION, "step": int(step), "size": w.size,
                                 "sha256": w.sha.hexdigest(), "meta": meta or {}}).encode()
            if len(header) >= HEADER_SIZE:
                raise ValueError(f"checkpoint meta too large for the {HEADER_SIZE}-byte header")
            f.seek(0)
            f.write(header + b" " * (HEADER_SIZE - len(header) - 1) + b"\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass
        if w is not None and w.error is not None:
            e = w.error
        if isinstance(e, OSError) or (isinstance(e, RuntimeError) and not isinstance(e, CheckpointError)):
            why = e.strerror if isinstance(e, OSError) and e.strerror else str(e).splitlines()[0][:200]
            raise CheckpointWriteError(f"could not write checkpoint {path} ({why}); "
                                       "the previous checkpoints are intact") from None
        raise
    _fsync_dir(folder)
    for old in _steps(folder)[:-keep] if keep > 0 else []:
        checkpoint_path(folder, old).unlink(missing_ok=True)
    return path


def _canonical(obj: Any) -> Any:
    """``obj`` with fresh dicts, lists and tuples and interned strings (tensors as they are). A pickle writes an
    object it meets twice as a reference to the first: two equal strings that are one object in one process (a
    derived tree naming the agent's own task strings) and two in another (the tree read back from a checkpoint)
    would give two files with the same content and different bytes."""
    if isinstance(obj, str):
        return sys.intern(obj)
    if type(obj) in (dict, OrderedDict):  # other mappings (e.g. a defaultdict) are left as they are
        out = type(obj)((_canonical(k), _canonical(v)) for k, v in obj.items())
        if hasattr(obj, "_metadata"):  # a module's state_dict: its version records
            out._metadata = _canonical(obj._metadata)
        return out
    if type(obj) in (list, tuple):
        return type(obj)(_canonical(v) for v in obj)
    return obj


def save_model_file(obj: dict[str, Any], path: str | Path) -> None:
    """``torch.save(obj)`` to ``path`` atomically (a temporary file renamed over it: a kill leaves the old file or
    the new one), its bytes a function of its content (:func:`_canonical`)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:  # a file object, not a name: torch would record the (temporary) name inside
            torch.save(_canonical(obj), f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def read_header(path: str | Path) -> dict[str, Any]:
    """The JSON header of a checkpoint (format, version, step, size, sha256, meta)."""
    path = Path(path)
    with open(path, "rb") as f:
        raw = f.read(HEADER_SIZE)
    try:
        if len(raw) < HEADER_SIZE:
            raise ValueError
        h = json.loads(raw.decode())
    except (ValueError, UnicodeDecodeError):
        raise CheckpointError(f"checkpoint {path} is damaged (unreadable header)") from None
    if h.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not an mtrl-arch checkpoint (format {h.get('format')!r})")
    if int(h.get("version", 0)) > VERSION:
        raise CheckpointVersionError(f"checkpoint {path} has format version {h.get('version')}, newer than this "
                              f"mtrl-arch reads ({VERSION}); upgrade mtrl-arch to resume it")
    return h


def read_checkpoint(path: str | Path, trust_file: bool = False) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(header, state)`` of one checkpoint; :class:`CheckpointError` if it is damaged,
    :class:`~mtrl_arch.safe_load.UntrustedFileError` if its payload holds more than data
    (``trust_file=True``: loaded anyway, for a file the user trusts)."""
    path = Path(path)
    h = read_header(path)
    with open(path, "rb") as f:
        f.seek(HEADER_SIZE)
        data = f.read()
    if len(data) != h["size"]:
        raise CheckpointError(f"checkpoint {path} is damaged (truncated: {len(data)} of {h['size']} bytes)")
    if hashlib.sha256(data).hexdigest() != h["sha256"]:
        raise CheckpointError(f"checkpoint {path} is damaged (checksum mismatch)")
    allow = NUMPY_ARRAY_GLOBALS if int(h.get("version", 0)) < 2 else []
    try:
        state = torch_load(io.BytesIO(data), path, trust_file=trust_file, allow=allow)
    except UntrustedFileError:
        raise
    except Exception as e:  # noqa: BLE001 - a sum that holds over an unloadable payload: a bug or another version
        raise CheckpointError(f"checkpoint {path} could not be loaded ({type(e).__name__}: {str(e).splitlines()[0][:160]})") from None
    return h, state


def load_latest(folder: str | Path, quarantine: bool = False, trust_file: bool = False
                ) -> tuple[int, dict[str, Any]] | None:
    """The newest checkpoint that reads back intact, as ``(step, state)``; None if there is none.

    Damaged ones are reported (one line each on stderr) and skipped. ``quarantine=True``
    (used when resuming) renames them to ``*.damaged`` so that they are kept for inspection
    but never counted among the ``keep`` newest again. A checkpoint whose payload holds more than data
    stops the search (:class:`~mtrl_arch.safe_load.UntrustedFileError`) unless ``trust_file``.
    """
    found = load_latest_with_header(folder, quarantine, trust_file)
    return None if found is None else (found[0], found[2])


def load_latest_with_header(folder: str | Path, quarantine: bool = False, trust_file: bool = False
                            ) -> tuple[int, dict[str, Any], dict[str, Any]] | None:
    """Like :func:`load_latest`, with the header: ``(step, header, state)``."""
    folder = Path(folder)
    if not folder.is_dir():
        return None
    for step in reversed(_steps(folder)):
        path = checkpoint_path(folder, step)
        try:
            h, state = read_checkpoint(path, trust_file)
            return step, h, state
        except CheckpointVersionError:
            raise
        except (CheckpointError, OSError) as e:
            msg = str(e) if isinstance(e, CheckpointError) else f"checkpoint {path} unreadable ({e.strerror})"
            where = f"; moved to {path.name}.damaged" if quarantine else ""
            print(f"warning: {msg}{where}; falling back to the previous checkpoint", file=sys.stderr)
            if quarantine:
                os.replace(path, path.with_name(path.name + ".damaged"))
    return None
