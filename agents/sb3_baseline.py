"""The single-task baseline of the CoNAL paper: one stable-baselines3 SAC per task.

``agent.algo=sb3_stl`` (config ``mt10_stl_sb3``). Each task gets its own SB3 ``SAC`` on its
own 39-d Meta-World env (no one-hot), with the MT-SAC hyper-parameters of the config
(``model.hidden``, ``agent.lr``, ``agent.batch_per_task``, ``agent.gamma``, ``agent.tau``,
``agent.init_alpha``, ``agent.buffer_size`` split over the tasks, ``train.warmup_steps``,
``train.updates_per_step``). The ten agents are trained round-robin in chunks of
``eval.every_env_steps`` (summed over tasks), and evaluated together with the same
protocol and the same evaluation envs as the multi-task agent
(:func:`mtrl_arch.envs.metaworld.evaluate`). Differences from MT-SAC that SB3 fixes:
no gradient-norm clipping, SB3's own network initialisation.

Checkpoints (every evaluation chunk and at the end) hold each task's SB3 zip and its
replay buffer (``train.save_replay``); ``--resume`` continues from the last one.
"""
from __future__ import annotations

import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from mtrl_arch.config import Config
from mtrl_arch.logger import Logger

from .rl_loop import eval_lines


def _sac_kwargs(cfg: Config, n_tasks: int, device: str) -> dict[str, Any]:
    rate = cfg.train.updates_per_step
    # SB3 trains every train_freq env steps; rates below one update per step become a frequency
    train_freq, gradient_steps = (1, int(round(rate))) if rate >= 1 else (max(1, int(round(1 / rate))), 1)
    return dict(
        learning_rate=cfg.agent.lr,
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


def train_sb3_stl(cfg: Config, run_dir: Path, tasks: tuple[str, ...], device: str, resume: bool,
                  progress: bool, env_meta: dict) -> dict[str, Any]:
    from stable_baselines3 import SAC

    from mtrl_arch.envs.metaworld import evaluate, make_task_env

    T = len(tasks)
    ckpt = run_dir / "checkpoints" / "sb3"
    state_path = ckpt / "state.json"
    state = json.loads(state_path.read_text()) if resume and state_path.is_file() else None
    if resume and state is None:
        print(f"no SB3 checkpoint in {ckpt}: starting from the beginning", file=sys.stderr)
    envs = [make_task_env(cfg.env.name, t, cfg.seed, cfg.env.max_episode_steps or None, cfg.env.reward_version)
            for t in tasks]
    kwargs = _sac_kwargs(cfg, T, device)
    models = []
    for i, (task, env) in enumerate(zip(tasks, envs)):
        if state is not None:
            m = SAC.load(ckpt / f"{task}.zip", env=env, device=device)
            if (ckpt / f"{task}.replay.pkl").is_file():
                m.load_replay_buffer(ckpt / f"{task}.replay.pkl")
        else:
            m = SAC("MlpPolicy", env, seed=cfg.seed * 1000 + i, **kwargs)
        models.append(m)
    policy = SB3SingleTask(models)
    logger = Logger(run_dir, cfg.wandb, {**cfg.to_dict(), "env_metadata": env_meta}, run_dir.name,
                    resume_step=state["env_steps"] if state else (0 if resume else None))
    params = policy.param_count()
    done = state["env_steps"] if state else 0
    if state is None:
        logger.log({"params/sb3_policies/total": params}, 0)
    per_task_total = cfg.train.total_env_steps // T
    chunk = max(1, (cfg.eval.every_env_steps or cfg.train.total_env_steps) // T)
    wall0 = time.time() - (state["wall"] if state else 0.0)
    last: dict[str, Any] = {}

    def run_eval(k: int | None) -> dict[str, Any]:
        return eval_lines(evaluate(policy.act, cfg.env.name, tasks, cfg.seed, k, cfg.env.max_episode_steps or None,
                                   None, cfg.env.reward_version, one_hot=False))

    try:
        while done // T < per_task_total:
            n = min(chunk, per_task_total - done // T)
            t0 = time.time()
            for m in models:
                m.learn(n, reset_num_timesteps=False, progress_bar=False)
            done += n * T
            last = run_eval(cfg.eval.episodes_per_task)
            last.update({"time/wall_s": time.time() - wall0, "time/env_steps_per_s": n * T / (time.time() - t0)})
            logger.log(last, done)
            if progress:
                print(f"[sb3_stl] env steps {done}/{per_task_total * T}  mean success "
                      f"{last['eval/success_rate/mean']:.2f}  ({last['time/env_steps_per_s']:.0f} env steps/s)",
                      file=sys.stderr)
            _save(models, tasks, ckpt, {"env_steps": done, "wall": time.time() - wall0}, cfg.train.save_replay)
        if cfg.eval.final_episodes_per_task != cfg.eval.episodes_per_task or not last:
            last = run_eval(cfg.eval.final_episodes_per_task or None)
            logger.log(last, done)
        logger.summary(last)
        return last
    finally:
        logger.close()
        for e in envs:
            e.close()


def _replay_bytes(models: list[Any]) -> int:
    """SB3 pickles its whole pre-allocated buffer, filled or not."""
    return sum(sum(v.nbytes for v in vars(m.replay_buffer).values() if isinstance(v, np.ndarray)) for m in models)


def _save(models: list[Any], tasks: tuple[str, ...], ckpt: Path, state: dict, save_replay: str) -> None:
    """Write every model (and replay) into a fresh folder, then swap it in: a crash leaves the old one."""
    tmp = ckpt.with_name("sb3.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for task, m in zip(tasks, models):
        m.save(tmp / f"{task}.zip")
        if save_replay == "always" or (save_replay == "auto" and _replay_bytes(models) <= 2**30):
            m.save_replay_buffer(tmp / f"{task}.replay.pkl")
    (tmp / "state.json").write_text(json.dumps(state))
    old = ckpt.with_name("sb3.old")
    shutil.rmtree(old, ignore_errors=True)
    if ckpt.exists():
        os.replace(ckpt, old)
    os.replace(tmp, ckpt)
    shutil.rmtree(old, ignore_errors=True)


def load_sb3_policy(run_dir: Path, tasks: tuple[str, ...], device: str = "cpu") -> SB3SingleTask:
    """The batched policy of a finished (or checkpointed) ``sb3_stl`` run."""
    from stable_baselines3 import SAC

    ckpt = run_dir / "checkpoints" / "sb3"
    missing = [t for t in tasks if not (ckpt / f"{t}.zip").is_file()]
    if missing:
        raise FileNotFoundError(f"{ckpt} has no saved SB3 model for {missing}; was the run started?")
    return SB3SingleTask([SAC.load(ckpt / f"{t}.zip", device=device) for t in tasks])
