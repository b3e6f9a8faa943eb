"""Metrics to a JSON-lines file (the record of truth), the console, and Weights & Biases.

W&B is optional at every step: if it cannot be imported, initialised or written to,
the logger warns once and carries on with the local files. Mode ``offline`` (the
default) never needs a network; ``online`` needs credentials.
"""
from __future__ import annotations

import json
import math
import os
import sys
import warnings
from pathlib import Path
from typing import Any


def _clean(v: Any) -> Any:
    if hasattr(v, "item") and getattr(v, "ndim", 1) == 0:
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return v


class Logger:
    def __init__(self, run_dir: str | Path, wandb_cfg: Any = None, config: dict | None = None,
                 name: str = "run", resume_step: int | None = None, console: bool = True):
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.run_dir / "metrics.jsonl"
        if resume_step is not None:
            self._truncate_after(resume_step)
        self._file = open(self.path, "a", buffering=1)
        self.console = console
        self._wandb = None
        self._wandb_failed = False
        if wandb_cfg is not None and wandb_cfg.mode != "disabled":
            self._init_wandb(wandb_cfg, config or {}, name)

    def _truncate_after(self, step: int) -> None:
        """On resume, drop lines written after the checkpoint so no step appears twice."""
        if not self.path.exists():
            return
        keep = []
        for line in self.path.read_text().splitlines():
            try:
                if json.loads(line).get("step", -1) <= step:
                    keep.append(line)
            except json.JSONDecodeError:
                break  # a torn last line from a killed process
        tmp = self.path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(l + "\n" for l in keep))
        os.replace(tmp, self.path)

    def _init_wandb(self, cfg: Any, config: dict, name: str) -> None:
        try:
            import wandb

            os.environ.setdefault("WANDB_SILENT", "true")
            self._wandb = wandb.init(
                project=cfg.project, entity=cfg.entity or None, group=cfg.group or None, tags=list(cfg.tags) or None,
                mode=cfg.mode, dir=str(self.run_dir), name=name, config=config, id=self._wandb_id(),
                resume="allow", settings=wandb.Settings(console="off", x_disable_stats=True,
                                                        init_timeout=float(os.environ.get("WANDB_INIT_TIMEOUT", 30))),
            )
        except Exception as e:  # noqa: BLE001 - W&B must never stop training
            self._warn(f"W&B unavailable ({type(e).__name__}: {str(e).splitlines()[0][:160]}); keeping local logs only")

    def _wandb_id(self) -> str:
        f = self.run_dir / "wandb_id.txt"
        if f.exists():
            return f.read_text().strip()
        import uuid

        rid = uuid.uuid4().hex[:12]
        f.write_text(rid)
        return rid

    def _warn(self, msg: str) -> None:
        if not self._wandb_failed:
            warnings.warn(msg, stacklevel=3)  # the CLI prints warnings as one line each
        self._wandb_failed = True
        self._wandb = None

    def log(self, metrics: dict[str, Any], step: int) -> None:
        rec = {"step": int(step), **{k: _clean(v) for k, v in metrics.items()}}
        self._file.write(json.dumps(rec) + "\n")
        if self._wandb is not None:
            try:
                self._wandb.log({k: v for k, v in rec.items() if k != "step" and isinstance(v, (int, float))}, step=int(step))
            except Exception as e:  # noqa: BLE001
                self._warn(f"W&B log failed ({type(e).__name__}); keeping local logs only")

    def log_text(self, key: str, text: str) -> None:
        """A block of text (e.g. a derived tree) to W&B; the run directory has it as a file already."""
        if self._wandb is not None:
            try:
                import wandb

                self._wandb.log({key: wandb.Html(f"<pre>{text}</pre>")}, commit=False)
                self._wandb.summary[key] = text
            except Exception as e:  # noqa: BLE001
                self._warn(f"W&B text log failed ({type(e).__name__}); keeping local logs only")

    def log_videos(self, videos: dict[str, Path], step: int, captions: dict[str, str] | None = None) -> None:
        """Video files (MP4 or GIF) to W&B under their keys at ``step``; the files stay where they are."""
        if self._wandb is not None:
            try:
                import wandb

                self._wandb.log({k: wandb.Video(str(p), caption=(captions or {}).get(k)) for k, p in videos.items()},
                                step=int(step))
            except Exception as e:  # noqa: BLE001
                self._warn(f"W&B video log failed ({type(e).__name__}); the videos are in {self.run_dir}")

    def summary(self, metrics: dict[str, Any]) -> None:
        if self._wandb is not None:
            try:
                for k, v in metrics.items():
                    self._wandb.summary[k] = _clean(v)
            except Exception as e:  # noqa: BLE001
                self._warn(f"W&B summary failed ({type(e).__name__})")

    def flush(self) -> None:
        self._file.flush()
        os.fsync(self._file.fileno())

    def position(self) -> int:
        """Bytes of metrics.jsonl written so far (flushed and fsynced): a checkpoint stores it."""
        self.flush()
        return self._file.tell()

    def rewind(self, pos: int) -> None:
        """Cut metrics.jsonl back to ``pos`` (a checkpoint's :meth:`position`) on resume.

        Everything logged after the checkpoint was taken is dropped and will be logged again
        by the resumed run, so no step appears twice or goes missing.
        """
        self._file.flush()
        size = os.fstat(self._file.fileno()).st_size
        if size < pos:  # the OS lost lines the checkpoint had seen written (power loss): keep what is there
            print(f"warning: {self.path} is shorter ({size} bytes) than when the checkpoint was taken ({pos})",
                  file=sys.stderr)
            return
        self._file.truncate(pos)
        self.flush()

    def close(self, wandb_timeout: float = 60.0) -> None:
        """Flush the local log; finish W&B in the background, waiting at most ``wandb_timeout`` s.

        An online run with the network gone can block in ``finish`` (uploading) for minutes;
        the local files are already complete, so a slow W&B never holds the process.
        """
        if not self._file.closed:
            self.flush()
            self._file.close()
        if self._wandb is not None:
            import threading

            run, self._wandb = self._wandb, None
            t = threading.Thread(target=_finish_quietly, args=(run,), daemon=True)
            t.start()
            t.join(wandb_timeout)
            if t.is_alive():
                self._warn(f"W&B did not finish within {wandb_timeout:.0f} s; local logs are complete, "
                           f"`wandb sync {self.run_dir / 'wandb'}` uploads later")


