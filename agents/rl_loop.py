"""The MT-SAC training loop: act, store, update, search -> derive, evaluate, checkpoint, log.

The environment is duck-typed (``tasks``, ``reset``, ``step``, ``pop_finished_episodes``,
``evaluate``) so agents/ never imports envs/. Episodes of all tasks run in lockstep
(fixed-length episodes); at every episode boundary the loop resets the environments
with a seed derived from the run seed and the episode index.

Exact resume: a checkpoint holds everything the run's future depends on (networks,
targets, optimisers, architecture parameters and search phase, per-task alpha, replay,
every RNG, step counters, metrics pending aggregation, the metrics file's length) plus
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
``num_timesteps`` and every ``*_env_steps`` setting count env steps over all ranks. The
ranks agree on stopping at each vector step (a signal reaches them at different times).
Training statistics are pooled over ranks; rank 0 alone evaluates and writes (``run_dir``,
logger and ``evaluate`` are None elsewhere). A checkpoint holds rank 0's state; resuming
needs the same number of processes, and since the other ranks' replays and episodes are not
in it, every rank collects ``train.warmup_steps`` vector steps with the current policy
before the updates go on (ranks > 0 start fresh episodes and fresh random streams): such a
resume is not exact.
"""
from __future__ import annotations

import ctypes
import os
import signal
import sys
import threading
import time
from contextlib import contextmanager
from typing import Any, Callable

import numpy as np
import torch

from mtrl_arch import distributed
from mtrl_arch.logger import progress_bar
from mtrl_arch.checkpoint import (NonFiniteError, StopRequested, assert_finite, list_steps, rng_preserved, rng_state,
                                  save_checkpoint, set_rng_state)
from mtrl_arch.run import check_resume_key, restore_schedules, resume_key

__all__ = ["RLRun", "NonFiniteError", "graceful_stop", "episode_seed", "shared_state"]


@contextmanager
def graceful_stop(flag: dict):
    """SIGINT/SIGTERM set a flag: the loop saves a checkpoint, flushes logs and returns.

    A second signal while stopping raises KeyboardInterrupt (checkpoints are atomic, so
    even that leaves the previous ones intact).
    """
    def handler(signum, frame):
        if flag.get("stop"):
            raise KeyboardInterrupt
        flag["stop"] = signal.Signals(signum).name

    old = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


# what a checkpoint (rank 0's) holds that belongs to rank 0 alone: kept from the other ranks on a data-parallel resume
RANK_LOCAL = ("rng", "np_rng", "episode_actions", "pending", "logger_pos")
AGENT_RANK_LOCAL = ("replay", "sample_gen")


