"""RL benchmarks for ``mtrl-arch bench``: ``sac-update``, ``stl-vs-mt``, ``env``, ``gpu``.

Same rules as :mod:`mtrl_arch.bench`: cases interleaved in one process, warm-up left out,
medians over rounds, ratios paired within a round, machine / versions / load recorded.

FLOP count of one SAC update (``sac-update``), N = tasks x batch rows, P = sum of in x out
over one network's matmuls (P_a the actor, P_c one critic; P_a1, P_c1 their first layer)::

    FLOPs = 2 N [ 3 P_a + (P_a - P_a1) + 10 P_c + 2 (P_c - P_c1) ]

target: actor and both target critics forward (P_a + 2 P_c); critic step: both critics
forward, weight gradients, input gradients above the first layer (2 P_c + 2 P_c + 2 (P_c -
P_c1)); actor step: actor forward, both critics forward and their input gradients down to
the action (P_a + 2 P_c + 2 P_c), actor weight gradients and input gradients above its
first layer (P_a + P_a - P_a1). SB3 also computes the critics' weight gradients in the
actor step: + 2 P_c. Biases, activations, losses and optimiser steps are not counted.
"""
from __future__ import annotations

import dataclasses
import json
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal

import numpy as np
import torch

from mtrl_arch.bench import _context, interleaved, load_average, machine, median, paired_ratio, versions

SAC_TARGETS = {"speedup_vs_sb3": 1.3, "conal_speedup_vs_sb3": 1.15, "ours_fraction_of_matmul_peak": 0.85}


def _macs(dims: list[int]) -> int:
    return sum(a * b for a, b in zip(dims[:-1], dims[1:]))


def update_flops(obs: int, act: int, hidden: list[int], rows: int, sb3: bool = False) -> int:
    """Matmul FLOPs of one SAC update (the formula in the module docstring)."""
    pa, pc = _macs([obs, *hidden, 2 * act]), _macs([obs + act, *hidden, 1])
    pa1, pc1 = obs * hidden[0], (obs + act) * hidden[0]
    macs = 3 * pa + (pa - pa1) + 10 * pc + 2 * (pc - pc1) + (2 * pc if sb3 else 0)
    return 2 * rows * macs


FLOP_FORMULA = ("FLOPs/update = 2*N*(3*P_a + (P_a - P_a1) + 10*P_c + 2*(P_c - P_c1)) [+ 2*2*N*P_c for SB3: critic "
                "weight gradients in the actor step]; N = tasks*batch rows, P = sum of in*out of one network's matmuls "
                "(P_a actor, P_c one critic, P_x1 first layer); biases, activations, losses, Adam not counted")


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _arch_file(tasks: tuple[str, ...], n_stages: int, branch: int) -> str:
    """An arch.json with a CoNAL-shaped tree (every task branching at ``branch``) for actor and critic."""
    from mtrl_arch.tree import Tree

    tree = Tree.from_branch_points(tasks, n_stages, [branch] * len(tasks))
    path = Path(tempfile.mkdtemp(prefix="mtrl-bench-")) / "arch.json"
    path.write_text(json.dumps({"networks": {"actor": tree.to_dict(), "critic": tree.to_dict()}}))
    return str(path)


def _fill_replay(replay, seed: int) -> None:
    """A full replay of random transitions (actions in [-1, 1], no terminations)."""
    g = torch.Generator(device=replay.device).manual_seed(seed)
    replay.storage.normal_(generator=g)
    replay.action.uniform_(-1.0, 1.0, generator=g)
    replay.done.zero_()
    replay.pos, replay.size = 0, replay.capacity


# ---- sac-update ---------------------------------------------------------------------------------


@dataclass
class SacUpdateOptions:
    tasks: int = 10
    batch: int = 128                 # per task; SB3 gets tasks * batch
    hidden: list = field(default_factory=lambda: [400, 400, 400])
    obs: int = 49
    action: int = 4
    buffer: int = 20000              # transitions in total (pre-filled)
    grad_clip: float = 0.0           # 0: no clipping, as SB3 (MT10 configs clip at 1.0)
    branch: int = -1                 # the CoNAL tree's branch point (-1: stages // 2)
    search: bool = True              # also one CoNAL search step (weights + alphas), with and without CN
    compile: bool = False            # also our update with train.compile=true (compile time left out)
    compile_mode: str = "default"    # its train.compile_mode (reduce-overhead: CUDA graphs on a GPU)
    amp: bool = False                # also our update with train.amp=true (bf16 autocast)
    iters: int = 5                   # updates per timed call
    reps: int = 7
    warmup: int = 1
    profile: bool = False            # torch.profiler: where the time of one call of ours and SB3's goes
    device: str = "cpu"
    seed: int = 0
    threads: int = 0                 # torch threads (0: torch's default)
    out: str = ""


