"""The MT-SAC learner that :class:`mtrl_arch.loop.Run` drives: act, store, update; its log lines and evaluation.

The environment is duck-typed (``tasks``, ``reset``, ``step``, ``pop_finished_episodes``,
``evaluate``) so agents/ never imports envs/. Episodes of all tasks run in lockstep
(fixed-length episodes); at every episode boundary the loop resets the environments
with a seed derived from the run seed and the episode index.

The loop's period is one vector step (every task's env steps once); its progress counts env steps.

Exact resume: a checkpoint holds everything the run's future depends on (networks,
targets, optimisers, architecture parameters and search phase, per-task alpha, replay,
every RNG, step counters; the loop adds the open log window and the metrics file's length) plus
the actions taken since the episode's seeded reset. Meta-World's dynamics are
deterministic, so a resumed run rebuilds the environment's exact mid-episode state by
resetting with the episode's seed and replaying those actions (at most one episode of
steps), instead of pickling MuJoCo state (85 MB for two tasks). A resumed CPU run is
bit-identical to an uninterrupted one; only wall-clock fields (``time/*``) differ.

Data-parallel (``torchrun``, :mod:`mtrl_arch.distributed`): every rank steps its own vector
env of all the run's tasks (episode seeds, warm-up actions, exploration noise and replay
draws from ``distributed.rank_seed``), keeps its own replay and takes its share of each
update's batch (see :class:`~mtrl_arch.agents.sac.MTSAC`). The ranks run in lockstep: one
update per vector step of the job, which is ``world_size x T`` env steps, so
``num_timesteps`` and every ``*_env_steps`` setting count env steps over all ranks. Rank 0
alone evaluates and writes (``run_dir``, logger and ``evaluate`` are None elsewhere). A checkpoint holds rank 0's state; resuming
needs the same number of processes, and since the other ranks' replays and episodes are not
in it, every rank collects ``train.warmup_steps`` vector steps with the current policy
before the updates go on (ranks > 0 start fresh episodes and fresh random streams): such a
resume is not exact.
"""
from __future__ import annotations

import ctypes
import os
import sys
import time
from typing import Any, Callable

import numpy as np
import torch

from mtrl_arch import distributed
from mtrl_arch.checkpoint import NonFiniteError, assert_finite, rng_state, set_rng_state
from mtrl_arch.loop import Cadence

__all__ = ["RLRun", "NonFiniteError", "episode_seed", "shared_state", "eval_lines"]

# what a checkpoint (rank 0's) holds that belongs to rank 0 alone: kept from the other ranks on a data-parallel resume
RANK_LOCAL = ("rng", "np_rng", "episode_actions", "window", "logger_pos")


def shared_state(d: dict, agent_local: tuple[str, ...]) -> dict:
    """A checkpoint without its rank-local parts (the agent's: ``MTSAC.RANK_LOCAL``): what every rank of a
    data-parallel run resumes from."""
    return {**{k: v for k, v in d.items() if k not in RANK_LOCAL},
            "agent": {k: v for k, v in d["agent"].items() if k not in agent_local}}


def episode_seed(seed: int, episode: int) -> int:
    return (seed * 1_000_003 + episode * 7919) % (2**31 - 1)


_FREED_MEMORY_KEPT: bool | None = None


def keep_freed_memory() -> bool:
    """Make glibc keep freed heap memory in the process instead of returning it to the OS.

    By default glibc serves large blocks with fresh mmaps and trims the heap top above a
    few MB, so the ~100 MB of activations and gradients that one SAC update allocates and
    frees are page-faulted in again (and zeroed by the kernel) at every update: measured as
    about a third of the non-matmul time of an update on a 2-core CPU. Keeping them costs
    the process its peak memory, which it needs anyway. Process-wide, once; the same as
    ``MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=1073741824``. Set
    ``MTRL_ARCH_MALLOC=default`` to leave glibc as it is. Returns whether it is in effect.
    """
    global _FREED_MEMORY_KEPT
    if _FREED_MEMORY_KEPT is None:
        _FREED_MEMORY_KEPT = False
        if sys.platform.startswith("linux") and os.environ.get("MTRL_ARCH_MALLOC", "keep") != "default":
            try:
                libc = ctypes.CDLL("libc.so.6")
                M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
                _FREED_MEMORY_KEPT = bool(libc.mallopt(M_MMAP_THRESHOLD, 32 << 20) == 1
                                          and libc.mallopt(M_TRIM_THRESHOLD, 1 << 30) == 1)
            except (OSError, AttributeError):  # not glibc
                pass
    return _FREED_MEMORY_KEPT