def _finish_quietly(run: Any) -> None:
    try:
        run.finish()
    except Exception:  # noqa: BLE001 - W&B must never stop training
        pass


def progress_bar(enabled: bool, total: int, initial: int, unit: str = "step"):
    """A tqdm bar, or None when disabled or tqdm is missing (the loops then print nothing)."""
    if not enabled:
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, initial=initial, unit=unit, dynamic_ncols=True, smoothing=0.05)


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    path = Path(run_dir) / "metrics.jsonl"
    out = []
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            break
    return out


def read_wandb_history(run_dir: str | Path) -> list[dict[str, Any]]:
    """The history rows of every W&B run file under ``run_dir/wandb`` (offline runs included).

    Reads W&B's transaction log (``run-<id>.wandb``: a 7-byte ``:W&B`` header, then 32 KiB
    blocks of LevelDB-log records, each a serialised ``wandb_internal_pb2.Record``) without
    a network or a W&B server; wandb itself no longer ships a Python reader for it.
    """
    import struct

    from wandb.proto import wandb_internal_pb2

    rows = []
    for f in sorted(Path(run_dir).glob("wandb/*run-*/run-*.wandb")):
        data = f.read_bytes()
        if data[:4] != b":W&B":
            continue
        pos, block, chunks = 7, 32768, b""
        while pos + 7 <= len(data):
            if block - pos % block < 7:  # a block's tail too short for a record header is padding
                pos += block - pos % block
                continue
            _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
            payload = data[pos + 7:pos + 7 + length]
            pos += 7 + length
            if kind == 0:
                break
            chunks = payload if kind in (1, 2) else chunks + payload  # FULL/FIRST start, MIDDLE/LAST append
            if kind in (1, 4):
                rec = wandb_internal_pb2.Record()
                rec.ParseFromString(chunks)
                if rec.WhichOneof("record_type") == "history":
                    rows.append({(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in rec.history.item})
    return rows
