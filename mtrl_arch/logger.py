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
                resume="allow", settings=wandb.Settings(console="off", x_disable_stats=True),
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
            warnings.warn(msg, stacklevel=3)
            print(f"warning: {msg}", file=sys.stderr)
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

    def close(self) -> None:
        self.flush()
        self._file.close()
        if self._wandb is not None:
            try:
                self._wandb.finish()
            except Exception:  # noqa: BLE001
                pass
            self._wandb = None


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    path = Path(run_dir) / "metrics.jsonl"
    out = []
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            break
    return out