def _sb3_sac(o: SacUpdateOptions):
    import gymnasium as gym
    from stable_baselines3 import SAC
    from stable_baselines3.common.logger import configure

    class _Env(gym.Env):  # model.train() never steps it: only the spaces matter
        observation_space = gym.spaces.Box(-np.inf, np.inf, (o.obs,), np.float32)
        action_space = gym.spaces.Box(-1.0, 1.0, (o.action,), np.float32)

        def reset(self, seed=None, options=None):
            return np.zeros(o.obs, np.float32), {}

        def step(self, action):
            return np.zeros(o.obs, np.float32), 0.0, False, False, {}

    m = SAC("MlpPolicy", _Env(), policy_kwargs={"net_arch": list(o.hidden)}, batch_size=o.tasks * o.batch,
            buffer_size=o.buffer, learning_starts=0, device=o.device, seed=o.seed, verbose=0)
    m.set_logger(configure(None, []))
    rb, rng, n = m.replay_buffer, np.random.default_rng(o.seed), o.buffer
    rb.observations[:] = rng.standard_normal(rb.observations.shape)
    rb.next_observations[:] = rng.standard_normal(rb.next_observations.shape)
    rb.actions[:] = rng.uniform(-1, 1, rb.actions.shape)
    rb.rewards[:] = rng.standard_normal(rb.rewards.shape)
    rb.dones[:] = 0
    rb.pos, rb.full = 0, True
    assert rb.buffer_size == n
    return m


def _mtsac(o: SacUpdateOptions, method: str, *extra: str):
    from mtrl_arch.config import load_config

    from .sac import MTSAC

    cfg = load_config(None, [f"arch.method={method}", f"model.hidden={list(o.hidden)}", f"agent.batch_per_task={o.batch}",
                             f"agent.buffer_size={o.buffer}", f"train.grad_clip={o.grad_clip}", f"device={o.device}",
                             f"seed={o.seed}", "wandb.mode=disabled", *extra])
    agent = MTSAC(tuple(f"task{i}" for i in range(o.tasks)), o.obs, o.action, cfg, o.device)
    _fill_replay(agent.replay, o.seed)
    return agent


