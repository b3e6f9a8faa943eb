"""Sweeps: a grid of config overrides x seeds, each trial an ordinary run directory.

``mtrl-arch sweep CONFIG key=v1,v2 [key=v ...] --seeds 0,1,2`` runs the cartesian product
of the comma lists (a single value is a fixed override for every trial) once per seed.
Every trial is ``mtrl-arch train CONFIG <overrides> seed=<k> run_dir=<dir>`` in its own
process, so a trial is exactly a run made by hand (resumable with ``train --resume``,
readable by ``eval``/``arch``/``report``) and a trial that crashes, diverges or is killed
cannot take the others with it.

Where trials run:

* **Ray** (``pip install 'mtrl-arch[sweep]'``): one Ray task per trial holding
  ``--cpus-per-trial`` CPUs and ``--gpus-per-trial`` GPUs (Ray sets
  ``CUDA_VISIBLE_DEVICES`` and ``OMP_NUM_THREADS`` for it), on a local Ray instance
  (``ray.init()``) or on an existing cluster (``--address``). On a cluster every node
  needs mtrl-arch (and the data) installed, and the sweep folder must be on a file
  system every node sees.
* **local subprocesses** when Ray is not installed (or ``--runner local``): as many trials
  at a time as ``cpu_count // cpus_per_trial`` (GPUs: ``visible GPUs // gpus_per_trial``,
  each trial given its own ``CUDA_VISIBLE_DEVICES``).

Layout of the sweep folder (default ``runs/sweep-<config name>-<timestamp>``)::

    <setting>-seed<k>/     one run directory per trial (setting: the grid's values, e.g. method-hps)
    logs/<trial>.log       the trial's stdout and stderr
    sweep.json             the plan, then every trial's status, exit code, error line and time
    summary.md/.json       per setting over its seeds: mean, std and 95% t-interval of every
                           ``eval/*`` value of the last evaluation (RL: success per task and
                           mean; supervised: every metric, Delta_m)
    report/                ``mtrl-arch report`` over all finished trials (curves with seed bands)
"""
from __future__ import annotations

import itertools
import json
import os
import re
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

from .config import Config, ConfigError, load_config, resolve_config_path
from .sweep_summary import SWEEP_FORMAT, describe_exit, summarise, summary_markdown

INSTALL_HINT = "pip install 'mtrl-arch[sweep]'"


# ---- the grid ---------------------------------------------------------------------------------------
def split_values(text: str) -> list[str]:
    """``a,b,[c,d]`` -> ``['a', 'b', '[c,d]']``: commas inside brackets, braces or quotes do not split."""
    out, depth, quote, cur = [], 0, "", ""
    for ch in text:
        if quote:
            quote = "" if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch in "[{(":
            depth += 1
        elif ch in "]})":
            depth -= 1
        elif ch == "," and depth == 0:
            out.append(cur)
            cur = ""
            continue
        cur += ch
    out.append(cur)
    return out


def parse_grid(items: list[str]) -> list[tuple[str, list[str]]]:
    """``['arch.method=hps,stl', 'train.lr=0.1']`` -> ``[('arch.method', ['hps', 'stl']), ('train.lr', ['0.1'])]``."""
    grid: list[tuple[str, list[str]]] = []
    for item in items:
        if "=" not in item:
            raise ConfigError(f"sweep override {item!r} is not of the form key=v1,v2,... (e.g. arch.method=hps,stl)")
        key, values = item.split("=", 1)
        key = key.strip()
        if key in ("seed", "run_dir"):
            raise ConfigError(f"{key} is set by the sweep for every trial; give seeds with --seeds 0,1,2"
                              if key == "seed" else "run_dir is set by the sweep for every trial; use --out for the sweep folder")
        if any(k == key for k, _ in grid):
            raise ConfigError(f"sweep key {key!r} is given twice; list its values once: {key}=v1,v2")
        vals = split_values(values)
        if len(vals) != len(set(vals)):
            raise ConfigError(f"sweep key {key!r} lists a value twice: {values}")
        grid.append((key, vals))
    return grid


def parse_seeds(text: str) -> list[int]:
    try:
        seeds = [int(s) for s in split_values(text)]
    except ValueError:
        raise ConfigError(f"--seeds must be a comma list of integers (e.g. 0,1,2); got {text!r}") from None
    if not seeds or len(seeds) != len(set(seeds)):
        raise ConfigError(f"--seeds must list distinct integers; got {text!r}")
    return seeds


