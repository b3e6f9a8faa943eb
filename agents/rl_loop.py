"""The MT-SAC training loop: act, store, update, search -> derive, evaluate, checkpoint, log.

The environment is duck-typed (``tasks``, ``reset``, ``step``, ``pop_finished_episodes``,
``evaluate``) so agents/ never imports envs/. Episodes of all tasks run in lockstep
(fixed-length episodes); at every episode boundary the loop resets the environments
with a seed derived from the run seed and the episode index, so a run resumed from a
checkpoint taken at a boundary sees exactly the same episodes.
"""
from __future__ import annotations

import signal
import time
from contextlib import contextmanager
from typing import Any, Callable

import numpy as np
import torch

from mtrl_arch.checkpoint import rng_state, save_checkpoint, set_rng_state


class NonFiniteError(RuntimeError):
    pass


@contextmanager
def graceful_stop(flag: dict):
    """SIGINT/SIGTERM set a flag: the loop saves a checkpoint, flushes logs and returns."""
    def handler(signum, frame):
        flag["stop"] = signal.Signals(signum).name

    old = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def episode_seed(seed: int, episode: int) -> int:
    return (seed * 1_000_003 + episode * 7919) % (2**31 - 1)


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
        self.vector_step = 0
        self.episode = 0
        self.last_eval: dict[str, float] = {}
        self.np_rng = np.random.default_rng(self.cfg.seed)
        ep_len = getattr(env, "max_episode_steps", None) or 500
        self.episode_len = int(ep_len)
        self.obs = None
        self.stopped_by: str | None = None
        self.final_eval_done = False
        self._stats: list[dict] = []
        self._episodes: list[dict] = []

    # ---- state --------------------------------------------------------------------------------------
    @property
    def num_timesteps(self) -> int:
        return self.vector_step * self.T

    def state_dict(self) -> dict:
        return {"vector_step": self.vector_step, "episode": self.episode, "rng": rng_state(),
                "final_eval_done": self.final_eval_done,
                "np_rng": self.np_rng.bit_generator.state, "last_eval": self.last_eval,
                "agent": self.agent.state_dict(with_replay=self._save_replay())}

    def _save_replay(self) -> bool:
        mode = self.cfg.train.save_replay
        if mode == "auto":  # on while the replay is under 1 GiB
            r = self.agent.replay
            return sum(getattr(r, f).numel() for f in r.FIELDS) * 4 <= 2**30
        return mode == "always"

    def load_state_dict(self, d: dict) -> None:
        self.agent.load_state_dict(d["agent"])
        self.vector_step, self.episode, self.last_eval = d["vector_step"], d["episode"], d["last_eval"]
        self.final_eval_done = d.get("final_eval_done", False)
        self.np_rng.bit_generator.state = d["np_rng"]
        set_rng_state(d["rng"])

    def save(self) -> None:
        if self.run_dir is None:
            return
        save_checkpoint(self.run_dir / "checkpoints", self.num_timesteps, self.state_dict(), self.cfg.train.keep_checkpoints)


    # ---- the loop -----------------------------------------------------------------------------------
    def learn(self, total_env_steps: int, callback: Any = None) -> None:
        cfg, agent, env, T = self.cfg, self.agent, self.env, self.T
        n_vector = total_env_steps // T
        search_vec = cfg.arch.search_steps if agent.searching else 0
        # checkpoints fall on episode boundaries, where a resumed run continues exactly
        ckpt_every = -(-cfg.train.checkpoint_every // (T * self.episode_len)) * self.episode_len if cfg.train.checkpoint_every else 0
        eval_every = cfg.eval.every_env_steps // T if cfg.eval.every_env_steps else 0
        log_every = max(1, cfg.train.log_every // T)
        if self.obs is None or self.vector_step % self.episode_len == 0:
            self.obs = env.reset(seed=episode_seed(cfg.seed, self.episode))
        cb = _as_callback(callback, agent, self)
        cb.on_training_start(locals(), globals())
        flag: dict = {}
        bar = _progress(self.progress, n_vector * T, self.num_timesteps)
        t_log, steps_log, updates_log = time.perf_counter(), self.vector_step, agent.n_updates
        with graceful_stop(flag):
            while self.vector_step < n_vector:
                if self.vector_step < cfg.train.warmup_steps:
                    action = self.np_rng.uniform(-1.0, 1.0, size=(T, agent.action_dim)).astype(np.float32)
                else:
                    action = agent.act(self.obs, deterministic=False)
                next_obs, reward, terminated, truncated, info = env.step(action)
                agent.replay.add(self.obs, action, reward, info.get("final_obs", next_obs), terminated)
                self.obs = next_obs
                self.vector_step += 1
                self._episodes.extend(env.pop_finished_episodes())
                if self.vector_step % self.episode_len == 0:  # episode boundary: seeded resets (exact resume)
                    self.episode += 1
                    self.obs = env.reset(seed=episode_seed(cfg.seed, self.episode))
                if self.vector_step > cfg.train.warmup_steps:
                    n_up = _updates_now(cfg.train.updates_per_step, self.vector_step)
                    for _ in range(n_up):
                        self._stats.append(agent.train_step())
                if agent.searching and self.vector_step >= search_vec:
                    self._finish_search()
                if self.vector_step % log_every == 0 or self.vector_step == n_vector:
                    now = time.perf_counter()
                    rates = {"time/env_steps_per_s": (self.vector_step - steps_log) * T / max(now - t_log, 1e-9),
                             "time/updates_per_s": (agent.n_updates - updates_log) / max(now - t_log, 1e-9)}
                    t_log, steps_log, updates_log = now, self.vector_step, agent.n_updates
                    self._log_train(rates)
                    if bar is not None:
                        bar.set_postfix({"env/s": f"{rates['time/env_steps_per_s']:.0f}",
                                         "upd/s": f"{rates['time/updates_per_s']:.1f}",
                                         "success": f"{self.last_eval.get('eval/success_rate/mean', float('nan')):.2f}"})
                if bar is not None:
                    bar.update(T)
                if eval_every and self.vector_step % eval_every == 0 and self.vector_step < n_vector:
                    self.evaluate(cfg.eval.episodes_per_task)
                if ckpt_every and self.vector_step % ckpt_every == 0:
                    self.save()
                if not cb.on_step() or flag.get("stop"):
                    break
        if bar is not None:
            bar.close()
        cb.on_training_end()
        self.stopped_by = flag.get("stop")
        if self.stopped_by:
            self.save()

    @staticmethod
    def _check_finite(name: str, v: torch.Tensor, step: int) -> None:
        if not torch.isfinite(v).all():
            raise NonFiniteError(f"non-finite {name} at env step {step}; the last good checkpoint is kept")

    def _finish_search(self) -> None:
        trees = self.agent.finish_search()
        if self.on_arch is not None:
            self.on_arch(trees)

    def _log_train(self, rates: dict[str, float]) -> None:
        out: dict[str, float] = dict(rates)
        if self._stats:
            stacked = {k: torch.stack([s[k] for s in self._stats]).mean(0) for k in self._stats[0]}
            for k, v in stacked.items():
                self._check_finite(k, v, self.num_timesteps)
                vals = v.cpu().tolist()
                out[f"train/{k}"] = float(np.mean(vals))
                if k in ("alpha", "critic_loss"):
                    out.update({f"train/{k}/{t}": x for t, x in zip(self.agent.tasks, vals)})
            self._stats.clear()
        if self._episodes:
            for key in ("return", "success"):
                per = {}
                for e in self._episodes:
                    per.setdefault(e["task"], []).append(float(e[key]))
                out.update({f"train/episode_{key}/{t}": float(np.mean(v)) for t, v in per.items()})
                out[f"train/episode_{key}/mean"] = float(np.mean([np.mean(v) for v in per.values()]))
            self._episodes.clear()
        out["train/n_updates"] = self.agent.n_updates
        out["phase"] = "search" if self.agent.searching else "train"
        if self.logger is not None:
            self.logger.log(out, self.num_timesteps)

    def evaluate(self, episodes_per_task: int | None) -> dict[str, float]:
        if self.evaluate_fn is None:
            raise ValueError("no evaluation function was given to this run")
        res = self.evaluate_fn(lambda o: self.agent.act(o, deterministic=True), episodes_per_task)
        out = {f"eval/success_rate/{t}": v for t, v in res["success_rate"].items()}
        out["eval/success_rate/mean"] = res["mean_success_rate"]
        out.update({f"eval/return/{t}": v for t, v in res["return"].items()})
        out["eval/episodes_per_task"] = res["episodes_per_task"]
        self.last_eval = out
        if self.logger is not None:
            self.logger.log(out, self.num_timesteps)
        return out


def _updates_now(rate: float, step: int) -> int:
    """Gradient steps at this vector step for a (possibly fractional) updates-per-step rate."""
    return int(step * rate) - int((step - 1) * rate)


def _progress(enabled: bool, total: int, initial: int):
    if not enabled:
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, initial=initial, unit="env-step", dynamic_ncols=True, smoothing=0.05)


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
