"""``mtrl-arch bench trunk | sac-update | stl-vs-mt | env [key=value ...] [--json]``.

Timings on this machine. Machines shared with other work are noisy, so every benchmark
runs its cases *interleaved* in one process (case A, B, C, then again, the starting case
rotating), leaves warm-up out, and reports medians over the repetitions and ratios
*paired within a repetition* (the median over repetitions of ``t_case / t_reference``), so
a load spike slows every case of that repetition alike. The load average at the start
and the end, the CPU, thread count, library versions and seeds are part of every result.

``--json`` prints one JSON object (``out=PATH`` also writes it); without it, a table.
Options are ``key=value`` (YAML values, lists as ``[4,8]``); each benchmark's options are
the fields of its ``*Options`` dataclass below (``trunk``) or in :mod:`mtrl_arch.agents.bench_rl`.

This module is domain-free: the timing helpers, the printing and the ``trunk`` benchmark.
The RL benchmarks import the agent and the environments, so they live with the adapters
(:mod:`mtrl_arch.agents.bench_rl`); :func:`mtrl_arch.build.benchmarks` joins the two
registries for the CLI.

* ``trunk``: one weight step (forward, backward, Adam) of a 10-task trunk for HPS, STL
  (batched), a derived CoNAL tree and CoNAL's search network with and without the
  conflict-noticed operation, as ratios to HPS; and CoNAL-Pro's search cost per stage
  for 4..32 synthetic tasks.
* ``sac-update``, ``stl-vs-mt``, ``env``, ``gpu``: see :mod:`mtrl_arch.agents.bench_rl`.
"""
from __future__ import annotations

import dataclasses
import difflib
import importlib.metadata
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from .config import ConfigError, parse_value
from .options import parse_options

# ---- timing -------------------------------------------------------------------------------------


def interleaved(cases: dict[str, Callable[[], Any]], reps: int, warmup: int = 1) -> dict[str, list[float]]:
    """Seconds per call of every case: ``warmup`` untimed rounds, then ``reps`` timed rounds.

    Each round runs every case once; the starting case rotates from round to round.
    """
    names = list(cases)
    for _ in range(warmup):
        for k in names:
            cases[k]()
    times: dict[str, list[float]] = {k: [] for k in names}
    for r in range(reps):
        s = r % len(names)
        for k in names[s:] + names[:s]:
            t0 = time.perf_counter()
            cases[k]()
            times[k].append(time.perf_counter() - t0)
    return times


def paired_ratio(times: dict[str, list[float]], case: str, ref: str) -> float:
    """Median over rounds of ``t_case / t_ref`` (both measured in the same round)."""
    return statistics.median(a / b for a, b in zip(times[case], times[ref]))


def median(xs: list[float]) -> float:
    return statistics.median(xs)


