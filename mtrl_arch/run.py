"""A run directory: resolved config, seed, versions and git commit; device choice; seeding.

Also what a resume does in either domain (the RL and supervised loops both call these, so the
rules cannot drift apart): :func:`find_resume_checkpoint` (the newest intact checkpoint, damaged
ones moved aside), and :func:`resume_key` / :func:`check_resume_key` (the config a checkpoint was
made with must match).
"""
from __future__ import annotations

import json
import os
import platform
import random
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .checkpoint import load_latest
from .config import Config, ConfigError, config_from_dict, load_yaml_text, to_yaml
from .run_lock import write_fault
from .tree import Tree

RUN_FORMAT_VERSION = 1


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device=cuda but no CUDA device is visible; use device=auto or device=cpu")
    return torch.device(name)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def git_commit() -> str:
    try:
        here = Path(__file__).resolve().parent
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=5).stdout.strip()
        return (out.stdout.strip() + ("+dirty" if dirty else "")) if out.returncode == 0 else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def versions() -> dict[str, str]:
    out = {"python": platform.python_version(), "platform": platform.platform()}
    for pkg in ("mtrl-arch", "torch", "numpy", "gymnasium", "metaworld", "stable-baselines3", "wandb", "mujoco"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = "not installed"
    return out


def machine() -> dict[str, Any]:
    info = {"cpu_count": os.cpu_count(), "processor": platform.processor() or platform.machine(),
            "torch_threads": torch.get_num_threads(), "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "default")}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def new_run_dir(cfg: Config) -> Path:
    if cfg.run_dir:
        return Path(cfg.run_dir)
    return Path("runs") / f"{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}"


def write_run_info(run_dir: Path, cfg: Config, extra: dict[str, Any] | None = None) -> None:
    """config.yaml holds the resolved config plus how the run was made (seed, versions, commit).

    Written whole or not at all: a failed write (full disk) leaves the previous config.yaml, or none."""
    meta = {"run": {"format_version": RUN_FORMAT_VERSION, "seed": cfg.seed, "git_commit": git_commit(),
                    "versions": versions(), "machine": machine(), "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
                    **(extra or {})}}
    tmp = run_dir / "config.yaml.tmp"
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        tmp.write_text(to_yaml(cfg, meta))
        os.replace(tmp, run_dir / "config.yaml")
    except OSError as e:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass
        raise write_fault(e, run_dir, "config.yaml") from None


def read_run_config(run_dir: Path) -> tuple[Config, dict[str, Any]]:
    import yaml

    path = run_dir / "config.yaml"
    if not path.is_file():
        raise ConfigError(f"{run_dir} is not a run directory (no config.yaml); give a directory made by `mtrl-arch train`")
    try:
        d = load_yaml_text(path.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path} is damaged (not valid YAML: {str(e).splitlines()[0][:120]}); "
                          "a run directory holds the config.yaml that `mtrl-arch train` wrote") from None
    if not isinstance(d, dict) or not isinstance(d.get("run", {}), dict):
        raise ConfigError(f"{path} is damaged (expected a mapping of config sections plus a `run:` record)")
    meta = d.pop("run", {})
    if int(meta.get("format_version", 0)) > RUN_FORMAT_VERSION:
        raise ConfigError(f"{run_dir} was written by a newer mtrl-arch (run format {meta.get('format_version')}); upgrade to resume it")
    try:
        return config_from_dict(d), meta
    except ConfigError as e:
        raise ConfigError(f"{run_dir}/config.yaml does not fit this mtrl-arch version: {e}") from None


# Config fields that fix the shapes and meaning of what a checkpoint holds: a resume must match them.
RESUME_KEYS = ("domain", "env.name", "env.tasks", "env.max_episode_steps", "arch.method", "arch.options",
               "arch.actor", "arch.critic", "arch.val_fraction", "model.hidden", "model.activation", "model.backbone",
               "model.options", "agent.algo", "agent.critic_hidden", "agent.buffer_size", "data.name", "data.tasks", "weighting.method")


def _get(cfg: Config, dotted: str) -> Any:
    obj: Any = cfg
    for part in dotted.split("."):
        obj = getattr(obj, part, None)
    return obj


def resume_key(cfg: Config) -> dict[str, Any]:
    """What a checkpoint records about the config and code that wrote it (see :func:`check_resume_key`)."""
    try:
        version = metadata.version("mtrl-arch")
    except metadata.PackageNotFoundError:
        version = "unknown"
    return {"run_format": RUN_FORMAT_VERSION, "mtrl_arch": version,
            "config": {k: _get(cfg, k) for k in RESUME_KEYS}}


def check_resume_key(saved: dict[str, Any] | None, cfg: Config, where: str) -> None:
    """ConfigError (one line) when the checkpoint ``where`` was made by an incompatible config or version."""
    if not saved:
        return
    if int(saved.get("run_format", 0)) > RUN_FORMAT_VERSION:
        raise ConfigError(f"{where} was written by a newer mtrl-arch ({saved.get('mtrl_arch')}, run format "
                          f"{saved.get('run_format')}); upgrade mtrl-arch to resume it")
    old = saved.get("config", {})
    diff = [f"{k}={old[k]!r} (now {_get(cfg, k)!r})" for k in RESUME_KEYS if k in old and old[k] != _get(cfg, k)]
    if diff:
        raise ConfigError(f"cannot resume from {where}: it was made with {'; '.join(diff)}; "
                          "resume with the run's own config or start a new run")


def find_resume_checkpoint(run_dir: Path, trust_file: bool = False) -> tuple[int, dict[str, Any]] | None:
    """What ``train --resume`` continues from: the newest checkpoint of ``run_dir`` that reads back intact,
    as ``(step, state)``. A damaged newer one is named in one warning line and moved aside to ``*.damaged``
    (kept for inspection, never again counted among the kept ones); with none readable, a warning and None
    (the run starts from the beginning). The caller checks the state's :func:`resume_key` against its
    config (:func:`check_resume_key`) where every rank of a data-parallel run sees it, so all of them stop.
    A checkpoint that holds more than data stops the resume (:mod:`mtrl_arch.safe_load`) unless ``trust_file``."""
    found = load_latest(run_dir / "checkpoints", quarantine=True, trust_file=trust_file)
    if found is None:
        print(f"warning: {run_dir}/checkpoints holds no readable checkpoint; starting the run from the beginning",
              file=sys.stderr)
    return found


ARCH_SET_FORMAT = "mtrl-arch/arch-set"


def write_arch(run_dir: Path, trees: dict[str, Tree]) -> None:
    """arch.json: every network's derived tree; arch.txt: the same, rendered."""
    d = {"format": ARCH_SET_FORMAT, "version": 1, "networks": {k: t.to_dict() for k, t in trees.items()}}
    (run_dir / "arch.json").write_text(json.dumps(d, indent=1))
    (run_dir / "arch.txt").write_text("\n\n".join(f"[{k}]\n{t.render()}" for k, t in trees.items()) + "\n")


def read_arch(path: Path) -> dict[str, Tree]:
    if path.is_dir():
        path = path / "arch.json"
    if not path.is_file():
        raise ConfigError(f"no derived architecture at {path}; the run has not finished its search yet")
    try:
        d = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path} is damaged (not valid JSON: {e}); expected the arch.json that "
                          "`mtrl-arch train` writes: {\"format\": \"mtrl-arch/arch-set\", \"networks\": {name: tree}}") from None
    if not isinstance(d, dict):
        raise ConfigError(f"{path} is damaged (expected a JSON object)")
    if d.get("format") == ARCH_SET_FORMAT:
        return {k: Tree.from_dict(v) for k, v in d["networks"].items()}
    return {"trunk": Tree.from_dict(d)}