def bench_sac_update(o: SacUpdateOptions) -> dict[str, Any]:
    from .rl_loop import keep_freed_memory

    L = len(o.hidden)
    branch = o.branch if o.branch >= 0 else L // 2
    tasks = tuple(f"task{i}" for i in range(o.tasks))
    agents = {"ours": _mtsac(o, "hps"), "ours_conal": _mtsac(o, "manual", f"arch.options.path={_arch_file(tasks, L, branch)}")}
    late = -(-L // 2)  # with an odd stage count "halfway" has two readings: both are measured
    if o.branch < 0 and late != branch:
        agents[f"ours_conal_b{late}"] = _mtsac(o, "manual", f"arch.options.path={_arch_file(tasks, L, late)}")
    if o.search:
        agents["conal_search"] = _mtsac(o, "conal", "arch.search_steps=1000000000")
        agents["conal_search_cn"] = _mtsac(o, "conal", "arch.search_steps=1000000000", "arch.conflict_noticed=true")
    if o.compile:
        agents["ours_compiled"] = _mtsac(o, "hps", "train.compile=true", f"train.compile_mode={o.compile_mode}")
    if o.amp:
        agents["ours_amp"] = _mtsac(o, "hps", "train.amp=true")
    sb3 = _sb3_sac(o)
    N = o.tasks * o.batch

    def run_agent(agent) -> Callable[[], None]:
        def run() -> None:
            for _ in range(o.iters):
                agent.train_step()
            _sync(o.device)
        return run

    def run_sb3() -> None:
        sb3.train(gradient_steps=o.iters, batch_size=N)
        _sync(o.device)

    # the machine's matmul rate, measured in the same rounds: the update's dominant shape and a large square one
    w = o.hidden[0]
    mm = {"matmul_update_shape": (N, w, w, 100), "matmul_2048": (2048, 2048, 2048, 3)}
    mats = {k: (torch.randn(m, kk, device=o.device), torch.randn(kk, n, device=o.device)) for k, (m, kk, n, _) in mm.items()}

    def run_mm(k: str) -> Callable[[], None]:
        a, b = mats[k]

        def run() -> None:
            for _ in range(mm[k][3]):
                torch.mm(a, b)
            _sync(o.device)
        return run

    cases: dict[str, Callable[[], None]] = {"sb3": run_sb3, **{k: run_agent(a) for k, a in agents.items()},
                                            **{k: run_mm(k) for k in mm}}
    for k in agents:  # compile / first-call costs before the timed warm-up
        if k in ("ours_compiled",):
            for _ in range(3):
                agents[k].train_step()
    load0 = load_average()
    times = interleaved(cases, o.reps, o.warmup)
    ups = {k: o.iters / median(times[k]) for k in ["sb3", *agents]}
    flops, flops_sb3 = update_flops(o.obs, o.action, list(o.hidden), N), update_flops(o.obs, o.action, list(o.hidden), N, True)
    mm_rate = {k: 2 * m * kk * n * r / median(times[k]) / 1e9 for k, (m, kk, n, r) in mm.items()}
    peak_case = max(mm_rate, key=mm_rate.get)
    m_, k_, n_, r_ = mm[peak_case]
    # ours vs the matmul rate in the same round
    frac_paired = statistics.median((flops * o.iters / t) / (2 * m_ * k_ * n_ * r_ / tm)
                                    for t, tm in zip(times["ours"], times[peak_case]))
    res: dict[str, Any] = {
        "benchmark": "sac-update",
        "what": (f"gradient updates per second: SB3 SAC (net_arch {list(o.hidden)}, batch {N}, obs {o.obs}, action "
                 f"{o.action}, model.train(gradient_steps={o.iters})) vs our MTSAC ({o.tasks} tasks x {o.batch}, same "
                 f"widths): ours = HPS trunks, ours_conal = a derived CoNAL tree (every task branching at stage {branch}; "
                 f"_b{late}: at stage {late}), "
                 "conal_search(_cn) = one CoNAL search step (weight steps + alpha steps, with the conflict-noticed "
                 f"operation); replays pre-filled with random data; grad_clip={o.grad_clip}"),
        "sb3_updates_per_s": ups["sb3"], "ours_updates_per_s": ups["ours"],
        "speedup_vs_sb3": paired_ratio(times, "sb3", "ours"),
        "conal_updates_per_s": ups["ours_conal"], "conal_speedup_vs_sb3": paired_ratio(times, "sb3", "ours_conal"),
    }
    for k in agents:
        if k not in ("ours", "ours_conal"):
            res[f"{k}_updates_per_s"] = ups[k]
            res[f"{k}_speedup_vs_sb3"] = paired_ratio(times, "sb3", k)
    res.update({
        "flop_formula": FLOP_FORMULA, "gflop_per_update_ours": flops / 1e9, "gflop_per_update_sb3": flops_sb3 / 1e9,
        "ours_gflops": flops * ups["ours"] / 1e9, "sb3_gflops": flops_sb3 * ups["sb3"] / 1e9,
        "conal_gflops": flops * ups["ours_conal"] / 1e9,
        "matmul_gflops": mm_rate[peak_case], "matmul_gflops_by_shape": mm_rate,
        "ours_fraction_of_matmul_peak": frac_paired,
        "sb3_fraction_of_matmul_peak": flops_sb3 * ups["sb3"] / 1e9 / mm_rate[peak_case],
        "allocator_keeps_freed_memory": keep_freed_memory(),  # process-wide: SB3 runs with it too
    })
    res["targets"] = {k: f">= {v}" for k, v in SAC_TARGETS.items()}
    res["met"] = {k: res[k] >= v for k, v in SAC_TARGETS.items()}
    if o.profile:
        res["profile"] = {"ours": _profile(cases["ours"], o.iters), "sb3": _profile(run_sb3, o.iters)}
    res.update(_context(o, load0, times))
    return res


def _profile(fn: Callable[[], None], per_call: int, top: int = 14) -> list[dict[str, Any]]:
    """torch.profiler's operators by self CPU time for one call: ms per update and share."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as p:
        fn()
    ev = sorted(p.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in ev)
    return [{"op": e.key, "self_ms_per_update": e.self_cpu_time_total / 1e3 / per_call,
             "share": e.self_cpu_time_total / total, "calls_per_update": e.count / per_call} for e in ev[:top]]


# ---- stl-vs-mt ----------------------------------------------------------------------------------


@dataclass
class StlVsMtOptions:
    steps: int = 400                 # env steps per task (vector steps), warm-up included
    warmup: int = 50                 # random-action steps before updates start (both)
    chunk: int = 50                  # env steps per task between switches of the two runs
    hidden: list = field(default_factory=lambda: [400, 400, 400])
    batch: int = 128                 # per task: each SB3 SAC's batch, and ours per task
    branch: int = -1                 # the CoNAL tree's branch point (-1: stages // 2)
    device: str = "cpu"              # both sides' networks (the environments run on the CPU)
    seed: int = 0
    threads: int = 0                 # torch threads (0: torch's default)
    out: str = ""


def bench_stl_vs_mt(o: StlVsMtOptions) -> dict[str, Any]:
    from stable_baselines3 import SAC

    from mtrl_arch.config import load_config
    from mtrl_arch.envs.metaworld import MT10_TASKS, MetaWorldMT, make_benchmark, make_task_env

    from .sac import MTSAC

    tasks, L = MT10_TASKS, len(o.hidden)
    T, branch = len(tasks), o.branch if o.branch >= 0 else len(o.hidden) // 2
    bench_obj = make_benchmark("MT10", o.seed)
    env = MetaWorldMT("MT10", tasks, seed=o.seed, benchmark_obj=bench_obj)
    cfg = load_config(None, ["arch.method=manual", f"arch.options.path={_arch_file(tasks, L, branch)}",
                             f"model.hidden={list(o.hidden)}", f"agent.batch_per_task={o.batch}",
                             f"agent.buffer_size={T * o.steps}", f"train.warmup_steps={o.warmup}",
                             "train.updates_per_step=1", "eval.every_env_steps=0", "train.log_every=1000000000",
                             "train.checkpoint_every_env_steps=0", f"device={o.device}", f"seed={o.seed}", "wandb.mode=disabled"])
    ours = MTSAC.from_env(env, cfg, o.device)
    models = [SAC("MlpPolicy", make_task_env("MT10", t, o.seed, benchmark_obj=bench_obj),
                  policy_kwargs={"net_arch": list(o.hidden)}, batch_size=o.batch, buffer_size=o.steps,
                  learning_starts=o.warmup, train_freq=1, gradient_steps=1, seed=o.seed * 1000 + i, device=o.device,
                  verbose=0)
              for i, t in enumerate(tasks)]
    n_chunks = max(1, o.steps // o.chunk)
    cases = {"mt_ours": lambda: ours.learn(o.chunk * T),
             "stl_sb3": lambda: [m.learn(o.chunk, reset_num_timesteps=False, progress_bar=False) for m in models]}
    load0 = load_average()
    try:
        times = interleaved(cases, n_chunks, warmup=0)
    finally:
        env.close()
        for m in models:
            m.get_env().close()
    train_chunks = [i for i in range(n_chunks) if i * o.chunk >= o.warmup]
    sums = {k: sum(v) for k, v in times.items()}
    train = {k: sum(v[i] for i in train_chunks) for k, v in times.items()}
    steps_done = n_chunks * o.chunk
    res = {
        "benchmark": "stl-vs-mt",
        "what": (f"wall time for {steps_done} env steps per task on real Meta-World MT10 envs (the first {o.warmup} with "
                 f"random actions, then one update per env step): (a) ten SB3 SACs, one per task (39-d obs, net_arch "
                 f"{list(o.hidden)}, batch {o.batch}), (b) our MTSAC on the 10-task vector env with a derived CoNAL tree "
                 f"(every task branching at stage {branch}), {T}x{o.batch} per update; the two runs alternate every "
                 f"{o.chunk} env steps per task"),
        "stl_seconds": sums["stl_sb3"], "mt_seconds": sums["mt_ours"],
        "mt_speedup_over_stl": sums["stl_sb3"] / sums["mt_ours"],
        "mt_speedup_over_stl_training_phase": train["stl_sb3"] / train["mt_ours"] if train_chunks else None,
        "mt_speedup_paired_median": statistics.median(a / b for a, b in zip(times["stl_sb3"], times["mt_ours"])),
        "stl_env_steps_per_s": steps_done * T / sums["stl_sb3"], "mt_env_steps_per_s": steps_done * T / sums["mt_ours"],
        "updates": {"mt_ours": ours.n_updates, "stl_sb3_each": int(models[0]._n_updates)},
        "target": {"mt_speedup_over_stl": ">= 1.8"},
        "met": {"mt_speedup_over_stl": sums["stl_sb3"] / sums["mt_ours"] >= 1.8},
    }
    res.update(_context(o, load0, times))
    return res


# ---- env ----------------------------------------------------------------------------------------


@dataclass
class EnvOptions:
    chunk: int = 50                  # vector steps per timed call
    reps: int = 5
    train_steps: int = 50            # timed vector steps of a training run per round
    train_warmup: int = 20           # random-action steps before the timed training
    hidden: list = field(default_factory=lambda: [400, 400, 400])
    batch: int = 128
    branch: int = -1
    seed: int = 0
    threads: int = 0                 # torch threads (0: torch's default)
    out: str = ""


def bench_env(o: EnvOptions) -> dict[str, Any]:
    from mtrl_arch.config import load_config
    from mtrl_arch.envs.metaworld import MT10_TASKS, MetaWorldMT, make_benchmark

    from .sac import MTSAC

    tasks, T, L = MT10_TASKS, len(MT10_TASKS), len(o.hidden)
    branch = o.branch if o.branch >= 0 else L // 2
    bench_obj = make_benchmark("MT10", o.seed)
    envs = {v: MetaWorldMT("MT10", tasks, seed=o.seed, vector=v, benchmark_obj=bench_obj) for v in ("sync", "async")}
    rng = np.random.default_rng(o.seed)
    for e in envs.values():
        e.reset(seed=o.seed)

    def stepper(e) -> Callable[[], None]:
        def run() -> None:
            for _ in range(o.chunk):
                e.step(rng.uniform(-1, 1, (T, 4)).astype(np.float32))
        return run

    # a training run on the sync env: where its wall time goes
    cfg = load_config(None, ["arch.method=manual", f"arch.options.path={_arch_file(tasks, L, branch)}",
                             f"model.hidden={list(o.hidden)}", f"agent.batch_per_task={o.batch}", "agent.buffer_size=100000",
                             f"train.warmup_steps={o.train_warmup}", "train.updates_per_step=1", "eval.every_env_steps=0",
                             "train.log_every=1000000000", "train.checkpoint_every_env_steps=0", "device=cpu", f"seed={o.seed}",
                             "wandb.mode=disabled"])
    train_env = MetaWorldMT("MT10", tasks, seed=o.seed, benchmark_obj=bench_obj)
    agent = MTSAC.from_env(train_env, cfg, "cpu")
    spent: dict[str, float] = {"env": 0.0, "update": 0.0, "act": 0.0, "replay_add": 0.0}
    _timed(train_env, "step", "env", spent)
    _timed(train_env, "reset", "env", spent)
    _timed(agent, "train_step", "update", spent)
    _timed(agent, "act", "act", spent)
    _timed(agent.replay, "add", "replay_add", spent)
    agent.learn(o.train_warmup * T + T)  # random actions, then the first update: left out
    shares: list[dict[str, float]] = []

    def train() -> None:
        for k in spent:
            spent[k] = 0.0
        t0 = time.perf_counter()
        agent.learn(o.train_steps * T)
        wall = time.perf_counter() - t0
        row = {k: v / wall for k, v in spent.items()}
        row["outside_env_and_update"] = 1.0 - row["env"] - row["update"]
        row["wall_s"] = wall
        shares.append(row)

    cases = {"sync": stepper(envs["sync"]), "async": stepper(envs["async"]), "train": train}
    load0 = load_average()
    try:
        times = interleaved(cases, o.reps, warmup=1)
    finally:
        for e in (*envs.values(), train_env):
            e.close()
    shares = shares[1:]  # the warm-up round's
    share = {k: statistics.median(r[k] for r in shares) for k in shares[0]}
    res = {
        "benchmark": "env",
        "what": (f"MT10 env steps per second (10 sub-envs, random actions, {o.chunk} vector steps per call) with "
                 "gymnasium's SyncVectorEnv and AsyncVectorEnv (one process per task); and a training run on the sync "
                 f"env (our MTSAC, derived CoNAL tree, {T}x{o.batch} per update, one update per vector step): the share "
                 "of its wall time in env steps, updates, acting, replay writes and the rest of the loop"),
        "sync_env_steps_per_s": o.chunk * T / median(times["sync"]),
        "async_env_steps_per_s": o.chunk * T / median(times["async"]),
        "async_over_sync": paired_ratio(times, "sync", "async"),
        "train_step_share": share,
        "outside_env_and_update_share": share["outside_env_and_update"],
        "target": {"outside_env_and_update_share": "< 0.10"},
        "met": {"outside_env_and_update_share": share["outside_env_and_update"] < 0.10},
    }
    res.update(_context(o, load0, times))
    return res


def _timed(obj: Any, name: str, key: str, spent: dict[str, float]) -> None:
    """Wrap ``obj.name`` (an instance attribute shadows the method) to add its wall time to ``spent[key]``."""
    fn = getattr(obj, name)

    def wrapper(*args, **kwargs):
        t0 = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            spent[key] += time.perf_counter() - t0

    setattr(obj, name, wrapper)


# ---- gpu ----------------------------------------------------------------------------------------


@dataclass
class GpuCheckOptions:
    device: str = "auto"             # auto: cuda when available, else cpu (where dry is forced)
    dry: bool | Literal["auto"] = "auto"  # auto: dry on a CPU; true: tiny sizes (a test of the whole check); false: full
    run_env_steps: int = 100_000     # the timed mt10_hps run (env steps summed over tasks)
    vector: str = "async"            # its env.vector: async steps the ten tasks in ten processes
    eval_episodes: int = 5           # its final evaluation (episodes per task), timed and scaled to the protocol's 50
    budget_env_steps: int = 20_000_000  # the MT10 budget the projection is for
    eval_every_env_steps: int = 200_000  # the reference's evaluation cadence, for the projection
    reps: int = 7                    # sac-update rounds
    run_dir: str = ""                # the timed run's directory (default: a temporary one, removed)
    threads: int = 0
    out: str = ""


def bench_gpu(o: GpuCheckOptions) -> dict[str, Any]:
    """The GPU check: sac-update (SB3, ours eager, ours compiled with CUDA graphs), stl-vs-mt, a timed mt10_hps run.

    Writes one JSON (``out=``) with each ratio against its target and the projected wall time
    of the 20M-step MT10 budget at the measured rates. Dry mode (forced without a GPU) runs
    every part at tiny sizes on the CPU, without torch.compile, to check the script itself;
    its numbers mean nothing.
    """
    import shutil
    import subprocess
    import sys

    device = ("cuda" if torch.cuda.is_available() else "cpu") if o.device == "auto" else o.device
    dry = o.dry is True or device == "cpu"
    t_start = time.perf_counter()
    parts: dict[str, float] = {}

    t0 = time.perf_counter()
    if dry:
        su = bench_sac_update(SacUpdateOptions(tasks=3, batch=8, hidden=[32, 32], buffer=500, search=False, reps=2,
                                               iters=2, device=device, grad_clip=1.0))
    else:
        su = bench_sac_update(SacUpdateOptions(device=device, search=False, compile=True, compile_mode="reduce-overhead",
                                               reps=o.reps, grad_clip=1.0))
    parts["sac_update"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    sm = bench_stl_vs_mt(StlVsMtOptions(steps=20, warmup=10, chunk=10, hidden=[32, 32], batch=8, device=device) if dry
                         else StlVsMtOptions(device=device))
    parts["stl_vs_mt"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    run_dir = Path(o.run_dir) if o.run_dir else Path(tempfile.mkdtemp(prefix="mtrl-gpu-check-")) / "run"
    over = (["env.tasks=[reach-v3,push-v3]", "model.hidden=[32,32]", "agent.batch_per_task=8", "train.total_env_steps=1000",
             "train.warmup_steps=100", "train.log_every=200", "eval.final_episodes_per_task=1", "env.vector=sync"] if dry
            else [f"train.total_env_steps={o.run_env_steps}", f"eval.final_episodes_per_task={o.eval_episodes}",
                  "train.log_every=10000", f"env.vector={o.vector}"])
    cmd = [sys.executable, "-m", "mtrl_arch.cli", "train", "mt10_hps", *over, f"device={device}", "eval.every_env_steps=0",
           "train.checkpoint_every_env_steps=0", "wandb.mode=disabled", f"run_dir={run_dir}", "--no-progress"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    parts["mt10_run"] = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"the timed mt10_hps run failed (exit {proc.returncode}): {proc.stderr.strip()[-800:]}")
    from mtrl_arch.logger import read_metrics

    lines = read_metrics(run_dir)
    train = [r for r in lines if "time/env_steps_per_s" in r]
    # steady state: the log windows that begin with updates already running (past the warm-up)
    windows = [b for a, b in zip(train, train[1:]) if a.get("train/n_updates", 0) > 0]
    env_rate = statistics.median(r["time/env_steps_per_s"] for r in windows) if windows else float("nan")
    upd_rate = statistics.median(r["time/updates_per_s"] for r in windows) if windows else float("nan")
    ev = [r for r in lines if "time/eval_seconds" in r][-1]
    eval_s_50 = ev["time/eval_seconds"] * 50 / ev["eval/episodes_per_task"]  # episodes of equal length when few succeed
    n_evals = o.budget_env_steps // o.eval_every_env_steps
    train_h = o.budget_env_steps / env_rate / 3600
    total_h = train_h + n_evals * eval_s_50 / 3600
    if not o.run_dir:
        shutil.rmtree(run_dir.parent, ignore_errors=True)

    targets = {"speedup_vs_sb3": 5.0, "projected_hours_20M": 4.0}
    res = {
        "benchmark": "gpu",
        "what": ("GPU check: bench sac-update (SB3 vs ours eager vs ours compiled, reduce-overhead), bench stl-vs-mt, "
                 f"and a timed mt10_hps run ({'dry: tiny sizes on the CPU, numbers meaningless' if dry else o.run_env_steps}"
                 " env steps); projection of the MT10 budget from the run's steady-state rate plus the reference's "
                 "evaluations (every 200k env steps, 50 episodes per task, timed at eval_episodes and scaled)"),
        "device": torch.cuda.get_device_name(0) if device.startswith("cuda") else "cpu", "dry": dry,
        "sb3_updates_per_s": su["sb3_updates_per_s"], "ours_updates_per_s": su["ours_updates_per_s"],
        "speedup_vs_sb3": su["speedup_vs_sb3"],
        "compiled_updates_per_s": su.get("ours_compiled_updates_per_s"),
        "compiled_speedup_vs_sb3": su.get("ours_compiled_speedup_vs_sb3"),
        "mt_speedup_over_stl": sm["mt_speedup_over_stl"],
        "run_env_steps_per_s": env_rate, "run_updates_per_s": upd_rate,
        "run_eval_seconds_50_episodes": eval_s_50,
        "projected_hours_training_only": train_h, "projected_hours_20M": total_h,
        "seconds": {**parts, "total": time.perf_counter() - t_start},
        "targets": {k: (f">= {v}" if k == "speedup_vs_sb3" else f"<= {v}") for k, v in targets.items()},
    }
    best = max(x for x in (res["speedup_vs_sb3"], res["compiled_speedup_vs_sb3"]) if x is not None)
    res["met"] = {"speedup_vs_sb3": best >= targets["speedup_vs_sb3"],
                  "projected_hours_20M": total_h <= targets["projected_hours_20M"]}
    res["parts"] = {"sac_update": {k: v for k, v in su.items() if k != "raw_seconds"},
                    "stl_vs_mt": {k: v for k, v in sm.items() if k != "raw_seconds"}}
    res.update({"options": dataclasses.asdict(o), "machine": machine(), "versions": versions()})
    return res


BENCHES = {"sac-update": (SacUpdateOptions, bench_sac_update), "stl-vs-mt": (StlVsMtOptions, bench_stl_vs_mt),
           "env": (EnvOptions, bench_env), "gpu": (GpuCheckOptions, bench_gpu)}
