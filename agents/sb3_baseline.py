"""The single-task baseline of the CoNAL paper: one stable-baselines3 SAC per task.

``agent.algo=sb3_stl`` (config ``mt10_stl_sb3``). Each task gets its own SB3 ``SAC`` on its
own 39-d Meta-World env (no one-hot), with the MT-SAC hyper-parameters of the config
(``model.hidden``, ``train.lr``, ``agent.batch_per_task``, ``agent.gamma``, ``agent.tau``,
``agent.init_alpha``, ``agent.buffer_size`` split over the tasks, ``train.warmup_steps``,
``train.updates_per_step``), and evaluated with the same protocol and the same evaluation envs
as the multi-task agent. Differences from MT-SAC that SB3 fixes: no gradient-norm clipping,
SB3's own network initialisation.

The learner that :class:`mtrl_arch.loop.Run` drives (so cadence, signals, checkpoints, resume and
the final evaluation are every run's): the agents train round-robin in chunks, the loop's periods,
that end at every ``eval.every_env_steps`` and ``train.checkpoint_every_env_steps`` (summed over
tasks); ``train_step`` is one task's share of a chunk. A checkpoint holds, per task, the SB3 zip
(networks, optimisers, entropy coefficient, counters, last observation), the filled part of the
replay (``train.save_replay``), the task's random streams and its action space's, and what rebuilds
its env mid-episode; plus the process's random streams and the chunk reached. A finished run
writes ``model.pt`` (every task's SB3 zip), which ``mtrl-arch eval`` reads.

No code from files: SB3's zip holds, besides weights (which SB3 loads with ``weights_only=True``), a JSON
``data`` entry in which some values are cloudpickled. Those are never unpickled by SB3: its structure (policy
and replay classes, spaces, schedules: code) is rebuilt from the config and the task's env and handed to
``SAC.load`` as ``custom_objects``; its state (last observation, episode statistics) is left out of the zip
and kept beside it as tensors and lists. Zips written before (checkpoint format 1, ``model.pt``) hold that
state cloudpickled: resume reads it with numpy's array constructor and ``deque`` alone allowed
(:func:`mtrl_arch.safe_load.restricted_unpickle`), evaluation does not need it. Any other cloudpickled
value is refused (``--trust-file``: SB3's own loading, for a file the user trusts).

Exact resume (a resumed CPU run is bit-identical to an uninterrupted one, ``time/*`` aside):
each task trains on random streams of its own (swapped in around its ``learn``), so nothing
depends on the order of the tasks or on where training was cut; a stop ends ``learn`` between
two rollouts, after the last step's updates; and, as in the MT-SAC learner, the env is rebuilt
rather than pickled: Meta-World's dynamics are deterministic and a reset's only draw is the
goal, so restoring the env's generators as they were before the episode's reset, resetting and
replaying the episode's actions gives the exact state.
"""
from __future__ import annotations

import base64
import collections
import io
import json
import os
import pickle
import sys
import time
import zipfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable

import gymnasium as gym
import numpy as np
import torch

from mtrl_arch.checkpoint import StopRequested, assert_finite, load_latest, rng_state, set_rng_state
from mtrl_arch.config import Config, ConfigError
from mtrl_arch.loop import Cadence
from mtrl_arch.safe_load import np_numeric, refusal, restricted_unpickle, torch_load, weights_only_refusal

from .rl_loop import eval_lines

MODEL_FORMAT = "mtrl-arch/sb3-stl"

