"""Atomic, checksummed checkpoints; the newest readable one wins.

Written as ``ckpt-<step>.pt`` through a temporary file (write, flush, fsync, rename),
with a SHA-256 of the payload stored beside it in ``ckpt-<step>.sha256``. Loading
checks the sum and falls back to the previous checkpoint when the newest is damaged.
"""
from __future__ import annotations

import hashlib
import io
import os
import random
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch


class CheckpointError(RuntimeError):
    pass


def rng_state() -> dict[str, Any]:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(s: dict[str, Any]) -> None:
    torch.set_rng_state(s["torch"])
    np.random.set_state(s["numpy"])
    random.setstate(s["python"])
    if s.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


def _steps(folder: Path) -> list[int]:
    return sorted(int(p.stem.split("-")[1]) for p in folder.glob("ckpt-*.pt") if p.stem.split("-")[1].isdigit())


def save_checkpoint(folder: str | Path, step: int, state: dict[str, Any], keep: int = 2) -> Path:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    torch.save(state, buf)
    data = buf.getvalue()
    digest = hashlib.sha256(data).hexdigest()
    path = folder / f"ckpt-{step}.pt"
    tmp = folder / f".ckpt-{step}.pt.tmp"
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        sum_tmp = folder / f".ckpt-{step}.sha256.tmp"
        sum_tmp.write_text(digest)
        os.replace(sum_tmp, folder / f"ckpt-{step}.sha256")
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise CheckpointError(f"could not write checkpoint {path} ({e.strerror}); the previous checkpoints are intact") from None
    dfd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)
    for old in _steps(folder)[:-keep]:
        (folder / f"ckpt-{old}.pt").unlink(missing_ok=True)
        (folder / f"ckpt-{old}.sha256").unlink(missing_ok=True)
    return path


def _read(path: Path) -> dict[str, Any]:
    data = path.read_bytes()
    sum_file = path.with_suffix(".sha256")
    if not sum_file.exists() or hashlib.sha256(data).hexdigest() != sum_file.read_text().strip():
        raise CheckpointError(f"checkpoint {path} is damaged (checksum mismatch)")
    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=False)


def load_latest(folder: str | Path) -> tuple[int, dict[str, Any]] | None:
    """The newest checkpoint whose checksum holds; damaged ones are reported and skipped."""
    folder = Path(folder)
    for step in reversed(_steps(folder)):
        try:
            return step, _read(folder / f"ckpt-{step}.pt")
        except CheckpointError as e:
            print(f"warning: {e}; falling back to the previous checkpoint", file=sys.stderr)
        except Exception as e:  # noqa: BLE001 - unreadable pickle
            print(f"warning: checkpoint ckpt-{step}.pt unreadable ({type(e).__name__}); falling back", file=sys.stderr)
    return None
