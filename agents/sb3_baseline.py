"""The single-task baseline of the CoNAL paper: one stable-baselines3 SAC per task.

``agent.algo=sb3_stl`` (config ``mt10_stl_sb3``). Each task gets its own SB3 ``SAC`` on its
own 39-d Meta-World env (no one-hot), with the MT-SAC hyper-parameters of the config
(``model.hidden``, ``train.lr``, ``agent.batch_per_task``, ``agent.gamma``, ``agent.tau``,
``agent.init_alpha``, ``agent.buffer_size`` split over the tasks, ``train.warmup_steps``,
``train.updates_per_step``). The agents are trained round-robin in chunks that end at every
``eval.every_env_steps`` and ``train.checkpoint_every_env_steps`` (summed over tasks), and
evaluated together with the same protocol and the same evaluation envs as the multi-task agent
(:func:`mtrl_arch.envs.metaworld.evaluate`). Differences from MT-SAC that SB3 fixes:
no gradient-norm clipping, SB3's own network initialisation.

Checkpoints and resume are those of every other run: :mod:`mtrl_arch.checkpoint` files
``checkpoints/ckpt-<env steps>.pt`` (atomic, checksummed, newest ``train.keep_checkpoints``
kept) at the end of every chunk, at the end of training and on SIGINT/SIGTERM (at the step
reached; exit 0 and the MT-SAC loop's message); ``--resume`` takes the newest intact one
(:func:`mtrl_arch.run.find_resume_checkpoint`: a damaged one is moved aside) after checking
its resume key; a finished run writes ``model.pt`` (every task's SB3 zip), which ``mtrl-arch
eval`` reads. A checkpoint holds, per task, the SB3 zip (networks, optimisers, entropy
coefficient, counters, last observation), the filled part of the replay
(``train.save_replay``), the task's random streams and its action space's, and what rebuilds
its env mid-episode; plus the process's random streams, the chunk reached, the last
evaluation, the metrics file's length and the resume key.

Exact resume (a resumed CPU run is bit-identical to an uninterrupted one, ``time/*`` aside):
each task trains on random streams of its own (swapped in around its ``learn``), so nothing
depends on the order of the tasks or on where training was cut; a signal ends ``learn``
between two rollouts, after the last step's updates; and, as in the MT-SAC loop, the env
is rebuilt rather than pickled: Meta-World's dynamics are deterministic and a reset's only
draw is the goal, so restoring the env's generators as they were before the episode's
reset, resetting and replaying the episode's actions gives the exact state.
"""
from __future__ import annotations

import io
import os
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import torch

from mtrl_arch.checkpoint import (StopRequested, assert_finite, list_steps, load_latest, rng_state, save_checkpoint,
                                  set_rng_state)
from mtrl_arch.config import Config, ConfigError
from mtrl_arch.logger import Logger
from mtrl_arch.loop import graceful_stop
from mtrl_arch.run import check_resume_key, find_resume_checkpoint, resume_key

from .rl_loop import eval_lines

MODEL_FORMAT = "mtrl-arch/sb3-stl"