# the cloudpickled values of an SB3 SAC zip's `data`: code, rebuilt from the config and the env, never read ...
SB3_REBUILT = ("policy_class", "observation_space", "action_space", "replay_buffer_class", "train_freq", "lr_schedule")
# ... and state: kept beside the zip as plain data (format 1's zips hold it, read with SB3_STATE_GLOBALS alone)
SB3_STATE = ("_last_obs", "_last_episode_starts", "_last_original_obs", "ep_info_buffer", "ep_success_buffer")
SB3_STATE_GLOBALS = {"numpy._core.numeric._frombuffer": np_numeric._frombuffer,
                     "numpy.core.numeric._frombuffer": np_numeric._frombuffer, "numpy.dtype": np.dtype,
                     "collections.deque": collections.deque}


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
        return {"at_reset": self.at_reset, "actions": torch.from_numpy(np.stack(self.actions)) if self.actions else None,
                "rng": [g.bit_generator.state for g in _env_rngs(self.env)]}

    def rebuild(self, vec: Any, saved: dict, last_obs: np.ndarray | None, task: str) -> None:
        """Put the env (through SB3's ``vec``, so its Monitor counts alike) where the checkpoint ``saved`` left it."""
        if saved["at_reset"] is not None:
            _set_rngs(self, saved["at_reset"])
            obs = vec.reset()
            for a in np.asarray(saved["actions"]) if saved["actions"] is not None else ():  # format 1: an array
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


def _stop_callback(stop: Callable[[], None]) -> Any:
    from stable_baselines3.common.callbacks import BaseCallback

    class Stop(BaseCallback):
        """Ends learn() at the start of a rollout: the previous step's updates are done, the next step not begun
        (a False from on_step would come after the env stepped but before its transition was stored)."""

        def _on_rollout_start(self) -> None:
            stop()

        def _on_step(self) -> bool:
            return True

    return Stop()


def _zip(model: Any) -> bytes:
    """SB3's zip without its state (:data:`SB3_STATE`, kept by :func:`_sb3_state`)."""
    buf = io.BytesIO()
    model.save(buf, exclude=list(SB3_STATE))
    return buf.getvalue()


def _plain(v: Any) -> Any:
    """An SB3 state value as tensors, numbers and lists (what a weights-only load reads)."""
    if isinstance(v, np.ndarray):
        return torch.from_numpy(v.copy())
    if isinstance(v, collections.deque):
        return {"deque": [_plain(x) for x in v], "maxlen": v.maxlen}
    if isinstance(v, dict):
        return {k: _plain(x) for k, x in v.items()}
    return v.item() if isinstance(v, np.generic) else v


def _unplain(v: Any) -> Any:
    if torch.is_tensor(v):
        return v.numpy()
    if isinstance(v, dict) and "deque" in v:
        return collections.deque(v["deque"], maxlen=v["maxlen"])
    return v


def _sb3_state(model: Any) -> dict:
    return {k: _plain(getattr(model, k, None)) for k in SB3_STATE}


def _sb3_structure(model: Any) -> dict:
    """The code-bearing values of ``model``'s zip (:data:`SB3_REBUILT`), from a model built by the config."""
    return {k: getattr(model, k) for k in SB3_REBUILT}


def _load_sb3(zip_bytes: bytes, where: str, structure: dict, trust_file: bool, state: dict | None = None,
              read_state: bool = False, **kwargs) -> Any:
    """``SAC.load`` of one zip that never unpickles its cloudpickled values: :data:`SB3_REBUILT` come from
    ``structure``; the state from ``state`` (format 2), else, with ``read_state``, from the zip with
    :data:`SB3_STATE_GLOBALS` alone (format 1); anything else cloudpickled is refused unless ``trust_file``."""
    from stable_baselines3 import SAC

    custom: dict[str, Any] = {}
    if not trust_file:
        try:
            with zipfile.ZipFile(io.BytesIO(zip_bytes)) as z:
                data = json.loads(z.read("data"))
        except (zipfile.BadZipFile, KeyError, ValueError, UnicodeDecodeError):
            raise ConfigError(f"{where} is damaged (not a stable-baselines3 zip with a JSON `data` entry)") from None
        for k, v in data.items():
            if not (isinstance(v, dict) and ":serialized:" in v):
                continue
            if k in SB3_REBUILT:
                custom[k] = structure[k]
            elif k in SB3_STATE:
                custom[k] = restricted_unpickle(base64.b64decode(v[":serialized:"]), SB3_STATE_GLOBALS, where) \
                    if read_state and state is None else None
            else:
                raise refusal(where, f"a cloudpickled `{k}`")
    try:
        m = SAC.load(io.BytesIO(zip_bytes), custom_objects=custom, **kwargs)
    except pickle.UnpicklingError as e:  # a .pth entry (SB3 loads them weights-only) naming more than tensors
        raise weights_only_refusal(e, where) from None
    for k, v in (state or {}).items():
        setattr(m, k, _unplain(v))
    return m