def _safe(text: str) -> str:
    text = re.sub(r"[^A-Za-z0-9_.+-]+", "", text.replace("/", "-").replace(" ", "")).strip("-")
    return text[-60:] or "x"  # long values are mostly paths: their ends tell them apart


def setting_names(grid: list[tuple[str, list[str]]]) -> list[tuple[str, list[str]]]:
    """Every combination of the grid as (directory-safe name, overrides); the name shows the varied keys only."""
    varied = [k for k, vs in grid if len(vs) > 1]
    leaves = [k.rsplit(".", 1)[-1] for k in varied]
    label = {k: (leaf if leaves.count(leaf) == 1 else k) for k, leaf in zip(varied, leaves)}
    out = []
    for combo in itertools.product(*[vs for _, vs in grid]):
        pairs = list(zip([k for k, _ in grid], combo))
        name = "_".join(f"{_safe(label[k])}-{_safe(v)}" for k, v in pairs if k in label) or "base"
        out.append((name, [f"{k}={v}" for k, v in pairs]))
    names = [n for n, _ in out]
    if len(set(names)) != len(names):  # values that differ only in characters dropped from names
        out = [(f"s{i}-{n}", o) for i, (n, o) in enumerate(out)]
    return out


# ---- trials -----------------------------------------------------------------------------------------
@dataclass
class Trial:
    name: str                     # <setting>-seed<k>: also the run directory's name
    setting: str
    seed: int
    overrides: list[str]          # the grid's overrides (seed and run_dir come on top)
    run_dir: str
    log: str
    status: str = "pending"       # pending | ok | failed
    returncode: int | None = None
    error: str = ""
    wall_s: float = 0.0
    host: str = ""


def plan(config: str, overrides: list[str], seeds: list[int], out: Path,
         check: Callable[[Config], None] | None = None) -> tuple[Config, list[Trial]]:
    """Validate every setting (ConfigError names the setting) and lay out the trials; nothing is written."""
    grid = parse_grid(overrides)
    trials, first = [], None
    for name, ovr in setting_names(grid):
        try:
            cfg = load_config(config, [*ovr, f"seed={seeds[0]}"])
            if check is not None:
                check(cfg)
        except ConfigError as e:
            raise ConfigError(f"sweep setting {name} ({' '.join(ovr)}): {e}") from None
        first = first or cfg
        for s in seeds:
            t = f"{name}-seed{s}"
            trials.append(Trial(t, name, s, ovr, str((out / t).resolve()), str((out / "logs" / f"{t}.log").resolve())))
    return first, trials


def trial_command(config: str, trial: Trial, extra: list[str]) -> list[str]:
    return [sys.executable, "-m", "mtrl_arch.cli", "train", config, *trial.overrides, *extra, f"seed={trial.seed}",
            f"run_dir={trial.run_dir}", "--no-progress"]


def run_trial(cmd: list[str], log: str, env: dict[str, str], cwd: str, timeout: float | None) -> dict[str, Any]:
    """Run one trial's command, its output to ``log``; never raises for the trial's own failure."""
    import socket

    t0 = time.perf_counter()
    Path(log).parent.mkdir(parents=True, exist_ok=True)
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **env}
    with open(log, "w") as f:
        try:
            p = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=full_env, timeout=timeout,
                               cwd=cwd if os.path.isdir(cwd) else None)
            rc, why = p.returncode, ""
        except subprocess.TimeoutExpired:
            rc, why = -9, f"timed out after {timeout:.0f} s (--trial-timeout)"
        except OSError as e:
            rc, why = -1, f"could not start the trial ({e.strerror})"
    return {"returncode": rc, "error": why or (_error_line(Path(log)) if rc else ""),
            "wall_s": time.perf_counter() - t0, "host": socket.gethostname()}


