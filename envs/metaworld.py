"""Meta-World MT10 / MT50 (v3 environments) as a batched multi-task env for multi-task SAC.

Built from metaworld's own building blocks (``metaworld.MT10``/``MT50`` for the goal
sampling, ``metaworld._init_each_env`` for the per-task wrapper stack, gymnasium's
Sync/AsyncVectorEnv in same-step autoreset mode, exactly as ``gymnasium.make_vec
('Meta-World/MT10')`` does), with two differences:

* the benchmark object (whose construction samples 50 goal variations per task and is
  ~90 % of the cost of creating an MT10 vector env) is built once per ``(name, seed)``
  and cached in this module, so training and evaluation envs share it;
* a subset of the benchmark's tasks can be chosen; sub-env ``i`` runs ``tasks[i]`` and the
  one-hot appended to the 39-d observation is over the *chosen* tasks.

What metaworld does (3.1.1, read from its source):

* Each sub-env holds the 50 goal variations (``Task`` objects) of its task;
  ``RandomTaskSelectWrapper`` (the MT default, ``task_select="random"``) draws one of them
  uniformly, *with replacement*, from the env's ``np_random`` at every reset.
* ``max_path_length`` is 500; episodes are truncated (never terminated) at 500 steps,
  ``info["success"]`` is a 0/1 float.
* The reward function version defaults to ``"v2"`` (``_init_each_env`` and every v3
  env constructor); ``"v1"`` is the older shaping.
* ``metaworld.evaluation.evaluation`` switches ``terminate_on_success`` on (so an episode
  *stops early*, with ``terminated=True``, at the first step with success), runs the
  vector env until every task has finished ``num_episodes`` (default 50) episodes and
  counts an episode successful iff ``final_info["success"]`` -- i.e. success at any step.
  Goals come from ``RandomTaskSelectWrapper``, so its 50 episodes are 50 goals drawn with
  replacement (about 32 distinct ones), *not* one episode per goal variation.

:func:`evaluate` here keeps metaworld's early stop and success definition but visits the
goal variations without replacement (metaworld's ``PseudoRandomTaskSelectWrapper``: a
seeded permutation of the 50 goals), so ``episodes_per_task=None`` runs every goal
variation exactly once: same expectation as metaworld's protocol, lower variance.

:func:`record_episodes` plays the same first episodes with rendering on (rollout videos,
:mod:`mtrl_arch.envs.video`).

This module imports numpy, gymnasium and metaworld only (no torch, nothing from agents/).
"""

from __future__ import annotations

import difflib
import importlib.metadata
import inspect
import warnings
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import gymnasium as gym
import numpy as np

import metaworld
import metaworld.env_dict as _env_dict

__all__ = [
    "MT10_TASKS",
    "MT50_TASKS",
    "BENCHMARKS",
    "benchmark_tasks",
    "resolve_tasks",
    "observation_dim",
    "ACTION_DIM",
    "make_benchmark",
    "MetaWorldMT",
    "evaluate",
    "record_episodes",
    "default_reward_version",
]

MT10_TASKS: tuple[str, ...] = (
    "reach-v3",
    "push-v3",
    "pick-place-v3",
    "door-open-v3",
    "drawer-open-v3",
    "drawer-close-v3",
    "button-press-topdown-v3",
    "peg-insert-side-v3",
    "window-open-v3",
    "window-close-v3",
)
"""The MT10 tasks in metaworld's order (``metaworld.env_dict.MT10_V3``)."""

MT50_TASKS: tuple[str, ...] = tuple(_env_dict.MT50_V3.keys())
"""The MT50 tasks in metaworld's order (``metaworld.env_dict.MT50_V3``)."""

_BENCHMARK_CLASSES: dict[str, Any] = {
    "MT10": _env_dict.MT10_V3,
    "MT25": _env_dict.MT25_V3,
    "MT50": _env_dict.MT50_V3,
}
BENCHMARKS: tuple[str, ...] = tuple(_BENCHMARK_CLASSES)

N_GOALS: int = 50
"""Goal variations per task that metaworld samples for an MT benchmark (``metaworld._N_GOALS``)."""