class RLRun:
    """The learner (:mod:`mtrl_arch.loop`'s protocol) around an :class:`~mtrl_arch.agents.sac.MTSAC` and its env."""
    unit = "env-step"
    eval_everywhere = False  # data-parallel: rank 0 alone evaluates

    def __init__(self, agent: Any, env: Any, on_arch: Callable[[dict], None] | None = None,
                 evaluate: Callable[[Callable, int | None], dict] | None = None):
        self.agent = self.model = agent
        self.env, self.evaluate_fn, self.on_arch = env, evaluate, on_arch
        self.cfg = agent.cfg
        self.T = len(agent.tasks)
        self.world = distributed.world_size()  # data-parallel: ranks stepping envs in lockstep
        self.seed = distributed.rank_seed(self.cfg.seed)  # episode seeds and warm-up actions of this rank
        self.vector_step = 0
        self.closed = 0  # vector steps whose period ended (evaluation, line, checkpoint); one less after an abandoned evaluation
        self.episode = 0
        self.n_vector = 0
        self.last_eval: dict[str, float] = {}
        self.np_rng = np.random.default_rng(self.seed)
        self._seeded = False  # the torch RNG: seeded at the first learn() of a fresh run
        self.episode_len = int(getattr(env, "max_episode_steps", None) or 500)
        self.obs = None
        self._ep_actions: list[np.ndarray] = []  # actions since the episode's seeded reset (replayed on resume)
        self._no_update_until = 0  # after a resume without replay: collect before updating

    # ---- progress ------------------------------------------------------------------------------------------
    @property
    def num_timesteps(self) -> int:
        return self.vector_step * self.T * self.world

    def progress(self) -> int:
        return self.num_timesteps

    def total(self) -> int:
        return self.n_vector * self.T * self.world

    def finished(self) -> bool:
        return self.vector_step >= self.n_vector

    def periods(self) -> int:
        return self.vector_step

    def period_pending(self) -> bool:
        return self.closed < self.vector_step

    @property
    def searching(self) -> bool:
        return self.agent.searching

    def search_over(self) -> bool:
        return self.vector_step >= self.cfg.arch.search_steps

    def cadence(self) -> Cadence:
        # exact at any step: a resume replays the episode's actions (see the module docstring)
        cfg, TW = self.cfg, self.T * self.world
        return Cadence(log=max(1, cfg.train.log_every // TW),
                       eval=cfg.eval.every_env_steps // TW if cfg.eval.every_env_steps and self.evaluate_fn else 0,
                       checkpoint=-(-cfg.train.checkpoint_every_env_steps // TW) if cfg.train.checkpoint_every_env_steps else 0)

    # ---- state --------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        mode = self.cfg.train.save_replay  # auto: on while the replay is under 1 GiB
        replay = mode == "always" or mode == "auto" and self.agent.replay_bytes() <= 2**30
        return {"vector_step": self.vector_step, "closed": self.closed, "episode": self.episode, "rng": rng_state(),
                "np_rng": self.np_rng.bit_generator.state, "last_eval": self.last_eval,
                "episode_actions": torch.from_numpy(np.stack(self._ep_actions)) if self._ep_actions else None,
                "no_update_until": self._no_update_until, "world_size": self.world,
                "agent": self.agent.state_dict(with_replay=replay)}

    def load_state_dict(self, d: dict) -> None:
        """Resume from ``d``; on ranks > 0 of a data-parallel run ``d`` lacks the rank-local parts
        (:data:`RANK_LOCAL`), which are started afresh."""
        from mtrl_arch.config import ConfigError

        world = d.get("world_size", 1)
        if world != self.world:  # counters, episodes and replays are per rank: the job's shape is part of the state
            how = f"under torchrun with {world} processes" if world > 1 else "in one process (without torchrun)"
            raise ConfigError(f"the checkpoint at env step {d['vector_step'] * self.T * world} was written by {world} "
                              f"process(es), this run has {self.world}; resume it {how}")
        self.agent.load_state_dict(d["agent"])
        self.vector_step, self.episode, self.last_eval = d["vector_step"], d["episode"], d["last_eval"]
        self.closed = d.get("closed", self.vector_step)
        if "np_rng" in d:
            self.np_rng.bit_generator.state = d["np_rng"]
        acts = d.get("episode_actions")
        self._ep_actions = list(np.asarray(acts)) if acts is not None else []  # a tensor (format 1: an array)
        self.obs = None  # begin() rebuilds the env state: seeded reset + the episode's actions
        self._no_update_until = d.get("no_update_until", 0)
        lost = "replay" not in d["agent"] or self.world > 1  # data-parallel: only rank 0's replay was saved
        if lost and self.vector_step > self.cfg.train.warmup_steps:
            # refill with the current policy before updating; every rank pauses, since updates are collective
            n = max(self.cfg.train.warmup_steps, 1)
            self._no_update_until = self.vector_step + n
            why = ("only rank 0's replay and episode are in the checkpoint" if self.world > 1
                   else f"the checkpoint holds no replay (train.save_replay={self.cfg.train.save_replay})")
            if distributed.is_main():
                print(f"warning: {why}; refilling it for {n} vector steps before updating (this resume is not exact)",
                      file=sys.stderr)
        self._seeded = True
        if "rng" in d:
            set_rng_state(d["rng"])
        else:  # a rank > 0: fresh streams of its own, not a repeat of those it started with
            s = episode_seed(self.seed, self.vector_step)
            torch.manual_seed(s)
            self.np_rng = np.random.default_rng(s)
            self.agent.reseed(s + 1)

    def finite(self, window: Any) -> None:
        """NonFiniteError naming the first non-finite loss of the loop's window (step, update, task) or parameter."""
        for k in (k for k in self.agent.STATS if k in window.keys()):
            steps, v = window.values(k)  # [n, T]: one row per update
            bad = ~torch.isfinite(v)
            if bool(bad.any()):
                i, t = (int(x) for x in bad.nonzero()[0]) if v.dim() > 1 else (int(bad.nonzero()[0]), 0)
                raise NonFiniteError(f"non-finite {k} (task {self.agent.tasks[t]}) at env step {steps[i]}, "
                                     f"update {self.agent.n_updates - len(steps) + i}")
        assert_finite(self.agent.named_tensors(), f"at env step {self.num_timesteps}")

    def _restore_env(self) -> None:
        """Seeded reset of the current episode; on resume, replay its actions to rebuild the exact env state
        (ranks > 0 of a data-parallel resume have none: they start a fresh episode, cut at the boundary)."""
        self.obs = self.env.reset(seed=episode_seed(self.seed, self.episode))
        for a in self._ep_actions:
            self.obs = self.env.step(a)[0]
        self.env.pop_finished_episodes()  # none end mid-episode; any already counted are in the checkpoint

    # ---- steps ---------------------------------------------------------------------------------------------
    def begin(self, total_env_steps: int) -> None:
        self.n_vector = total_env_steps // (self.T * self.world)
        if not self._seeded:  # a fresh run: this rank's exploration noise (a resume restores the checkpoint's state)
            torch.manual_seed(self.seed)
            self._seeded = True
        if self.agent.device.type == "cpu":
            keep_freed_memory()  # process-wide allocator setting, made by the process's loop (see its docstring)
        if self.obs is None or self.vector_step % self.episode_len == 0:
            self._restore_env()
        self._t_log, self._steps_log, self._updates_log = time.perf_counter(), self.vector_step, self.agent.n_updates

    def train_step(self, stop: Callable | None = None) -> list[dict]:
        """One vector step of every task's env, then its updates; the updates' and finished episodes' statistics."""
        cfg, agent, env = self.cfg, self.agent, self.env
        if self.vector_step < cfg.train.warmup_steps:
            action = self.np_rng.uniform(-1.0, 1.0, size=(self.T, agent.action_dim)).astype(np.float32)
        else:
            action = agent.act(self.obs, deterministic=False)
            if not np.isfinite(action).all():  # never feed NaN to the simulator; name the cause
                raise NonFiniteError(f"non-finite action at env step {self.num_timesteps}")
        next_obs, reward, terminated, truncated, info = env.step(action)
        agent.store(self.obs, action, reward, info.get("final_obs", next_obs), terminated)
        self.obs = next_obs
        self._ep_actions.append(action)
        self.vector_step += 1
        out = [{f"episode_return/{e['task']}": float(e["return"]), f"episode_success/{e['task']}": float(e["success"])}
               for e in env.pop_finished_episodes()]
        if self.vector_step % self.episode_len == 0:  # episode boundary: seeded resets
            self.episode += 1
            self._ep_actions.clear()
            self.obs = env.reset(seed=episode_seed(self.seed, self.episode))
        if self.vector_step > cfg.train.warmup_steps and self.vector_step > self._no_update_until:
            out += [agent.train_step() for _ in range(_updates_now(cfg.train.updates_per_step, self.vector_step))]
        return out

    def finish_search(self) -> None:
        trees = self.agent.finish_search()
        if self.on_arch is not None:
            self.on_arch(trees)

    def end_period(self, evaluation: dict, means: dict | None) -> dict:
        """The ``train/*`` line from the loop's window means (None between lines: {})."""
        self.closed = self.vector_step
        if means is None:
            return {}
        now = time.perf_counter()
        out: dict[str, Any] = {
            "time/env_steps_per_s": (self.vector_step - self._steps_log) * self.T * self.world / max(now - self._t_log, 1e-9),
            "time/updates_per_s": (self.agent.n_updates - self._updates_log) / max(now - self._t_log, 1e-9)}
        self._t_log, self._steps_log, self._updates_log = now, self.vector_step, self.agent.n_updates
        for k in (k for k in self.agent.STATS if k in means):
            v = means[k].tolist()
            out[f"train/{k}"] = float(np.mean(v))
            if k in ("alpha", "critic_loss", "q_target"):
                out.update({f"train/{k}/{t}": x for t, x in zip(self.agent.tasks, v)})
        for key in ("return", "success"):
            per = {t: float(means[f"episode_{key}/{t}"]) for t in self.agent.tasks if f"episode_{key}/{t}" in means}
            out.update({f"train/episode_{key}/{t}": v for t, v in per.items()})
            if per:
                out[f"train/episode_{key}/mean"] = float(np.mean(list(per.values())))
        out.update(self.agent.diagnostics())  # search probabilities, conflict and withheld rates
        out["train/n_updates"] = self.agent.n_updates
        out["phase"] = "search" if self.agent.searching else "train"
        return out

    def postfix(self, rec: dict) -> dict[str, str]:
        return {"env/s": f"{rec.get('time/env_steps_per_s', float('nan')):.0f}",
                "upd/s": f"{rec.get('time/updates_per_s', float('nan')):.1f}",
                "success": f"{self.last_eval.get('eval/success_rate/mean', float('nan')):.2f}"}

    def evaluate(self, stop: Callable[[], None] | None = None, final: bool = False) -> dict[str, float]:
        """Deterministic episodes of every task (``stop()`` before each action: a stop request abandons them)."""
        if self.evaluate_fn is None:
            raise ValueError("no evaluation function was given to this run")

        def policy(o):
            if stop is not None:
                stop()
            return self.agent.act(o, deterministic=True)

        t0 = time.perf_counter()
        k = self.cfg.eval.final_episodes_per_task or None if final else self.cfg.eval.episodes_per_task
        out = eval_lines(self.evaluate_fn(policy, k))
        out["time/eval_seconds"] = time.perf_counter() - t0
        self.last_eval = out
        return out


def eval_lines(res: dict) -> dict[str, float]:
    """metrics.jsonl keys of one evaluation (:func:`mtrl_arch.envs.metaworld.evaluate`'s result)."""
    out = {f"eval/success_rate/{t}": v for t, v in res["success_rate"].items()}
    out["eval/success_rate/mean"] = res["mean_success_rate"]
    out.update({f"eval/return/{t}": v for t, v in res["return"].items()})
    out["eval/episodes_per_task"] = res["episodes_per_task"]
    # the evaluation's cost in env steps (episodes end at the first success)
    out["eval/env_steps"] = int(round(sum(res["length"].values()) * res["episodes_per_task"]))
    return out


def _updates_now(rate: float, step: int) -> int:
    """Gradient steps at this vector step for a (possibly fractional) updates-per-step rate."""
    return int(step * rate) - int((step - 1) * rate)