def _error_line(log: Path) -> str:
    """The trial's one-line error (the CLI's ``error: ...``), else the last line of its output."""
    try:
        lines = [ln.strip() for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return ""
    errs = [ln for ln in lines if ln.startswith("error:")]
    return (errs[-1] if errs else (lines[-1] if lines else "no output"))[:300]


# ---- runners ----------------------------------------------------------------------------------------
class _Local:
    """Trials in local subprocesses, a fixed number at a time."""

    def __init__(self, cpus: float, gpus: float):
        n_cpu = os.cpu_count() or 1
        self.slots = max(1, int(n_cpu // max(cpus, 1e-9)))
        self.gpu_sets: list[str] | None = None
        if gpus > 0:
            try:
                import torch

                n_gpu = torch.cuda.device_count()
            except ImportError:
                n_gpu = 0
            if n_gpu < gpus:
                raise ConfigError(f"--gpus-per-trial {gpus:g} but {n_gpu} GPU(s) visible")
            g = max(1, int(gpus))
            self.slots = min(self.slots, n_gpu // g)
            self.gpu_sets = [",".join(str(i * g + j) for j in range(g)) for i in range(self.slots)]
        self.cpus = cpus

    def describe(self) -> str:
        return f"local subprocesses, {self.slots} at a time"

    def run(self, jobs: list[tuple[Trial, list[str]]], cwd: str, timeout: float | None, done: Callable) -> None:
        free = list(range(self.slots))
        lock = threading.Lock()

        def one(trial: Trial, cmd: list[str]) -> dict[str, Any]:
            with lock:
                slot = free.pop()
            env = {"OMP_NUM_THREADS": str(max(1, int(self.cpus)))}
            if self.gpu_sets is not None:
                env["CUDA_VISIBLE_DEVICES"] = self.gpu_sets[slot]
            try:
                return run_trial(cmd, trial.log, env, cwd, timeout)
            finally:
                with lock:
                    free.append(slot)

        with ThreadPoolExecutor(self.slots) as pool:
            futures = {pool.submit(one, t, c): t for t, c in jobs}
            for fut in as_completed(futures):
                try:
                    res = fut.result()
                except Exception as e:  # noqa: BLE001 - a runner fault is one trial's failure
                    res = {"returncode": None, "error": f"{type(e).__name__}: {e}"}
                done(futures[fut], res)


class _Ray:
    """One Ray task per trial; a local Ray instance unless ``address`` names a cluster."""

    def __init__(self, address: str | None, cpus: float, gpus: float):
        import ray

        self.ray, self.cpus, self.gpus, self.address = ray, cpus, gpus, address
        self.owned = not ray.is_initialized()
        if self.owned:
            kw: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False}
            if address:
                kw["address"] = address
            try:
                ray.init(**kw)
            except Exception as e:  # noqa: BLE001 - e.g. no cluster at that address
                raise ConfigError(f"could not start or reach Ray{f' at {address}' if address else ''} "
                                  f"({type(e).__name__}: {' '.join(str(e).split())[:200]})") from None
        res = ray.cluster_resources()
        if cpus > res.get("CPU", 0) or gpus > res.get("GPU", 0):
            self.close()
            raise ConfigError(f"a trial asks for {cpus:g} CPU(s) and {gpus:g} GPU(s) but the Ray cluster has "
                              f"{res.get('CPU', 0):g} CPU(s) and {res.get('GPU', 0):g} GPU(s); lower --cpus-per-trial/--gpus-per-trial")
        self.total = res

    def describe(self) -> str:
        where = f"Ray cluster at {self.address}" if self.address else "local Ray"
        return f"{where} ({self.total.get('CPU', 0):g} CPUs, {self.total.get('GPU', 0):g} GPUs)"

    def run(self, jobs: list[tuple[Trial, list[str]]], cwd: str, timeout: float | None, done: Callable) -> None:
        ray = self.ray
        task = ray.remote(num_cpus=self.cpus, num_gpus=self.gpus, max_retries=0)(run_trial)
        env = {} if self.gpus else {"CUDA_VISIBLE_DEVICES": ""}  # a CPU trial must not grab a node's GPU
        refs = {task.remote(c, t.log, env, cwd, timeout): t for t, c in jobs}
        pending = list(refs)
        while pending:
            ready, pending = ray.wait(pending, num_returns=1)
            for ref in ready:
                try:
                    res = ray.get(ref)
                except Exception as e:  # noqa: BLE001 - worker or node lost: this trial failed, the rest go on
                    res = {"returncode": None, "error": f"Ray: {type(e).__name__}: {' '.join(str(e).split())[:200]}"}
                done(refs[ref], res)

    def close(self) -> None:
        if self.owned:
            self.ray.shutdown()


def ray_available() -> bool:
    try:
        import ray  # noqa: F401
    except ImportError:
        return False
    return True


# ---- the sweep --------------------------------------------------------------------------------------
def default_out(cfg: Config) -> Path:
    return Path("runs") / f"sweep-{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}"


def run_sweep(config: str, overrides: list[str], seeds: list[int], out: Path | None = None,
              address: str | None = None, cpus_per_trial: float = 1, gpus_per_trial: float = 0,
              runner: str = "auto", trial_timeout: float | None = None, report: bool = True,
              check: Callable[[Config], None] | None = None, echo: Callable[[str], None] | None = None
              ) -> dict[str, Any]:
    """Plan, run every trial, summarise; returns the summary (``summary.json``'s content)."""
    echo = echo or (lambda s: print(s, file=sys.stderr, flush=True))
    if cpus_per_trial <= 0 or gpus_per_trial < 0:
        raise ConfigError("--cpus-per-trial must be positive and --gpus-per-trial >= 0")
    if runner not in ("auto", "ray", "local"):
        raise ConfigError(f"--runner must be auto, ray or local; got {runner!r}")
    have_ray = ray_available()
    if (runner == "ray" or address) and not have_ray:
        raise ConfigError(f"Ray is not installed{' (needed for --address)' if address else ''}; {INSTALL_HINT}")
    if runner == "local" and address:
        raise ConfigError("--address needs Ray; drop --runner local")
    # a config path must resolve in the trials' own processes (cwd may differ on cluster nodes)
    cfg_path = resolve_config_path(config)
    is_path = Path(config).suffix in (".yaml", ".yml") or Path(config).exists()
    config_arg = str(cfg_path.resolve()) if is_path else config
    base, _ = plan(config_arg, overrides, seeds, Path("."), check)
    out = Path(out) if out is not None else default_out(base)
    if (out / "sweep.json").exists():
        raise ConfigError(f"{out} already holds a sweep; give another --out")
    _, trials = plan(config_arg, overrides, seeds, out, None)
    extra = [] if base.wandb.group or any(o.startswith("wandb.group=") for o in overrides) else [f"wandb.group={out.name}"]
    if runner == "ray" or (runner == "auto" and have_ray):
        run = _Ray(address, cpus_per_trial, gpus_per_trial)
    else:
        run = _Local(cpus_per_trial, gpus_per_trial)
        if runner == "auto":
            echo(f"warning: Ray is not installed; running the trials in local subprocesses ({INSTALL_HINT} for Ray)")
    out.mkdir(parents=True, exist_ok=True)
    record = {"format": SWEEP_FORMAT, "version": 1, "config": config_arg, "overrides": list(overrides), "seeds": seeds,
              "runner": run.describe(), "cpus_per_trial": cpus_per_trial, "gpus_per_trial": gpus_per_trial,
              "started": time.strftime("%Y-%m-%dT%H:%M:%S"), "trials": [asdict(t) for t in trials]}
    _write_json(out / "sweep.json", record)
    echo(f"sweep {out}: {len(trials)} trial(s) ({len(trials) // len(seeds)} setting(s) x {len(seeds)} seed(s)) "
         f"on {run.describe()}")
    finished = [0]
    t0 = time.perf_counter()

    def done(trial: Trial, res: dict[str, Any]) -> None:
        trial.returncode, trial.error = res.get("returncode"), res.get("error", "")
        trial.wall_s, trial.host = float(res.get("wall_s", 0.0)), res.get("host", "")
        trial.status = "ok" if trial.returncode == 0 else "failed"
        finished[0] += 1
        tail = f"{trial.wall_s:.0f} s" if trial.status == "ok" else \
            f"FAILED ({describe_exit(trial.returncode)}): {trial.error} [log: {trial.log}]"
        echo(f"[{finished[0]}/{len(trials)}] {trial.name}: {'ok, ' if trial.status == 'ok' else ''}{tail}")
        record["trials"] = [asdict(t) for t in trials]
        _write_json(out / "sweep.json", record)

    try:
        run.run([(t, trial_command(config_arg, t, extra)) for t in trials], os.getcwd(), trial_timeout, done)
    finally:
        if isinstance(run, _Ray):
            run.close()
    record.update(finished=time.strftime("%Y-%m-%dT%H:%M:%S"), wall_s=time.perf_counter() - t0,
                  trials=[asdict(t) for t in trials])
    _write_json(out / "sweep.json", record)
    summary = summarise(trials, record, parse_grid(list(overrides)))
    if report:
        ok = [Path(t.run_dir) for t in trials if t.status == "ok"]
        if ok:
            try:
                from .report import make_report

                summary["report"] = str(make_report(ok, out / "report"))
            except Exception as e:  # noqa: BLE001 - the table above is the sweep's result; figures are extra
                echo(f"warning: the report over the trials failed ({type(e).__name__}: {str(e).splitlines()[0][:160]})")
    (out / "summary.md").write_text(summary_markdown(summary))
    _write_json(out / "summary.json", summary)
    summary["out"] = str(out)
    return summary


def _write_json(path: Path, d: dict) -> None:
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(d, indent=1, default=str))
    os.replace(tmp, path)