_BENCHMARK_CACHE: dict[tuple[str, int], Any] = {}

ACTION_DIM = 4
_BASE_OBS_DIM = 39


def observation_dim(n_tasks: int, one_hot: bool = True) -> int:
    """The observation size of an ``n_tasks``-task :class:`MetaWorldMT` (39, plus the task one-hot),
    known without building an environment."""
    return _BASE_OBS_DIM + (n_tasks if one_hot else 0)


def _versions() -> dict[str, str]:
    out = {}
    for pkg in ("metaworld", "gymnasium", "mujoco"):
        try:
            out[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:  # pragma: no cover
            out[pkg] = "unknown"
    return out


def default_reward_version() -> str:
    """Metaworld's default ``reward_function_version`` (read from ``_init_each_env``; "v2" in 3.1.1)."""
    try:
        default = inspect.signature(metaworld._init_each_env).parameters[
            "reward_function_version"
        ].default
    except (AttributeError, KeyError, TypeError, ValueError):  # pragma: no cover
        default = inspect.Parameter.empty
    return "v2" if default is inspect.Parameter.empty else str(default)


def _canonical_benchmark(name: str) -> str:
    key = str(name).strip().upper()
    if key not in _BENCHMARK_CLASSES:
        raise ValueError(
            f"unknown Meta-World benchmark {name!r}; expected one of {', '.join(BENCHMARKS)}"
        )
    return key


def benchmark_tasks(name: str) -> tuple[str, ...]:
    """Task names of benchmark ``name`` ('MT10' | 'MT50', also 'MT25') in metaworld's order."""
    return tuple(_BENCHMARK_CLASSES[_canonical_benchmark(name)].keys())


def resolve_tasks(name: str, tasks: Sequence[str] | str | None) -> tuple[str, ...]:
    """Choose a subset of benchmark ``name``'s tasks.

    ``tasks`` is a list of task names (or one comma-separated string); ``None`` or empty means
    all tasks. The result is in *benchmark* order (so the same set always gives the same
    one-hot layout), without duplicates. An unknown name raises a one-line ``ValueError`` that
    lists the close matches (difflib).
    """
    all_tasks = benchmark_tasks(name)
    if tasks is None:
        return all_tasks
    if isinstance(tasks, str):
        tasks = [t for t in (s.strip() for s in tasks.split(",")) if t]
    tasks = list(tasks)
    if not tasks:
        return all_tasks
    unknown = [t for t in tasks if t not in all_tasks]
    if unknown:
        parts = []
        for t in unknown:
            close = difflib.get_close_matches(str(t), all_tasks, n=3, cutoff=0.5)
            hint = f"close matches: {', '.join(close)}" if close else "no close match"
            parts.append(f"{t!r} ({hint})")
        raise ValueError(
            f"unknown task(s) for {_canonical_benchmark(name)}: {'; '.join(parts)}"
        )
    dup = sorted({t for t in tasks if tasks.count(t) > 1})
    if dup:
        raise ValueError(f"duplicate task(s): {', '.join(dup)}")
    chosen = set(tasks)
    return tuple(t for t in all_tasks if t in chosen)


def make_benchmark(name: str, seed: int):
    """The ``metaworld.MT10`` / ``MT50`` object for ``seed``, built once per process.

    Construction samples the 50 goal variations of every task (MT10: ~9 s); the result is cached
    by ``(name, seed)`` in a module-level dict and shared by every env built from it.
    """
    key = (_canonical_benchmark(name), int(seed))
    bench = _BENCHMARK_CACHE.get(key)
    if bench is None:
        bench = getattr(metaworld, key[0])(seed=key[1])
        _BENCHMARK_CACHE[key] = bench
    return bench


def _make_sub_env(
    env_cls: type,
    tasks: list,
    seed: int,
    env_id: int,
    num_tasks: int,
    max_episode_steps: int,
    one_hot: bool,
    reward_version: str,
    terminate_on_success: bool,
    task_select: str,
    render_size: int = 0,
    camera: str | None = None,
) -> gym.Env:
    """One sub-env: metaworld's own wrapper stack (``_init_each_env``) for one task; with ``render_size``,
    ``render()`` gives ``render_size``-square RGB frames from ``camera`` (see :func:`_frame`)."""
    with warnings.catch_warnings():
        # OneHotWrapper builds a float32 Box from float64 bounds: harmless precision warning.
        warnings.filterwarnings("ignore", message=".*precision lowered.*")
        env = metaworld._init_each_env(
            env_cls=env_cls,
            tasks=list(tasks),  # PseudoRandomTaskSelectWrapper shuffles its list in place
            seed=seed,
            max_episode_steps=max_episode_steps,
            terminate_on_success=terminate_on_success,
            use_one_hot=one_hot,
            env_id=env_id,
            num_tasks=num_tasks,
            task_select=task_select,
            reward_function_version=reward_version,
            **({"render_mode": "rgb_array", "camera_name": camera, "width": render_size, "height": render_size}
               if render_size else {}),
        )
    base = env.unwrapped
    if render_size:
        cams = [base.model.camera(i).name for i in range(base.model.ncam)]
        if camera not in cams:
            raise ValueError(f"unknown camera {camera!r}; metaworld's are {', '.join(cams)}")
        # the shadow map (4096 px square) and the table's reflection are ~70 % of a software-rendered frame
        # (OSMesa, or Mesa's EGL); the scene reads well without them. Rendering only: physics is unchanged
        base.model.light_castshadow[:] = 0
        base.model.mat_reflectance[:] = 0
    if max_episode_steps > base.max_path_length:
        # the raw env truncates at (and refuses to step past) max_path_length
        base.max_path_length = max_episode_steps
    if task_select != "random":
        env.get_wrapper_attr("toggle_sample_tasks_on_reset")(True)
    return env


def make_task_env(benchmark: str, task: str, seed: int = 0, max_episode_steps: int | None = None,
                  reward_version: str | None = None, benchmark_obj: Any | None = None) -> gym.Env:
    """One task of a benchmark as a plain gymnasium env (39-d obs, no one-hot), for single-task agents.

    Same goals, wrappers, episode length and reward version as the task's sub-env in
    :class:`MetaWorldMT` (goal drawn at random among the 50 at each reset).
    """
    name = _canonical_benchmark(benchmark)
    (task,) = resolve_tasks(name, [task])
    bench = benchmark_obj if benchmark_obj is not None else make_benchmark(name, seed)
    cls = bench.train_classes[task]
    return _make_sub_env(cls, [g for g in bench.train_tasks if g.env_name == task], seed, 0, 1,
                         int(max_episode_steps or cls.max_path_length), False,
                         str(reward_version or default_reward_version()), False, "random")


class MetaWorldMT:
    """Vector env over the chosen tasks: one sub-env per task (env ``i`` runs ``tasks[i]``).

    Observations are float32 ``[T, 39 + T]``: metaworld's 39-d observation followed by a
    one-hot over the *chosen* tasks (``one_hot=False``: just the 39-d part), so a 2-task subset
    gives 41-d obs. Every reset of sub-env ``i`` draws one of the 50 goal variations of its task
    (``task_select="random"``, metaworld's MT default; ``"pseudorandom"`` walks through a seeded
    permutation of the 50 goals, which :func:`evaluate` uses).

    The vector env autoresets in same-step mode: on the step where an episode ends, ``obs`` is
    already the first observation of the next episode, and ``info['final_obs']`` holds the true
    last observation (use it as ``next_obs``, with ``done = terminated``, for the replay).
    Episode statistics are kept here and queued for :meth:`pop_finished_episodes`.

    Seeding: ``seed`` picks the benchmark's goal set (``make_benchmark(benchmark, seed)``
    unless ``benchmark_obj`` is given) and seeds every sub-env's RNG (goal choice); the
    dynamics are deterministic, so the same seed gives identical observations and rewards for
    the same actions. ``reset(seed=s)`` re-seeds the sub-envs (metaworld ignores gymnasium's
    ``reset(seed=...)``, so it is done through the envs' ``seed`` method).
    """

    def __init__(
        self,
        benchmark: str = "MT10",
        tasks: Sequence[str] | str | None = None,
        seed: int = 0,
        vector: str = "sync",
        max_episode_steps: int | None = None,
        one_hot: bool = True,
        benchmark_obj: Any | None = None,
        reward_version: str | None = None,
        terminate_on_success: bool = False,
        task_select: str = "random",
        async_context: str | None = None,
        render_size: int = 0,
        camera: str = "corner",
    ) -> None:
        """Build the vector env.

        Args:
            benchmark: 'MT10' or 'MT50' (or 'MT25').
            tasks: subset of the benchmark's task names (None/empty: all), see :func:`resolve_tasks`.
            seed: goal-set and env seed.
            vector: 'sync' (gymnasium SyncVectorEnv) or 'async' (AsyncVectorEnv, one process per task).
            max_episode_steps: episode length; None = metaworld's default (max_path_length, 500).
            one_hot: append the one-hot task id over the chosen tasks.
            benchmark_obj: a prebuilt metaworld benchmark to take goals from (default: the cached
                ``make_benchmark(benchmark, seed)``); pass the training env's to evaluate on its goals.
            reward_version: metaworld ``reward_function_version`` ('v1' | 'v2'); None = metaworld's default.
            terminate_on_success: end episodes (terminated=True) at the first success
                (metaworld's evaluation setting); False for training, as in metaworld.
            task_select: 'random' (goal drawn with replacement at each reset, metaworld's MT
                default) or 'pseudorandom' (seeded permutation of the 50 goals, cycled).
            async_context: multiprocessing start method for 'async' (None: gymnasium's default).
            render_size: > 0: every sub-env renders ``render_size``-square RGB frames off-screen from
                ``camera`` (a metaworld camera name); the backend must be chosen first
                (:func:`mtrl_arch.envs.video.offscreen_backend`).
        """
        self.benchmark = _canonical_benchmark(benchmark)
        self.tasks: tuple[str, ...] = resolve_tasks(self.benchmark, tasks)
        self.n_tasks = len(self.tasks)
        self.seed = int(seed)
        if vector not in ("sync", "async"):
            raise ValueError(f"vector must be 'sync' or 'async', got {vector!r}")
        self.vector = vector
        if task_select not in ("random", "pseudorandom"):
            raise ValueError(f"task_select must be 'random' or 'pseudorandom', got {task_select!r}")
        self.task_select = task_select
        self.terminate_on_success = bool(terminate_on_success)
        self.one_hot = bool(one_hot)
        self.reward_version = str(reward_version or default_reward_version())
        if self.reward_version not in ("v1", "v2"):
            raise ValueError(f"reward_version must be 'v1' or 'v2', got {reward_version!r}")

        if benchmark_obj is None:
            benchmark_obj = make_benchmark(self.benchmark, self.seed)
        missing = [t for t in self.tasks if t not in benchmark_obj.train_classes]
        if missing:
            raise ValueError(f"benchmark_obj has no task(s) {missing}")
        self.benchmark_obj = benchmark_obj

        classes = [benchmark_obj.train_classes[t] for t in self.tasks]
        self.default_max_episode_steps = int(max(c.max_path_length for c in classes))
        if max_episode_steps is not None and int(max_episode_steps) < 1:
            raise ValueError(f"max_episode_steps must be >= 1, got {max_episode_steps}")
        self.max_episode_steps = int(max_episode_steps or self.default_max_episode_steps)

        goals = {t: [task for task in benchmark_obj.train_tasks if task.env_name == t] for t in self.tasks}
        self.n_goals = {t: len(g) for t, g in goals.items()}
        fns = [
            partial(
                _make_sub_env,
                env_cls=classes[i],
                tasks=goals[t],
                seed=self.seed,
                env_id=i,
                num_tasks=self.n_tasks,
                max_episode_steps=self.max_episode_steps,
                one_hot=self.one_hot,
                reward_version=self.reward_version,
                terminate_on_success=self.terminate_on_success,
                task_select=self.task_select,
                render_size=int(render_size),
                camera=camera,
            )
            for i, t in enumerate(self.tasks)
        ]
        mode = gym.vector.AutoresetMode.SAME_STEP
        if vector == "sync":
            self._envs = gym.vector.SyncVectorEnv(fns, autoreset_mode=mode)
        else:
            self._envs = gym.vector.AsyncVectorEnv(fns, autoreset_mode=mode, context=async_context)

        space = self._envs.single_observation_space
        self.observation_dim = int(np.prod(space.shape))
        assert self.observation_dim == observation_dim(self.n_tasks, self.one_hot)
        act = self._envs.single_action_space
        self.action_dim = int(np.prod(act.shape))
        self.action_low = np.asarray(act.low, dtype=np.float32)
        self.action_high = np.asarray(act.high, dtype=np.float32)
        self._closed = False
        self._needs_reset = True
        self._zero_stats()
        self._finished: list[dict] = []

    # ------------------------------------------------------------------ helpers
    @property
    def num_envs(self) -> int:
        return self.n_tasks

    @property
    def vector_env(self) -> gym.vector.VectorEnv:
        """The underlying gymnasium vector env (metaworld wrappers inside)."""
        return self._envs

    def _zero_stats(self) -> None:
        self._ep_return = np.zeros(self.n_tasks, dtype=np.float64)
        self._ep_length = np.zeros(self.n_tasks, dtype=np.int64)
        self._ep_success = np.zeros(self.n_tasks, dtype=bool)

    # ---------------------------------------------------------------------- API
    def reset(self, seed: int | None = None) -> np.ndarray:
        """Reset every sub-env (episodes in progress are dropped, not recorded).

        ``seed`` re-seeds all sub-envs first (same seed for all, as metaworld does). Returns
        float32 obs ``[T, obs_dim]``.
        """
        if seed is not None:
            self._envs.call("seed", int(seed))
        obs, _ = self._envs.reset()
        self._zero_stats()
        self._needs_reset = False
        self._obs = np.asarray(obs, dtype=np.float32).reshape(self.n_tasks, self.observation_dim)
        return self._obs

    def step(
        self, actions: np.ndarray, active: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, dict[str, Any]]:
        """Step all tasks with ``actions`` ``[T, 4]``.

        ``active`` (bool ``[T]``, sync vector env only): step only these sub-envs; the others keep
        their state (their rows repeat the last observation, reward 0, not done). The evaluation
        stops simulating a task once it has its episodes, instead of running discarded ones while
        the slowest task finishes.

        Returns ``(obs, reward, terminated, truncated, info)``: obs float32 ``[T, obs_dim]``
        (already the next episode's first obs where an episode ended), reward float32 ``[T]``,
        terminated/truncated bool ``[T]``, and info with

        * ``'success'``: bool ``[T]``, success at this step;
        * ``'final_obs'``: float32 ``[T, obs_dim]``, the true observation reached by this step
          (equals ``obs`` where no episode ended) -- the replay's ``next_obs``;
        * ``'done'``: bool ``[T]``, terminated | truncated;
        * ``'episode'``: list of records (see :meth:`pop_finished_episodes`) of the episodes
          that ended at this step (empty list if none).
        """
        if self._closed:
            raise RuntimeError("step() on a closed MetaWorldMT")
        if self._needs_reset:
            raise RuntimeError("call reset() before step()")
        actions = np.asarray(actions, dtype=np.float32)
        if actions.shape != (self.n_tasks, self.action_dim):
            raise ValueError(
                f"actions must have shape {(self.n_tasks, self.action_dim)}, got {actions.shape}"
            )
        if active is not None and not np.all(active):
            obs, reward, terminated, truncated, raw = self._step_some(actions, np.asarray(active, bool))
        else:
            obs, reward, terminated, truncated, raw = self._envs.step(actions)
        obs = self._obs = np.asarray(obs, dtype=np.float32).reshape(self.n_tasks, self.observation_dim)
        reward = np.asarray(reward, dtype=np.float32).reshape(self.n_tasks)
        terminated = np.asarray(terminated, dtype=bool).reshape(self.n_tasks)
        truncated = np.asarray(truncated, dtype=bool).reshape(self.n_tasks)
        done = terminated | truncated

        # success of this step: live envs report it at top level; envs that ended report it in
        # final_info (their top-level info is the reset info of the next episode)
        success = np.zeros(self.n_tasks, dtype=bool)
        if "success" in raw:
            m = np.asarray(raw.get("_success", np.ones(self.n_tasks, bool)), dtype=bool)
            success[m] = np.asarray(raw["success"])[m] > 0
        final_obs = obs.copy()
        if done.any():
            fin = raw.get("final_info", {})
            if "success" in fin:
                m = np.asarray(fin.get("_success", done), dtype=bool) & done
                success[m] = np.asarray(fin["success"])[m] > 0
            fo = raw["final_obs"]
            for i in np.flatnonzero(done):
                final_obs[i] = np.asarray(fo[i], dtype=np.float32).reshape(self.observation_dim)

        self._ep_return += reward
        self._ep_length += 1
        self._ep_success |= success
        records = []
        for i in np.flatnonzero(done):
            rec = {
                "task": self.tasks[i],
                "task_id": int(i),
                "return": float(self._ep_return[i]),
                "length": int(self._ep_length[i]),
                "success": bool(self._ep_success[i]),
                "final_success": bool(success[i]),
                "terminated": bool(terminated[i]),
                "truncated": bool(truncated[i]),
            }
            records.append(rec)
            self._ep_return[i] = 0.0
            self._ep_length[i] = 0
            self._ep_success[i] = False
        self._finished.extend(records)
        info = {"success": success, "final_obs": final_obs, "done": done, "episode": records}
        return obs, reward, terminated, truncated, info

    def _step_some(self, actions: np.ndarray, active: np.ndarray) -> tuple:
        """The sync vector env's step (same-step autoreset, its result's layout) for the ``active`` sub-envs
        alone; the others' rows: last observation, reward 0, not done, no success."""
        if self.vector != "sync":
            raise ValueError("step(active=...) needs vector='sync' (an async vector env steps every sub-env)")
        T = self.n_tasks
        obs, final_obs = self._obs.copy(), self._obs.copy()
        reward, success = np.zeros(T), np.zeros(T)
        terminated, truncated = np.zeros(T, bool), np.zeros(T, bool)
        for i in np.flatnonzero(active):
            sub = self._envs.envs[i]
            final_obs[i], reward[i], terminated[i], truncated[i], info = sub.step(actions[i])
            success[i] = info.get("success", 0.0)
            obs[i] = sub.reset()[0] if terminated[i] or truncated[i] else final_obs[i]
        return obs, reward, terminated, truncated, {"success": success, "final_info": {"success": success},
                                                    "final_obs": final_obs}

    def pop_finished_episodes(self) -> list[dict]:
        """Return and clear the episodes completed since the last call, in completion order.

        Each record: ``{'task', 'task_id', 'return', 'length', 'success' (success at any step),
        'final_success' (success at the last step), 'terminated', 'truncated'}``.
        """
        out, self._finished = self._finished, []
        return out

    def close(self) -> None:
        """Close the sub-envs (idempotent)."""
        if not self._closed:
            self._closed = True
            self._envs.close()

    def __enter__(self) -> "MetaWorldMT":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:  # pragma: no cover - best effort
        try:
            self.close()
        except Exception:
            pass

    def metadata(self) -> dict:
        """Settings to record in a run's config (JSON-serialisable)."""
        try:
            reward_versions = sorted(set(self._envs.get_attr("reward_function_version")))
            reward_version = reward_versions[0] if len(reward_versions) == 1 else reward_versions
        except Exception:  # pragma: no cover
            reward_version = self.reward_version
        v = _versions()
        return {
            "env": "metaworld",
            "metaworld_version": v["metaworld"],
            "gymnasium_version": v["gymnasium"],
            "mujoco_version": v["mujoco"],
            "benchmark": self.benchmark,
            "tasks": list(self.tasks),
            "n_tasks": self.n_tasks,
            "seed": self.seed,
            "vector": self.vector,
            "autoreset_mode": "same_step",
            "max_episode_steps": self.max_episode_steps,
            "metaworld_max_path_length": self.default_max_episode_steps,
            "reward_version": reward_version,
            "one_hot": self.one_hot,
            "observation_dim": self.observation_dim,
            "action_dim": self.action_dim,
            "goals_per_task": int(min(self.n_goals.values())),
            "task_select": self.task_select,
            "terminate_on_success": self.terminate_on_success,
        }


def evaluate(
    policy: Callable[[np.ndarray], np.ndarray],
    benchmark: str,
    tasks: Sequence[str] | str | None,
    seed: int,
    episodes_per_task: int | None = None,
    max_episode_steps: int | None = None,
    benchmark_obj: Any | None = None,
    reward_version: str | None = None,
    one_hot: bool = True,
    vector: str = "sync",
) -> dict:
    """Evaluate a deterministic batched ``policy`` (obs ``[T, obs_dim]`` -> actions ``[T, 4]``).

    The T tasks run in lockstep in fresh evaluation envs (one per task) built from the cached
    benchmark (pass ``benchmark_obj=train_env.benchmark_obj`` -- or use the training seed -- so
    the goals are the training goals). As in ``metaworld.evaluation.evaluation``, episodes end
    at the first success (``terminate_on_success``) and an episode counts as successful iff it
    succeeded at some step. Goals: ``episodes_per_task=None`` runs one episode per goal
    variation (50 per task: a seeded permutation of the 50 goals, each once; metaworld itself
    draws 50 goals with replacement); an int ``k`` runs ``k`` episodes per task, cycling
    deterministically (seeded by ``seed``) through the goal variations without repeats until
    all have been used.

    Returns ``{'success_rate': {task: float}, 'mean_success_rate': float, 'return': {task: mean
    return}, 'length': {task: mean length}, 'episodes_per_task': int, 'episodes': {task: [record,
    ...]}}`` (records as in :meth:`MetaWorldMT.pop_finished_episodes`).
    """
    env = MetaWorldMT(
        benchmark=benchmark,
        tasks=tasks,
        seed=seed,
        vector=vector,
        max_episode_steps=max_episode_steps,
        one_hot=one_hot,
        benchmark_obj=benchmark_obj,
        reward_version=reward_version,
        terminate_on_success=True,
        task_select="pseudorandom",
    )
    try:
        k = int(episodes_per_task) if episodes_per_task is not None else int(min(env.n_goals.values()))
        if k < 1:
            raise ValueError(f"episodes_per_task must be >= 1, got {episodes_per_task}")
        episodes: dict[str, list[dict]] = {t: [] for t in env.tasks}
        obs = env.reset()
        # every env finishes an episode at least every max_episode_steps steps
        for _ in range(k * env.max_episode_steps):
            actions = np.asarray(policy(obs), dtype=np.float32).reshape(env.n_tasks, env.action_dim)
            # a task with its k episodes is no longer simulated (the policy still sees every row: the same actions)
            active = np.array([len(episodes[t]) < k for t in env.tasks]) if vector == "sync" else None
            obs, _, _, _, info = env.step(actions, active)
            for rec in info["episode"]:
                if len(episodes[rec["task"]]) < k:
                    episodes[rec["task"]].append(rec)
            if all(len(v) >= k for v in episodes.values()):
                break
        assert all(len(v) == k for v in episodes.values()), "evaluation did not finish"
    finally:
        env.close()
    success_rate = {t: float(np.mean([r["success"] for r in v])) for t, v in episodes.items()}
    return {
        "success_rate": success_rate,
        "mean_success_rate": float(np.mean(list(success_rate.values()))),
        "return": {t: float(np.mean([r["return"] for r in v])) for t, v in episodes.items()},
        "length": {t: float(np.mean([r["length"] for r in v])) for t, v in episodes.items()},
        "episodes_per_task": k,
        "episodes": episodes,
    }


def _frame(sub: gym.Env) -> np.ndarray:
    """The current RGB frame of a sub-env built with ``render_size``, upright.

    Every sub-env has its own OpenGL context, and gymnasium makes a context current only when it creates
    it (or switches between one env's render modes): each frame is rendered after making its own env's
    context current, not the last-created one's. Gymnasium flips OpenGL's bottom-up rows; a camera whose image "up"
    points down in the world (metaworld 3.1.1's ``corner``: ``xyaxes="-1 1 0 -0.2 -0.2 -1"``) still comes out
    upside down, and turning it by 180 degrees (not flipping its rows alone, which would mirror the scene)
    makes it upright.
    """
    base = sub.unwrapped
    renderer = base.mujoco_renderer
    if renderer.viewer is not None:
        renderer.viewer.make_context_current()
    frame = np.asarray(sub.render())
    cam = renderer.camera_id
    if cam >= 0 and base.data.cam_xmat[cam].reshape(3, 3)[2, 1] < 0:  # the camera's y axis, in world z
        frame = frame[::-1, ::-1]
    return np.ascontiguousarray(frame)


def record_episodes(
    policy: Callable[[np.ndarray], np.ndarray],
    benchmark: str,
    tasks: Sequence[str] | str | None,
    seed: int,
    on_frame: Callable[[str, np.ndarray], None],
    episodes_per_task: int = 1,
    max_episode_steps: int | None = None,
    benchmark_obj: Any | None = None,
    reward_version: str | None = None,
    one_hot: bool = True,
    size: int = 256,
    stride: int = 2,
    camera: str = "corner",
) -> dict[str, list[dict]]:
    """:func:`evaluate`'s first ``episodes_per_task`` episodes of every task, rendered: ``on_frame(task, frame)``
    after each reset, every ``stride``-th step of an episode and its last step (uint8 ``[size, size, 3]``).

    Same envs, goals and early stop at success as :func:`evaluate`, so with a deterministic ``policy`` the
    episodes are the evaluation's first ones. Returns ``{task: [record, ...]}`` (records as in
    :meth:`MetaWorldMT.pop_finished_episodes`). The off-screen backend must be set up first
    (:func:`mtrl_arch.envs.video.offscreen_backend`).
    """
    k = int(episodes_per_task)
    env = MetaWorldMT(benchmark=benchmark, tasks=tasks, seed=seed, vector="sync", max_episode_steps=max_episode_steps,
                      one_hot=one_hot, benchmark_obj=benchmark_obj, reward_version=reward_version,
                      terminate_on_success=True, task_select="pseudorandom", render_size=size, camera=camera)
    try:
        # each task's env is stepped by itself, not through the vector env, whose same-step autoreset would
        # leave the next episode's first state where an episode's last frame should be rendered
        subs = env.vector_env.envs
        records: dict[str, list[dict]] = {t: [] for t in env.tasks}
        ret = np.zeros(env.n_tasks)
        length = np.zeros(env.n_tasks, dtype=np.int64)
        success = np.zeros(env.n_tasks, dtype=bool)
        obs = env.reset()
        for i, t in enumerate(env.tasks):
            on_frame(t, _frame(subs[i]))
        while any(len(r) < k for r in records.values()):
            actions = np.asarray(policy(obs), dtype=np.float32).reshape(env.n_tasks, env.action_dim)
            for i, t in enumerate(env.tasks):
                if len(records[t]) >= k:
                    continue
                o, r, terminated, truncated, info = subs[i].step(actions[i])
                obs[i] = np.asarray(o, dtype=np.float32).reshape(env.observation_dim)
                ret[i] += np.float32(r)  # as MetaWorldMT sums them
                length[i] += 1
                success[i] |= float(info.get("success", 0.0)) > 0
                done = bool(terminated or truncated)
                if done or length[i] % stride == 0:
                    on_frame(t, _frame(subs[i]))
                if not done:
                    continue
                records[t].append({"task": t, "task_id": i, "return": float(ret[i]), "length": int(length[i]),
                                   "success": bool(success[i]), "final_success": float(info.get("success", 0.0)) > 0,
                                   "terminated": bool(terminated), "truncated": bool(truncated)})
                ret[i], length[i], success[i] = 0.0, 0, False
                if len(records[t]) < k:
                    o, _ = subs[i].reset()
                    obs[i] = np.asarray(o, dtype=np.float32).reshape(env.observation_dim)
                    on_frame(t, _frame(subs[i]))
    finally:
        env.close()
    return records