def _replay_state(rb: Any) -> dict:
    n = rb.buffer_size if rb.full else rb.pos  # the filled rows only: SB3 pre-allocates the whole buffer
    return {"pos": rb.pos, "full": rb.full,
            "arrays": {k: torch.from_numpy(v[:n].copy()) for k, v in vars(rb).items() if isinstance(v, np.ndarray)}}


def _load_replay(rb: Any, d: dict) -> None:
    for k, v in d["arrays"].items():
        getattr(rb, k)[:len(v)] = np.asarray(v)  # a tensor (format 1: an array)
    rb.pos, rb.full = d["pos"], d["full"]


class SB3Run:
    """The learner (:mod:`mtrl_arch.loop`'s protocol): T SB3 SACs trained round-robin, a chunk per period."""
    unit, eval_everywhere, searching = "env-step", False, False

    def __init__(self, cfg: Config, tasks: tuple[str, ...], device: str, make_env: Callable[[str], gym.Env],
                 evaluate: Callable[[Callable, int | None], dict], trust_file: bool = False):
        from stable_baselines3 import SAC
        from stable_baselines3.common.monitor import Monitor
        from stable_baselines3.common.vec_env import DummyVecEnv

        self.cfg, self.tasks, self.device, self.evaluate_fn = cfg, tasks, device, evaluate
        self.trust_file = trust_file  # resume: load the checkpoint's SB3 zips with SB3's own (pickle) loading
        self.kwargs = _sac_kwargs(cfg, len(tasks), device)
        self.recs: list[_Replayable] = []
        self.models: list[Any] = []
        self.slots: list[dict] = []  # each task's random streams while another trains
        try:
            for i, task in enumerate(tasks):
                rec = _Replayable(make_env(task))
                self.recs.append(rec)
                self.models.append(SAC("MlpPolicy", DummyVecEnv([lambda rec=rec: Monitor(rec)]),  # SB3's own wrapping
                                       seed=cfg.seed * 1000 + i, **self.kwargs))
                self.slots.append({"rng": rng_state()})  # the task's streams go on from its seeded construction
        except BaseException:
            self.close()
            raise
        self.model = SB3SingleTask(self.models)
        self.pos = self.n = 0  # per-task env steps: of the chunks done, of the budget
        self.last_eval = {}
        T, every = len(tasks), cfg.eval.every_env_steps
        self.every = max(1, every // T) if every else 0  # per task; 0: never
        self.ck = -(-cfg.train.checkpoint_every_env_steps // T)

    # ---- progress and periods ------------------------------------------------------------------------------
    def progress(self) -> int:
        return sum(m.num_timesteps for m in self.models)

    def total(self) -> int:
        return self.n * len(self.tasks)

    def finished(self) -> bool:
        return all(m.num_timesteps >= self.n for m in self.models)

    def target(self) -> int:
        """The per-task env step the open chunk ends at: the next evaluation, checkpoint or the budget's end
        (absolute: a resumed chunk ends where the whole one does)."""
        nxt = lambda k: (self.pos // k + 1) * k if k else self.n  # noqa: E731
        return min(self.n, nxt(self.every), nxt(self.ck))

    def periods(self) -> int:
        return self.target()  # periods are numbered by their end, so the cadence counts per-task env steps

    def period_pending(self) -> bool:
        return self.pos < self.target() and all(m.num_timesteps >= self.target() for m in self.models)

    def cadence(self) -> Cadence:
        return Cadence(log=1, eval=self.every, checkpoint=self.ck)

    def begin(self, budget: int) -> None:
        self.n = budget // len(self.tasks)
        self._t, self._steps = time.perf_counter(), self.progress()

    def train_step(self, stop: Callable[[], None] | None = None) -> list:
        """The next task's share of the chunk; ``stop()`` ends it between two rollouts (the loop then stops)."""
        p = self.target()
        m, slot = next((m, s) for m, s in zip(self.models, self.slots) if m.num_timesteps < p)
        with _own_streams(slot):
            try:
                m.learn(p - m.num_timesteps, callback=None if stop is None else _stop_callback(stop),
                        reset_num_timesteps=False, progress_bar=False)
            except StopRequested:
                pass
        return []

    def end_period(self, evaluation: dict, means: dict | None) -> dict:
        """The chunk's speed, on evaluation lines (the loop adds the wall time)."""
        self.pos = self.target()
        now, steps = time.perf_counter(), self.progress()
        rate = (steps - self._steps) / max(now - self._t, 1e-9)
        self._t, self._steps = now, steps
        return {"time/env_steps_per_s": rate} if evaluation else {}

    def evaluate(self, stop: Callable[[], None] | None = None, final: bool = False) -> dict[str, float]:
        def act(o: np.ndarray) -> np.ndarray:
            if stop is not None:
                stop()
            return self.model.act(o)

        k = self.cfg.eval.final_episodes_per_task or None if final else self.cfg.eval.episodes_per_task
        self.last_eval = eval_lines(self.evaluate_fn(act, k))
        return self.last_eval

    def finite(self, window: Any = None) -> None:
        named = [(f"{t}.{n}", p) for t, m in zip(self.tasks, self.models)
                 for n, p in [*m.policy.named_parameters(), ("log_ent_coef", getattr(m, "log_ent_coef", None))]
                 if p is not None]
        assert_finite(named, f"at env step {self.progress()}")  # never checkpoint a diverged run

    # ---- state -------------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        mode = self.cfg.train.save_replay
        replay = mode == "always" or (mode == "auto" and _replay_bytes(self.models) <= 2**30)
        agents = {t: {"zip": _zip(m), "sb3_state": _sb3_state(m), "rng": slot["rng"],
                      "action_space_rng": m.action_space.np_random.bit_generator.state,
                      "env": rec.state(), **({"replay": _replay_state(m.replay_buffer)} if replay else {})}
                  for t, m, slot, rec in zip(self.tasks, self.models, self.slots, self.recs)}
        return {"algo": "sb3_stl", "tasks": list(self.tasks), "pos": self.pos,
                "last_eval": self.last_eval, "rng": rng_state(), "agents": agents}

    def load_state_dict(self, d: dict) -> None:
        if d.get("algo") != "sb3_stl":
            raise ConfigError("the checkpoint was not written by agent.algo=sb3_stl; resume the run with its own agent.algo")
        lost = []
        for i, (task, rec) in enumerate(zip(self.tasks, self.recs)):
            s = d["agents"][task]
            # the current settings, except those that fix shapes (resume keys: equal anyway)
            m = _load_sb3(s["zip"], f"the {task} SB3 model in it", _sb3_structure(self.models[i]), self.trust_file,
                          s.get("sb3_state"), read_state=True, env=self.models[i].env, device=self.device,
                          force_reset=False, **{k: v for k, v in self.kwargs.items() if k not in ("policy_kwargs", "device")})
            self.models[i] = m
            if "replay" in s:
                _load_replay(m.replay_buffer, s["replay"])
            elif m.num_timesteps > m.learning_starts:  # SB3 would sample an empty buffer: refill first
                m.learning_starts = m.num_timesteps + max(self.cfg.train.warmup_steps, self.cfg.agent.batch_per_task)
                lost.append(task)
            rec.rebuild(m.env, s["env"], m._last_obs, task)
            m.action_space.np_random.bit_generator.state = s["action_space_rng"]  # a copy of the env's after load
            self.slots[i] = {"rng": s["rng"]}
        if lost:
            print(f"warning: the checkpoint holds no replay (train.save_replay={self.cfg.train.save_replay}); "
                  f"{', '.join(lost)} collect random steps before updating again (this resume is not exact)",
                  file=sys.stderr)
        self.pos, self.last_eval = d["pos"], d["last_eval"]  # self.model reads self.models
        set_rng_state(d["rng"])  # SAC.load reseeded the process's streams

    def save_model(self, path: Path) -> None:
        tmp = path.with_suffix(".pt.tmp")  # written atomically
        torch.save({"format": MODEL_FORMAT, "version": 1, "config": self.cfg.to_dict(), "tasks": list(self.tasks),
                    "models": {t: _zip(m) for t, m in zip(self.tasks, self.models)},
                    "sb3_state": {t: _sb3_state(m) for t, m in zip(self.tasks, self.models)}}, tmp)
        os.replace(tmp, path)

    def close(self) -> None:
        for m in self.models:
            m.env.close()


def _replay_bytes(models: list[Any]) -> int:
    """SB3's whole pre-allocated buffer, filled or not (as the MT-SAC loop counts its replay's capacity)."""
    return sum(sum(v.nbytes for v in vars(m.replay_buffer).values() if isinstance(v, np.ndarray)) for m in models)


def load_sb3_policy(run_dir: Path, cfg: Config, tasks: tuple[str, ...], make_env: Callable[[str], gym.Env],
                    device: str = "cpu", trust_file: bool = False) -> SB3SingleTask:
    """The batched policy of a finished run (``model.pt``) or, failing that, of its newest intact checkpoint.

    Runs checkpointed before the SB3 baseline used :mod:`mtrl_arch.checkpoint` (one SB3 zip per task in
    ``checkpoints/sb3/``, no ``model.pt``) are read last; none are kept in benchmarks/results. What the zips
    cloudpickle is rebuilt from ``cfg`` and ``make_env(task)`` (see the module docstring).
    """
    from stable_baselines3 import SAC

    model, zips, where = run_dir / "model.pt", {}, {}
    if model.is_file():
        d = torch_load(model, model, trust_file=trust_file)
        if not isinstance(d, dict) or d.get("format") != MODEL_FORMAT:
            raise ConfigError(f"{model} is not an sb3_stl model saved by mtrl-arch")
        zips, where = d["models"], {t: f"{model} ({t})" for t in d["models"]}
    elif (found := load_latest(run_dir / "checkpoints", trust_file=trust_file)) is not None \
            and found[1].get("algo") == "sb3_stl":
        zips = {t: a["zip"] for t, a in found[1]["agents"].items()}
        where = {t: f"{run_dir}/checkpoints/ckpt-{found[0]}.pt ({t})" for t in zips}
    else:
        old = run_dir / "checkpoints" / "sb3"
        zips = {t: (old / f"{t}.zip").read_bytes() for t in tasks if (old / f"{t}.zip").is_file()}
        where = {t: str(old / f"{t}.zip") for t in zips}
    missing = [t for t in tasks if t not in zips]
    if missing:
        raise ConfigError(f"{run_dir} has neither model.pt nor a readable checkpoint with SB3 models for {missing}; "
                          "was the run started?")
    kwargs = _sac_kwargs(cfg, len(tasks), device)
    policies = []
    for t in tasks:
        env = make_env(t)
        try:  # buffer_size=1: acting needs no replay, which SB3 would otherwise allocate in full
            structure = _sb3_structure(SAC("MlpPolicy", env, **{**kwargs, "buffer_size": 1}))
        finally:
            env.close()
        policies.append(_load_sb3(zips[t], where[t], structure, trust_file, device=device, buffer_size=1))
    return SB3SingleTask(policies)