def shared_state(d: dict) -> dict:
    """A checkpoint without its rank-local parts: what every rank of a data-parallel run resumes from."""
    return {**{k: v for k, v in d.items() if k not in RANK_LOCAL},
            "agent": {k: v for k, v in d["agent"].items() if k not in AGENT_RANK_LOCAL}}


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
    """Owns the state of one training run around an :class:`~mtrl_arch.agents.sac.MTSAC`."""

    def __init__(self, agent: Any, env: Any, logger: Any = None, run_dir: Any = None,
                 on_arch: Callable[[dict], None] | None = None, progress: bool = False,
                 evaluate: Callable[[Callable, int | None], dict] | None = None):
        self.agent, self.env, self.logger, self.run_dir = agent, env, logger, run_dir
        self.evaluate_fn = evaluate
        self.cfg = agent.cfg
        self.on_arch = on_arch
        self.progress = progress
        self.T = len(agent.tasks)
        self.world = distributed.world_size()  # data-parallel: ranks stepping envs in lockstep
        self.seed = distributed.rank_seed(self.cfg.seed)  # episode seeds and warm-up actions of this rank
        self.vector_step = 0
        self.episode = 0
        self.last_eval: dict[str, float] = {}
        self.np_rng = np.random.default_rng(self.seed)
        self._seeded = False  # the torch RNG: seeded at the first learn() of a fresh run
        ep_len = getattr(env, "max_episode_steps", None) or 500
        self.episode_len = int(ep_len)
        self.obs = None
        self.stopped_by: str | None = None
        self.final_eval_done = False
        self.stop_flag: dict = {}  # set by SIGINT/SIGTERM (graceful_stop)
        self._peer_stop: str | None = None  # data-parallel: another rank stopped (not in stop_flag: see graceful_stop)
        self._stats: list[dict] = []
        self._stats_steps: list[int] = []  # vector step of each entry of _stats (to name the step of a NaN)
        self._episodes: list[dict] = []
        self._ep_actions: list[np.ndarray] = []  # actions since the episode's seeded reset (replayed on resume)
        self._no_update_until = 0  # after a resume without replay: collect before updating
        self._saved_at = -1

    # ---- state --------------------------------------------------------------------------------------
    @property
    def num_timesteps(self) -> int:
        return self.vector_step * self.T * self.world

    def state_dict(self) -> dict:
        return {"vector_step": self.vector_step, "episode": self.episode, "rng": rng_state(),
                "final_eval_done": self.final_eval_done,
                "np_rng": self.np_rng.bit_generator.state, "last_eval": self.last_eval,
                "episode_actions": np.stack(self._ep_actions) if self._ep_actions else None,
                "pending": {"stats": [{k: v.detach().cpu() for k, v in s.items()} for s in self._stats],
                            "stats_steps": list(self._stats_steps), "episodes": list(self._episodes)},
                "logger_pos": self.logger.position() if self.logger is not None and hasattr(self.logger, "position") else None,
                "no_update_until": self._no_update_until, "world_size": self.world,
                "meta": resume_key(self.cfg),
                "agent": self.agent.state_dict(with_replay=self._save_replay())}

    def _save_replay(self) -> bool:
        mode = self.cfg.train.save_replay
        if mode == "auto":  # on while the replay is under 1 GiB
            r = self.agent.replay
            return sum(getattr(r, f).numel() for f in r.FIELDS) * 4 <= 2**30
        return mode == "always"

    def load_state_dict(self, d: dict) -> None:
        """Resume from ``d``; on ranks > 0 of a data-parallel run ``d`` lacks the rank-local parts
        (:data:`RANK_LOCAL`), which are started afresh."""
        from mtrl_arch.config import ConfigError

        world = d.get("world_size", 1)
        where = f"the checkpoint at env step {d['vector_step'] * self.T * world}"
        if world != self.world:  # counters, episodes and replays are per rank: the job's shape is part of the state
            how = f"under torchrun with {world} processes" if world > 1 else "in one process (without torchrun)"
            raise ConfigError(f"{where} was written by {world} process(es), this run has {self.world}; resume it {how}")
        check_resume_key(d.get("meta"), self.cfg, where)
        try:
            self.agent.load_state_dict(d["agent"])
        except (KeyError, RuntimeError, ValueError) as e:  # shapes/keys of another config or version
            raise ConfigError(f"{where} does not fit this config or "
                              f"mtrl-arch version ({type(e).__name__}: {str(e).splitlines()[0][:160]})") from None
        if self.agent.searching:  # methods' schedules count updates (see mtrl_arch.run.restore_schedules)
            restore_schedules((self.agent.actor_method, self.agent.critic_method), self.agent.n_updates)
        self.vector_step, self.episode, self.last_eval = d["vector_step"], d["episode"], d["last_eval"]
        self.final_eval_done = d.get("final_eval_done", False)
        if "np_rng" in d:
            self.np_rng.bit_generator.state = d["np_rng"]
        acts = d.get("episode_actions")
        self._ep_actions = list(acts) if acts is not None else []
        self.obs = None  # learn() rebuilds the env state: seeded reset + the episode's actions
        pending = d.get("pending", {})
        self._stats = [{k: v.to(self.agent.device) for k, v in s.items()} for s in pending.get("stats", [])]
        self._stats_steps = list(pending.get("stats_steps", []))
        self._episodes = list(pending.get("episodes", []))
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
        if self.logger is not None and d.get("logger_pos") is not None and hasattr(self.logger, "rewind"):
            self.logger.rewind(d["logger_pos"])
        self._saved_at = self.vector_step
        self._seeded = True
        if "rng" in d:
            set_rng_state(d["rng"])
        else:  # a rank > 0: fresh streams of its own, not a repeat of those it started with
            s = episode_seed(self.seed, self.vector_step)
            torch.manual_seed(s)
            self.np_rng = np.random.default_rng(s)
            self.agent.sample_gen.manual_seed(s + 1)

    def check_finite(self) -> None:
        """NonFiniteError naming the first non-finite loss (step, update, task) or parameter."""
        if self._stats:
            for k in self._stats[0]:
                v = torch.stack([s[k] for s in self._stats])  # [n, T]
                bad = ~torch.isfinite(v)
                if bool(bad.any()):
                    i, t = (int(x) for x in bad.nonzero()[0]) if v.dim() > 1 else (int(bad.nonzero()[0]), 0)
                    step = self._stats_steps[i] * self.T if i < len(self._stats_steps) else self.num_timesteps
                    raise NonFiniteError(f"non-finite {k} (task {self.agent.tasks[t]}) at env step {step}, "
                                         f"update {self.agent.n_updates - len(self._stats) + i}; {self._kept()}")
        nets = {"actor": self.agent.actor, "critic": self.agent.critic, "critic_target": self.agent.critic_target}
        named = [(f"{n}.{k}", p) for n, m in nets.items() for k, p in m.named_parameters()]
        named.append(("log_alpha", self.agent.log_alpha))
        assert_finite(named, f"at env step {self.num_timesteps}; {self._kept()}")

    def _kept(self) -> str:
        if self.run_dir is None:
            return "no checkpoint directory"
        steps = list_steps(self.run_dir / "checkpoints")
        return f"last good checkpoint kept: {self.run_dir / 'checkpoints' / f'ckpt-{steps[-1]}.pt'}" if steps \
            else "no checkpoint was written yet"

    def save(self) -> None:
        """Checkpoint now (refused, with NonFiniteError, if a loss or parameter is non-finite)."""
        if self.run_dir is None:
            return
        self.check_finite()
        save_checkpoint(self.run_dir / "checkpoints", self.num_timesteps, self.state_dict(), self.cfg.train.keep_checkpoints,
                        meta={**resume_key(self.cfg), "env_step": self.num_timesteps})
        self._saved_at = self.vector_step

    @contextmanager
    def signals(self):
        """SIGINT/SIGTERM request a graceful stop (self.stop_flag) while inside; nests."""
        if getattr(self, "_signals_on", False) or threading.current_thread() is not threading.main_thread():
            yield
            return
        self._signals_on = True
        try:
            with graceful_stop(self.stop_flag):
                yield
        finally:
            self._signals_on = False

    def _report_stop(self) -> None:
        if not distributed.is_main():
            return
        where = f"; checkpoint saved, continue with `mtrl-arch train --resume {self.run_dir}`" if self.run_dir else ""
        print(f"stopped by {self.stopped_by} at env step {self.num_timesteps}{where}", file=sys.stderr)

    def _restore_env(self) -> None:
        """Seeded reset of the current episode; on resume, replay its actions to rebuild the exact env state
        (ranks > 0 of a data-parallel resume have none: they start a fresh episode, cut at the boundary)."""
        self.obs = self.env.reset(seed=episode_seed(self.seed, self.episode))
        for a in self._ep_actions:
            self.obs = self.env.step(a)[0]
        self.env.pop_finished_episodes()  # none end mid-episode; any already counted are in the checkpoint

    # ---- the loop -----------------------------------------------------------------------------------
    def learn(self, total_env_steps: int, callback: Any = None) -> None:
        cfg, agent, env, T = self.cfg, self.agent, self.env, self.T
        TW = T * self.world  # env steps per vector step of the job
        n_vector = total_env_steps // TW
        search_vec = cfg.arch.search_steps if agent.searching else 0
        # exact at any step: a resume replays the episode's actions (see the module docstring)
        ckpt_every = -(-cfg.train.checkpoint_every_env_steps // TW) if cfg.train.checkpoint_every_env_steps else 0
        eval_every = cfg.eval.every_env_steps // TW if cfg.eval.every_env_steps else 0
        log_every = max(1, cfg.train.log_every // TW)
        if not self._seeded:  # a fresh run: this rank's exploration noise (a resume restores the checkpoint's state)
            torch.manual_seed(self.seed)
            self._seeded = True
        if agent.device.type == "cpu":
            keep_freed_memory()  # process-wide allocator setting, made by the process's loop (see its docstring)
        if self.obs is None or self.vector_step % self.episode_len == 0:
            self._restore_env()
        if self.vector_step < n_vector:  # e.g. a finished run resumed with a larger train.total_env_steps
            self.final_eval_done = False
        cb = _as_callback(callback, agent, self)
        cb.on_training_start(locals(), globals())
        flag = self.stop_flag
        bar = progress_bar(self.progress, n_vector * TW, self.num_timesteps, "env-step")
        t_log, steps_log, updates_log = time.perf_counter(), self.vector_step, agent.n_updates
        with self.signals(), distributed.sync_other_optimizers():
            while self.vector_step < n_vector:
                if self.vector_step < cfg.train.warmup_steps:
                    action = self.np_rng.uniform(-1.0, 1.0, size=(T, agent.action_dim)).astype(np.float32)
                else:
                    action = agent.act(self.obs, deterministic=False)
                    if not np.isfinite(action).all():  # never feed NaN to the simulator; name the cause
                        self.check_finite()
                        raise NonFiniteError(f"non-finite action at env step {self.num_timesteps}; {self._kept()}")
                next_obs, reward, terminated, truncated, info = env.step(action)
                agent.replay.add(self.obs, action, reward, info.get("final_obs", next_obs), terminated)
                self.obs = next_obs
                self._ep_actions.append(action)
                self.vector_step += 1
                self._episodes.extend(env.pop_finished_episodes())
                if self.vector_step % self.episode_len == 0:  # episode boundary: seeded resets
                    self.episode += 1
                    self._ep_actions.clear()
                    self.obs = env.reset(seed=episode_seed(self.seed, self.episode))
                if self.vector_step > cfg.train.warmup_steps and self.vector_step > self._no_update_until:
                    n_up = _updates_now(cfg.train.updates_per_step, self.vector_step)
                    for _ in range(n_up):
                        self._stats.append(agent.train_step())
                        self._stats_steps.append(self.vector_step)
                if agent.searching and self.vector_step >= search_vec:
                    self._finish_search()
                regular_log = self.vector_step % log_every == 0
                if regular_log or self.vector_step == n_vector:
                    now = time.perf_counter()
                    rates = {"time/env_steps_per_s": (self.vector_step - steps_log) * TW / max(now - t_log, 1e-9),
                             "time/updates_per_s": (agent.n_updates - updates_log) / max(now - t_log, 1e-9)}
                    t_log, steps_log, updates_log = now, self.vector_step, agent.n_updates
                    # a line at the end of the budget reports the open window but keeps it (and the
                    # checkpoint holds it), so a run resumed with a larger budget logs the windows an
                    # uninterrupted run logs; only the stop point adds a line
                    self._log_train(rates, keep=not regular_log)
                    if bar is not None:
                        bar.set_postfix({"env/s": f"{rates['time/env_steps_per_s']:.0f}",
                                         "upd/s": f"{rates['time/updates_per_s']:.1f}",
                                         "success": f"{self.last_eval.get('eval/success_rate/mean', float('nan')):.2f}"})
                if bar is not None:
                    bar.update(TW)
                if eval_every and self.vector_step % eval_every == 0 and self.vector_step < n_vector \
                        and self.evaluate_fn is not None:  # data-parallel: rank 0; the others wait in their next collective
                    self.evaluate(cfg.eval.episodes_per_task)
                if ckpt_every and self.vector_step % ckpt_every == 0:
                    self.save()
                stop = not cb.on_step() or bool(flag.get("stop"))
                if self.world > 1 and distributed.any_true(stop) and not stop:  # every rank stops at this step
                    self._peer_stop, stop = "a stop on another rank", True
                if stop:
                    break
        if bar is not None:
            bar.close()
        cb.on_training_end()
        self.stopped_by = flag.get("stop") or self._peer_stop
        if self._saved_at != self.vector_step:  # at the end of training, and on SIGINT/SIGTERM
            self.save()
        if self.logger is not None:
            self.logger.flush()
        if self.stopped_by:
            self._report_stop()

    def final_evaluate(self, episodes_per_task: int | None) -> dict[str, float] | None:
        """The final evaluation, then a checkpoint recording it; None when stopped by a signal.

        A signal during the evaluation ends it at once; the checkpoint from the end of
        :meth:`learn` stands and a resumed run evaluates again.
        """
        if self.stopped_by:
            return None
        if self.final_eval_done:
            return self.last_eval
        with self.signals():
            try:
                out = self.evaluate(episodes_per_task, interruptible=True)
            except StopRequested:
                self.stopped_by = self.stop_flag["stop"]
                self._report_stop()
                return None
            self.final_eval_done = True
            self.save()
        return out

    def _finish_search(self) -> None:
        trees = self.agent.finish_search()
        if self.on_arch is not None:
            self.on_arch(trees)

    def _log_train(self, rates: dict[str, float], keep: bool = False) -> None:
        """One ``train/*`` line over the window since the last one; ``keep``: the window stays open."""
        out: dict[str, float] = dict(rates)
        if self._stats:
            self.check_finite()  # names the exact update, task and loss term
        tasks = self.agent.tasks
        # every statistic all pending updates have (a checkpoint from an older version may lack newer ones)
        keys = [k for k in self.agent.STATS if all(k in st for st in self._stats)]
        # sums and counts: pending update statistics [K, T] and episodes' (return, success, count) [3, T]
        stats = torch.stack([torch.stack([s[k].float() for k in keys]) for s in self._stats]).sum(0).cpu().double() \
            if self._stats else torch.zeros(len(keys), self.T, dtype=torch.float64)
        n = float(len(self._stats))
        eps = torch.zeros(3, self.T, dtype=torch.float64)
        ix = {t: i for i, t in enumerate(tasks)}
        for e in self._episodes:
            eps[:, ix[e["task"]]] += torch.tensor([float(e["return"]), float(e["success"]), 1.0], dtype=torch.float64)
        if self.world > 1:  # over every rank's updates and episodes (means of sums keep the ratios)
            stats, n_t, eps = distributed.all_reduce_mean([stats, torch.tensor([n], dtype=torch.float64), eps])
            n = float(n_t)
        if n:
            for k, v in zip(keys, (stats / n).tolist()):
                out[f"train/{k}"] = float(np.mean(v))
                if k in ("alpha", "critic_loss", "q_target"):
                    out.update({f"train/{k}/{t}": x for t, x in zip(tasks, v)})
        seen = [i for i in range(self.T) if eps[2, i] > 0]
        for row, key in ((0, "return"), (1, "success")):
            per = {tasks[i]: float(eps[row, i] / eps[2, i]) for i in seen}
            out.update({f"train/episode_{key}/{t}": v for t, v in per.items()})
            if per:
                out[f"train/episode_{key}/mean"] = float(np.mean(list(per.values())))
        if not keep:
            self._stats.clear()
            self._stats_steps.clear()
            self._episodes.clear()
        out.update(self.agent.diagnostics())  # search probabilities, conflict and withheld rates
        out["train/n_updates"] = self.agent.n_updates
        out["phase"] = "search" if self.agent.searching else "train"
        if self.logger is not None:
            self.logger.log(out, self.num_timesteps)

    def evaluate(self, episodes_per_task: int | None, interruptible: bool = False) -> dict[str, float]:
        if self.evaluate_fn is None:
            raise ValueError("no evaluation function was given to this run")

        def policy(o):
            if interruptible and self.stop_flag.get("stop"):
                raise StopRequested
            return self.agent.act(o, deterministic=True)

        t0 = time.perf_counter()
        with rng_preserved():  # the training's random streams go on as if no evaluation ran (see rng_preserved)
            res = self.evaluate_fn(policy, episodes_per_task)
        out = eval_lines(res)
        out["time/eval_seconds"] = time.perf_counter() - t0
        self.last_eval = out
        if self.logger is not None:
            self.logger.log(out, self.num_timesteps)
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


class _FnCallback:
    def __init__(self, fn, run):
        self.fn, self.run = fn, run

    def on_training_start(self, *a):
        pass

    def on_step(self) -> bool:
        return self.fn(locals(), {"run": self.run}) is not False

    def on_training_end(self):
        pass


class _NoCallback:
    def on_training_start(self, *a):
        pass

    def on_step(self) -> bool:
        return True

    def on_training_end(self):
        pass


def _as_callback(callback: Any, agent: Any, run: RLRun):
    """None, a function ``f(locals, globals) -> bool``, or a stable-baselines3 ``BaseCallback`` (or list)."""
    if callback is None:
        return _NoCallback()
    if isinstance(callback, (list, tuple)):
        from stable_baselines3.common.callbacks import CallbackList

        callback = CallbackList(list(callback))
    if hasattr(callback, "init_callback"):
        agent._run = run
        callback.init_callback(agent)
        return callback
    return _FnCallback(callback, run)