# ---- where it ran -------------------------------------------------------------------------------


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> dict[str, Any]:
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        usable = os.cpu_count()
    out = {"cpu": _cpu_model(), "logical_cpus": os.cpu_count(), "usable_cpus": usable,
           "torch_threads": torch.get_num_threads(), "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "default"),
           "platform": platform.platform(),
           "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}
    try:
        out["cpu_flags_bf16"] = "avx512_bf16" in Path("/proc/cpuinfo").read_text() or "amx_bf16" in Path("/proc/cpuinfo").read_text()
    except OSError:
        pass
    return out


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for pkg in ("torch", "stable-baselines3", "metaworld", "gymnasium", "mujoco", "numpy", "mtrl-arch"):
        try:
            out[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            out[pkg] = "not installed"
    try:
        out["git_commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                           cwd=Path(__file__).parent, timeout=5).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        out["git_commit"] = "unknown"
    return out


def load_average() -> list[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


# ---- trunk --------------------------------------------------------------------------------------


@dataclass
class TrunkOptions:
    tasks: int = 10          # tasks of the trunk
    stages: int = 3          # linear+ReLU stages
    width: int = 400         # stage width
    batch: int = 128         # samples per task
    input: int = 49          # input size (Meta-World: 39 + 10-task one-hot)
    branch: int = -1         # the CoNAL tree's branch point for every task (-1: stages // 2)
    iters: int = 5           # weight steps per timed call
    reps: int = 7            # timed rounds (median)
    warmup: int = 1          # untimed rounds first
    seed: int = 0
    pro: bool = True         # also CoNAL-Pro's search cost per stage
    pro_tasks: list = field(default_factory=lambda: [4, 8, 16, 32])
    pro_steps: int = 10      # search steps per stage (the first of each stage untimed)
    pro_width: int = 64      # width of the synthetic problem's stages
    pro_reps: int = 3        # repetitions over all task counts (median)
    threads: int = 0         # torch threads (0: torch's default)
    out: str = ""            # also write the JSON here


TRUNK_TARGETS = {"stl_over_hps": 1.5, "conal_over_hps": 1.3, "conal_search_cn_over_hps": 4.0}


def bench_trunk(o: TrunkOptions) -> dict[str, Any]:
    from .search import TrunkSpec, make_method
    from .steps import weight_parameters, weight_step
    from .tree import Tree
    from .trunk import Trunk, linear_stage, mlp_stages
    from .update import GradientCombiner
    from .weighting import make_weighting

    T, L = o.tasks, o.stages
    tasks = tuple(f"task{i}" for i in range(T))
    stages, head = mlp_stages(o.input, [o.width] * L), linear_stage(o.width, 1, "identity")
    spec = TrunkSpec(tasks, stages, head)
    branch = o.branch if o.branch >= 0 else L // 2
    g = torch.Generator().manual_seed(o.seed)
    batch = (torch.randn(T, o.batch, o.input, generator=g), torch.randn(T, o.batch, 1, generator=g))

    def losses(net, b):
        return ((net(b[0]) - b[1]) ** 2).mean((1, 2))

    def case(net, conflict_noticed: bool, method=None) -> Callable[[], None]:
        opt = _adam(weight_parameters(net))
        combiner = GradientCombiner(make_weighting("ew", n_tasks=T), conflict_noticed=conflict_noticed)
        step = [0]

        def run() -> None:
            for _ in range(o.iters):
                weight_step(net, batch, losses, combiner, opt, step[0], method=method)
                step[0] += 1
        return run

    torch.manual_seed(o.seed)
    trees = {"hps": Tree.hps(tasks, L), "stl": Tree.stl(tasks, L),
             "conal": Tree.from_branch_points(tasks, L, [branch] * T)}
    cases = {k: case(Trunk(t, stages, head), False) for k, t in trees.items()}
    for name, cn in (("conal_search", False), ("conal_search_cn", True)):
        m = make_method("conal", spec, {}, o.seed)
        cases[name] = case(m.build(), cn, m)
    load0 = load_average()
    times = interleaved(cases, o.reps, o.warmup)
    res: dict[str, Any] = {
        "benchmark": "trunk",
        "what": (f"one weight step (forward, backward, fused Adam) of a {T}-task trunk: {L} linear+ReLU stages of "
                 f"width {o.width}, input {o.input}, {o.batch} samples per task (per-task inputs), a linear head per "
                 f"task, per-task MSE, EW; conal = Tree.from_branch_points with every task branching at stage "
                 f"{branch}; conal_search = CoNAL's search network (weight step only), _cn with the "
                 "conflict-noticed operation (per-task gradients from one backward: the capture path)"),
        "ms_per_step": {k: 1e3 * median(v) / o.iters for k, v in times.items()},
    }
    for k in cases:
        if k != "hps":
            res[f"{k}_over_hps"] = paired_ratio(times, k, "hps")
    res["targets"] = {k: f"<= {v}" for k, v in TRUNK_TARGETS.items()}
    res["met"] = {k: res[k] <= v for k, v in TRUNK_TARGETS.items()}
    if o.pro:
        res["conal_pro"] = _conal_pro_cost(o)
    res.update(_context(o, load0, times))
    return res


def _adam(params) -> torch.optim.Optimizer:
    try:
        return torch.optim.Adam(params, lr=1e-4, fused=True)
    except (RuntimeError, TypeError, ValueError):
        return torch.optim.Adam(params, lr=1e-4, foreach=True)


def _conal_pro_cost(o: TrunkOptions) -> dict[str, Any]:
    """Median over ``pro_reps`` runs of :func:`mtrl_arch.synthetic.conal_pro_stage_cost` (all T in each run)."""
    from .synthetic import conal_pro_stage_cost

    runs = [conal_pro_stage_cost(tuple(o.pro_tasks), steps=o.pro_steps, n_stages=4, d=o.pro_width, seed=o.seed)
            for _ in range(o.pro_reps)]
    per_t = {}
    for T in o.pro_tasks:
        stage_ms = [median([r[T]["conal_pro_ms"][s] for r in runs]) for s in range(4)]
        per_t[str(T)] = {"stage_ms": stage_ms, "mean_stage_ms": sum(stage_ms) / 4,
                         "conal_full_search_ms": median([r[T]["conal_ms"] for r in runs]),
                         "search_params": runs[0][T]["search_params"]}
    lo, hi = str(min(o.pro_tasks)), str(max(o.pro_tasks))
    return {
        "what": (f"ms per search step of CoNAL-Pro in each of its 4 stages (deep to shallow) on "
                 f"many_task_problem(T, d={o.pro_width}, 4 stages), {o.pro_steps} steps per stage, batch 64 per task; "
                 "conal_full_search_ms: CoNAL's full branch-point network on the same problem"),
        "per_tasks": per_t,
        "tasks_growth": int(hi) / int(lo),
        "conal_pro_growth": per_t[hi]["mean_stage_ms"] / per_t[lo]["mean_stage_ms"],
        "conal_growth": per_t[hi]["conal_full_search_ms"] / per_t[lo]["conal_full_search_ms"],
    }


def _context(o: Any, load0: list[float], times: dict[str, list[float]]) -> dict[str, Any]:
    return {"options": dataclasses.asdict(o), "seed": getattr(o, "seed", None), "machine": machine(),
            "versions": versions(), "load_average": {"start": load0, "end": load_average()},
            "raw_seconds": {k: [round(x, 6) for x in v] for k, v in times.items()},
            "method": "interleaved rounds, starting case rotating; medians; ratios paired within a round"}


# ---- printing -----------------------------------------------------------------------------------


def _flat(d: dict[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    out = []
    for k, v in d.items():
        if k in ("raw_seconds", "options", "what", "parts") or (k == "per_tasks"):
            continue
        if isinstance(v, dict):
            out += _flat(v, f"{prefix}{k}.")
        else:
            out.append((prefix + k, v))
    return out


def render(res: dict[str, Any]) -> str:
    lines = [f"# {res['benchmark']}: {res.get('what', '')}"]
    for k, v in _flat(res):
        lines.append(f"{k:<48} {v:.4g}" if isinstance(v, float) else f"{k:<48} {v}")
    pro = res.get("conal_pro")
    if pro:
        lines.append("CoNAL-Pro search cost per stage (ms per step, deep -> shallow):")
        for T, row in pro["per_tasks"].items():
            lines.append(f"  T={T:>3}: " + " ".join(f"{x:7.2f}" for x in row["stage_ms"])
                         + f"   CoNAL full network: {row['conal_full_search_ms']:.2f}")
    return "\n".join(lines)


BENCHES: dict[str, tuple[type, Callable[[Any], dict]]] = {"trunk": (TrunkOptions, bench_trunk)}


def main(what: str, json_flag: bool, options: list[str],
         benches: dict[str, tuple[type, Callable[[Any], dict]]] | None = None) -> int:
    """Run benchmark ``what`` of ``benches`` (name -> (options dataclass, function); default :data:`BENCHES`)."""
    reg = BENCHES if benches is None else benches
    if what not in reg:
        near = difflib.get_close_matches(what, reg, n=1)
        raise ConfigError(f"unknown benchmark {what!r}" + (f" (did you mean {near[0]!r}?)" if near else "")
                          + f"; choose from {', '.join(reg)}")
    cls, fn = reg[what]
    bad = [s for s in options if "=" not in s or s.startswith("=")]
    if bad:
        raise ConfigError(f"bench {what} options are key=value; got {bad[0]!r}")
    o = parse_options(cls, {k: parse_value(v) for k, v in (s.split("=", 1) for s in options)}, f"bench {what}")
    if getattr(o, "threads", 0):
        torch.set_num_threads(o.threads)
    res = fn(o)
    text = json.dumps(res, indent=1, default=str)
    if getattr(o, "out", ""):
        Path(o.out).parent.mkdir(parents=True, exist_ok=True)
        Path(o.out).write_text(text + "\n")
    print(text if json_flag else render(res))
    sys.stdout.flush()
    return 0