def _sac_kwargs(cfg: Config, n_tasks: int, device: str) -> dict[str, Any]:
    rate = cfg.train.updates_per_step
    # SB3 trains every train_freq env steps; rates below one update per step become a frequency
    train_freq, gradient_steps = (1, int(round(rate))) if rate >= 1 else (max(1, int(round(1 / rate))), 1)
    return dict(
        learning_rate=cfg.train.lr,
        buffer_size=max(1, cfg.agent.buffer_size // n_tasks),
        learning_starts=cfg.train.warmup_steps,
        batch_size=cfg.agent.batch_per_task,
        tau=cfg.agent.tau,
        gamma=cfg.agent.gamma,
        train_freq=train_freq,
        gradient_steps=gradient_steps,
        ent_coef=f"auto_{cfg.agent.init_alpha}",
        target_entropy="auto" if not cfg.agent.target_entropy else cfg.agent.target_entropy,
        policy_kwargs={"net_arch": list(cfg.model.hidden)},
        device=device,
        verbose=0,
    )


class SB3SingleTask:
    """Ten (or T) SB3 SACs behind one batched policy ``obs [T, 39] -> actions [T, 4]``."""

    def __init__(self, models: list[Any]):
        self.models = models

    def act(self, obs: np.ndarray) -> np.ndarray:
        return np.stack([m.predict(obs[t, :39], deterministic=True)[0] for t, m in enumerate(self.models)])

    def param_count(self) -> int:
        """Actor and twin critics of every task (targets excluded, as in MT-SAC's counts)."""
        return sum(sum(p.numel() for net in (m.policy.actor, m.policy.critic) for p in net.parameters())
                   for m in self.models)


def _env_rngs(env: gym.Env) -> list[np.random.Generator]:
    """Every generator of a Meta-World env: its own (the goal drawn at each reset) and its spaces'."""
    u = env.unwrapped
    spaces = (u.action_space, u.observation_space, getattr(u, "goal_space", None))
    return [u.np_random, *(s.np_random for s in spaces if s is not None)]


def _set_rngs(env: gym.Env, states: list[dict]) -> None:
    for g, s in zip(_env_rngs(env), states):
        g.bit_generator.state = s


class _Replayable(gym.Wrapper):
    """Records what rebuilds the env on resume: its generators before the episode's reset, the actions since.

    (Pickling MuJoCo's and every wrapper's state instead would be large and fragile; see the module docstring.)
    """

    def __init__(self, env: gym.Env):
        super().__init__(env)
        self.at_reset: list[dict] | None = None  # None: never reset (the first learn() resets)
        self.actions: list[np.ndarray] = []

    def reset(self, **kw):
        self.at_reset, self.actions = [g.bit_generator.state for g in _env_rngs(self.env)], []
        return self.env.reset(**kw)

    def step(self, action):
        self.actions.append(np.array(action, copy=True))
        return self.env.step(action)

    def state(self) -> dict:
        return {"at_reset": self.at_reset, "actions": np.stack(self.actions) if self.actions else None,
                "rng": [g.bit_generator.state for g in _env_rngs(self.env)]}

    def rebuild(self, vec: Any, saved: dict, last_obs: np.ndarray | None, task: str) -> None:
        """Put the env (through SB3's ``vec``, so its Monitor counts alike) where the checkpoint ``saved`` left it."""
        if saved["at_reset"] is not None:
            _set_rngs(self, saved["at_reset"])
            obs = vec.reset()
            for a in saved["actions"] if saved["actions"] is not None else ():
                obs = vec.step(a[None])[0]
            if last_obs is not None and not np.array_equal(obs, last_obs):
                print(f"warning: {task}: the env rebuilt from the checkpoint is not the one saved "
                      "(this resume is not exact)", file=sys.stderr)
        _set_rngs(self, saved["rng"])


@contextmanager
def _own_streams(slot: dict):
    """The task's random streams in the process's place while it trains; kept and swapped back even on a stop."""
    outer = rng_state()
    set_rng_state(slot["rng"])
    try:
        yield
    finally:
        slot["rng"] = rng_state()
        set_rng_state(outer)


@contextmanager
def _signals(flag: dict):
    """SIGINT/SIGTERM set ``flag["stop"]`` (the MT-SAC loop's :func:`graceful_stop`); handlers need the main thread."""
    if threading.current_thread() is threading.main_thread():
        with graceful_stop(flag):
            yield
    else:
        yield


def _stop_callback(flag: dict) -> Any:
    from stable_baselines3.common.callbacks import BaseCallback

    class Stop(BaseCallback):
        """Ends learn() at the start of a rollout: the previous step's updates are done, the next step not begun
        (a False from on_step would come after the env stepped but before its transition was stored)."""

        def _on_rollout_start(self) -> None:
            if flag.get("stop"):
                raise StopRequested

        def _on_step(self) -> bool:
            return True

    return Stop()


def _zip(model: Any) -> bytes:
    buf = io.BytesIO()
    model.save(buf)
    return buf.getvalue()


def _replay_state(rb: Any) -> dict:
    n = rb.buffer_size if rb.full else rb.pos  # the filled rows only: SB3 pre-allocates the whole buffer
    return {"pos": rb.pos, "full": rb.full, "arrays": {k: v[:n] for k, v in vars(rb).items() if isinstance(v, np.ndarray)}}


def _load_replay(rb: Any, d: dict) -> None:
    for k, v in d["arrays"].items():
        getattr(rb, k)[:len(v)] = v
    rb.pos, rb.full = d["pos"], d["full"]


def _kept(folder: Path) -> str:
    steps = list_steps(folder)
    return f"last good checkpoint kept: {folder / f'ckpt-{steps[-1]}.pt'}" if steps else "no checkpoint was written yet"


def train_sb3_stl(cfg: Config, run_dir: Path, tasks: tuple[str, ...], device: str, resume: bool,
                  progress: bool, env_meta: dict) -> dict[str, Any]:
    from stable_baselines3 import SAC
    from stable_baselines3.common.monitor import Monitor
    from stable_baselines3.common.vec_env import DummyVecEnv

    from mtrl_arch.envs.metaworld import evaluate, make_task_env

    T, folder = len(tasks), run_dir / "checkpoints"
    if resume and not list_steps(folder) and (folder / "sb3").is_dir():
        raise ConfigError(f"{run_dir} was checkpointed by an older mtrl-arch (checkpoints/sb3/, no checksums) and "
                          "cannot be resumed; `mtrl-arch eval` still reads its models; start a new run to train on")
    found = find_resume_checkpoint(run_dir) if resume else None
    state = found[1] if found else None
    if state is not None:
        where = f"the checkpoint at env step {found[0]}"
        if state.get("algo") != "sb3_stl":
            raise ConfigError(f"{where} was not written by agent.algo=sb3_stl; resume the run with its own agent.algo")
        check_resume_key(state.get("meta"), cfg, where)
    kwargs = _sac_kwargs(cfg, T, device)
    recs, models, slots, lost = [], [], [], []
    try:
        for i, task in enumerate(tasks):
            rec = _Replayable(make_task_env(cfg.env.name, task, cfg.seed, cfg.env.max_episode_steps or None,
                                            cfg.env.reward_version))
            vec = DummyVecEnv([lambda rec=rec: Monitor(rec)])  # what SB3 wraps a plain env in
            recs.append(rec)
            if state is None:
                models.append(SAC("MlpPolicy", vec, seed=cfg.seed * 1000 + i, **kwargs))
                slots.append({"rng": rng_state()})  # the task's streams go on from its seeded construction
                continue
            s = state["agents"][task]
            try:  # the current settings, except those that fix shapes (resume keys: equal anyway)
                m = SAC.load(io.BytesIO(s["zip"]), env=vec, device=device, force_reset=False,
                             **{k: v for k, v in kwargs.items() if k not in ("policy_kwargs", "device")})
            except (KeyError, RuntimeError, ValueError) as e:
                raise ConfigError(f"{where} does not fit this config or mtrl-arch version "
                                  f"({type(e).__name__}: {str(e).splitlines()[0][:160]})") from None
            models.append(m)
            if "replay" in s:
                _load_replay(m.replay_buffer, s["replay"])
            elif m.num_timesteps > m.learning_starts:  # SB3 would sample an empty buffer: refill first
                m.learning_starts = m.num_timesteps + max(cfg.train.warmup_steps, cfg.agent.batch_per_task)
                lost.append(task)
            rec.rebuild(m.env, s["env"], m._last_obs, task)
            m.action_space.np_random.bit_generator.state = s["action_space_rng"]  # a copy of the env's after load
            slots.append({"rng": s["rng"]})
    except BaseException:
        for m in models:
            m.env.close()
        raise
    if lost:
        print(f"warning: the checkpoint holds no replay (train.save_replay={cfg.train.save_replay}); {', '.join(lost)} "
              "collect random steps before updating again (this resume is not exact)", file=sys.stderr)
    if state is not None:
        set_rng_state(state["rng"])  # SAC.load reseeded the process's streams
        print(f"resumed from {folder}/ckpt-{found[0]}.pt at env step {found[0]}", file=sys.stderr)
    policy = SB3SingleTask(models)
    logger = Logger(run_dir, cfg.wandb, {**cfg.to_dict(), "env_metadata": env_meta}, run_dir.name,
                    resume_step=found[0] if found else (-1 if resume else None))
    if state is not None and state.get("logger_pos") is not None:
        logger.rewind(state["logger_pos"])
    if state is None:
        logger.log({"params/sb3_policies/total": policy.param_count()}, 0)
    per_task_total = cfg.train.total_env_steps // T
    every = max(1, (cfg.eval.every_env_steps or cfg.train.total_env_steps) // T)
    ck = -(-cfg.train.checkpoint_every_env_steps // T) if cfg.train.checkpoint_every_env_steps else per_task_total
    pos = state["pos"] if state else 0  # per-task env steps of the chunks done
    last: dict[str, Any] = state["last_eval"] if state else {}
    final_done = bool(state and state.get("final_eval_done")) and pos >= per_task_total
    wall0 = time.time() - (state["wall"] if state else 0.0)
    flag: dict = {}
    stop_cb = _stop_callback(flag)
    saved_at = found[0] if found else -1

    def env_steps() -> int:
        return sum(m.num_timesteps for m in models)

    def save() -> None:
        nonlocal saved_at
        named = [(f"{t}.{n}", p) for t, m in zip(tasks, models)
                 for n, p in [*m.policy.named_parameters(), ("log_ent_coef", getattr(m, "log_ent_coef", None))]
                 if p is not None]
        assert_finite(named, f"at env step {env_steps()}; {_kept(folder)}")  # never checkpoint a diverged run
        mode = cfg.train.save_replay
        replay = mode == "always" or (mode == "auto" and _replay_bytes(models) <= 2**30)
        agents = {t: {"zip": _zip(m), "rng": slot["rng"], "action_space_rng": m.action_space.np_random.bit_generator.state,
                      "env": rec.state(), **({"replay": _replay_state(m.replay_buffer)} if replay else {})}
                  for t, m, slot, rec in zip(tasks, models, slots, recs)}
        d = {"algo": "sb3_stl", "tasks": list(tasks), "pos": pos, "wall": time.time() - wall0, "last_eval": last,
             "final_eval_done": final_done, "logger_pos": logger.position(), "rng": rng_state(),
             "meta": resume_key(cfg), "agents": agents}
        saved_at = env_steps()
        save_checkpoint(folder, saved_at, d, cfg.train.keep_checkpoints, meta={**resume_key(cfg), "env_step": saved_at})

    def run_eval(k: int | None, interruptible: bool = False) -> dict[str, Any]:
        def act(o: np.ndarray) -> np.ndarray:
            if interruptible and flag.get("stop"):  # the final evaluation ends at once; a resumed run evaluates again
                raise StopRequested
            return policy.act(o)

        return eval_lines(evaluate(act, cfg.env.name, tasks, cfg.seed, k, cfg.env.max_episode_steps or None,
                                   None, cfg.env.reward_version, one_hot=False))

    try:
        with _signals(flag):
            try:
                while pos < per_task_total:
                    p = min(per_task_total, (pos // every + 1) * every, (pos // ck + 1) * ck)
                    t0, s0 = time.time(), env_steps()
                    for m, slot in zip(models, slots):
                        if m.num_timesteps < p:  # absolute targets: a resumed chunk ends where the whole one does
                            with _own_streams(slot):
                                m.learn(p - m.num_timesteps, callback=stop_cb, reset_num_timesteps=False,
                                        progress_bar=False)
                    pos = p
                    if pos % every == 0 or pos == per_task_total:
                        last = run_eval(cfg.eval.episodes_per_task)
                        last.update({"time/wall_s": time.time() - wall0,
                                     "time/env_steps_per_s": (env_steps() - s0) / max(time.time() - t0, 1e-9)})
                        logger.log(last, pos * T)
                        if progress:
                            print(f"[sb3_stl] env steps {pos * T}/{per_task_total * T}  mean success "
                                  f"{last['eval/success_rate/mean']:.2f}  ({last['time/env_steps_per_s']:.0f} env steps/s)",
                                  file=sys.stderr)
                    save()
                    if flag.get("stop"):
                        raise StopRequested
                if not final_done:
                    if cfg.eval.final_episodes_per_task != cfg.eval.episodes_per_task or not last:
                        last = run_eval(cfg.eval.final_episodes_per_task or None, interruptible=True)
                        logger.log(last, pos * T)
                    final_done = True
                    save()
            except StopRequested:
                if saved_at != env_steps():  # stopped inside a chunk (an abandoned final evaluation keeps the last one)
                    save()
                print(f"stopped by {flag['stop']} at env step {env_steps()}; checkpoint saved, continue with "
                      f"`mtrl-arch train --resume {run_dir}`", file=sys.stderr)
                return last
        logger.summary(last)
        tmp = run_dir / "model.pt.tmp"  # the final models, written atomically
        torch.save({"format": MODEL_FORMAT, "version": 1, "config": cfg.to_dict(), "tasks": list(tasks),
                    "models": {t: _zip(m) for t, m in zip(tasks, models)}}, tmp)
        os.replace(tmp, run_dir / "model.pt")
        return last
    finally:
        logger.close()
        for m in models:
            m.env.close()


def _replay_bytes(models: list[Any]) -> int:
    """SB3's whole pre-allocated buffer, filled or not (as the MT-SAC loop counts its replay's capacity)."""
    return sum(sum(v.nbytes for v in vars(m.replay_buffer).values() if isinstance(v, np.ndarray)) for m in models)


def load_sb3_policy(run_dir: Path, tasks: tuple[str, ...], device: str = "cpu") -> SB3SingleTask:
    """The batched policy of a finished run (``model.pt``) or, failing that, of its newest intact checkpoint.

    Runs checkpointed before the SB3 baseline used :mod:`mtrl_arch.checkpoint` (one SB3 zip per task in
    ``checkpoints/sb3/``, no ``model.pt``) are read last; none are kept in benchmarks/results.
    """
    from stable_baselines3 import SAC

    model, zips = run_dir / "model.pt", {}
    if model.is_file():
        d = torch.load(model, map_location="cpu", weights_only=False)
        if not isinstance(d, dict) or d.get("format") != MODEL_FORMAT:
            raise ConfigError(f"{model} is not an sb3_stl model saved by mtrl-arch")
        zips = d["models"]
    elif (found := load_latest(run_dir / "checkpoints")) is not None and found[1].get("algo") == "sb3_stl":
        zips = {t: a["zip"] for t, a in found[1]["agents"].items()}
    else:
        old = run_dir / "checkpoints" / "sb3"
        zips = {t: (old / f"{t}.zip").read_bytes() for t in tasks if (old / f"{t}.zip").is_file()}
    missing = [t for t in tasks if t not in zips]
    if missing:
        raise ConfigError(f"{run_dir} has neither model.pt nor a readable checkpoint with SB3 models for {missing}; "
                          "was the run started?")
    # buffer_size=1: acting needs no replay, which SB3 would otherwise allocate in full
    return SB3SingleTask([SAC.load(io.BytesIO(zips[t]), device=device, buffer_size=1) for t in tasks])
