"""Tests for mtrl_arch.envs.metaworld against real Meta-World v3 (no mocking of the env)."""

from __future__ import annotations

import numpy as np
import pytest

metaworld = pytest.importorskip("metaworld")

from metaworld.policies import ENV_POLICY_MAP  # noqa: E402

from mtrl_arch.envs.metaworld import (  # noqa: E402
    MT10_TASKS,
    MetaWorldMT,
    benchmark_tasks,
    default_reward_version,
    evaluate,
    make_benchmark,
    resolve_tasks,
)

BASE = 39  # metaworld's observation size without the one-hot

# metaworld's scripted policies warn that their gains exceed the [-1, 1] action box
pytestmark = pytest.mark.filterwarnings("ignore:Constant\\(s\\) may be too high")


@pytest.fixture(scope="module")
def bench():
    """The MT10 benchmark for seed 0, built once (~9 s) and shared through the module cache."""
    return make_benchmark("MT10", 0)


def scripted(tasks):
    """Batched metaworld scripted policy: row i of obs -> the expert action of tasks[i]."""
    pols = [ENV_POLICY_MAP[t]() for t in tasks]

    def act(obs):
        return np.stack([p.get_action(obs[i, :BASE]) for i, p in enumerate(pols)]).astype(np.float32)

    return act


def zeros(n):
    return lambda obs: np.zeros((n, 4), dtype=np.float32)


# ----------------------------------------------------------------------------- task names
def test_task_names():
    assert MT10_TASKS == (
        "reach-v3", "push-v3", "pick-place-v3", "door-open-v3", "drawer-open-v3",
        "drawer-close-v3", "button-press-topdown-v3", "peg-insert-side-v3",
        "window-open-v3", "window-close-v3",
    )
    assert benchmark_tasks("MT10") == MT10_TASKS == tuple(metaworld.env_dict.MT10_V3)
    mt50 = benchmark_tasks("MT50")
    assert len(mt50) == 50 and len(set(mt50)) == 50 and set(MT10_TASKS) <= set(mt50)
    assert mt50 == tuple(metaworld.env_dict.MT50_V3)
    with pytest.raises(ValueError):
        benchmark_tasks("MT11")


def test_resolve_tasks():
    assert resolve_tasks("MT10", None) == MT10_TASKS
    assert resolve_tasks("MT10", []) == MT10_TASKS
    # benchmark order, whatever order is given; comma-separated string accepted
    assert resolve_tasks("MT10", ["push-v3", "reach-v3"]) == ("reach-v3", "push-v3")
    assert resolve_tasks("MT10", "push-v3, reach-v3") == ("reach-v3", "push-v3")
    with pytest.raises(ValueError) as e:
        resolve_tasks("MT10", ["reach-v3", "rech-v2"])
    msg = str(e.value)
    assert "\n" not in msg and "rech-v2" in msg and "reach-v3" in msg
    with pytest.raises(ValueError, match="push-v3"):
        resolve_tasks("MT10", ["pussh-v3"])
    with pytest.raises(ValueError):  # in MT50 but not in MT10
        resolve_tasks("MT10", ["hammer-v3"])
    with pytest.raises(ValueError):
        resolve_tasks("MT10", ["reach-v3", "reach-v3"])


# ------------------------------------------------------------------------------ obs layout
def test_mt10_obs_and_one_hot(bench):
    env = MetaWorldMT("MT10", seed=0)
    try:
        assert env.benchmark_obj is bench  # built once, reused from the module cache
        assert env.tasks == MT10_TASKS and env.n_tasks == 10
        assert env.observation_dim == 49 and env.action_dim == 4
        np.testing.assert_array_equal(env.action_low, -np.ones(4))
        np.testing.assert_array_equal(env.action_high, np.ones(4))
        obs = env.reset()
        assert obs.shape == (10, 49) and obs.dtype == np.float32
        np.testing.assert_array_equal(obs[:, BASE:], np.eye(10, dtype=np.float32))
        obs, rew, term, trunc, info = env.step(np.zeros((10, 4), np.float32))
        assert obs.shape == (10, 49) and rew.shape == (10,) and term.shape == trunc.shape == (10,)
        assert info["success"].shape == (10,) and info["success"].dtype == bool
        np.testing.assert_array_equal(obs[:, BASE:], np.eye(10, dtype=np.float32))
        meta = env.metadata()
        assert meta["benchmark"] == "MT10" and meta["tasks"] == list(MT10_TASKS)
        assert meta["max_episode_steps"] == 500 and meta["vector"] == "sync"
        assert meta["reward_version"] == default_reward_version() == "v2"
        assert meta["metaworld_version"].startswith("3.")
        with pytest.raises(ValueError):
            env.step(np.zeros((9, 4)))
    finally:
        env.close()


def test_subset_obs(bench):
    env = MetaWorldMT("MT10", ["reach-v3", "push-v3"], seed=0, benchmark_obj=bench)
    try:
        assert env.tasks == ("reach-v3", "push-v3") and env.observation_dim == BASE + 2
        obs = env.reset()
        assert obs.shape == (2, 41)
        np.testing.assert_array_equal(obs[:, BASE:], np.eye(2, dtype=np.float32))
    finally:
        env.close()
    env = MetaWorldMT("MT10", ["push-v3"], seed=0, one_hot=False, reward_version="v1")
    try:
        assert env.reset().shape == (1, BASE)
        assert env.metadata()["reward_version"] == "v1"
    finally:
        env.close()


# ---------------------------------------------------------------------------------- seeding
def _rollout(env, actions):
    out = [env.reset()]
    for a in actions:
        obs, rew, term, trunc, info = env.step(a)
        out += [obs, rew, term, trunc, info["final_obs"], info["success"]]
    return out


def test_seeding(bench):
    tasks = ["reach-v3", "push-v3", "door-open-v3"]
    rng = np.random.default_rng(0)
    actions = rng.uniform(-1, 1, size=(25, 3, 4)).astype(np.float32)
    runs = []
    for seed in (1, 1, 2):
        env = MetaWorldMT("MT10", tasks, seed=seed, max_episode_steps=10, benchmark_obj=bench)
        runs.append(_rollout(env, actions))
        if seed == 2:
            # reset(seed=1) re-seeds the sub-envs: same goals / first obs as an env built with seed 1
            np.testing.assert_array_equal(env.reset(seed=1), runs[0][0])
        env.close()
    a, b, c = runs
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)
    assert not np.array_equal(a[0], c[0])  # different goal draws
    # the goal set of the benchmark itself also depends on the seed (make_benchmark(name, seed))


def test_async_matches_sync(bench):
    tasks = ["reach-v3", "push-v3"]
    actions = np.random.default_rng(1).uniform(-1, 1, size=(8, 2, 4)).astype(np.float32)
    outs = []
    for vector in ("sync", "async"):
        env = MetaWorldMT("MT10", tasks, seed=3, vector=vector, max_episode_steps=4, benchmark_obj=bench)
        try:
            outs.append(_rollout(env, actions))
            assert env.metadata()["vector"] == vector
        finally:
            env.close()
    for x, y in zip(*outs):
        np.testing.assert_array_equal(x, y)


# ------------------------------------------------------------------- episode bookkeeping
def test_episode_records_and_final_obs(bench):
    env = MetaWorldMT("MT10", ["reach-v3", "push-v3"], seed=0, max_episode_steps=5, benchmark_obj=bench)
    try:
        obs = env.reset()
        rng = np.random.default_rng(0)
        rewards = []
        for t in range(1, 13):
            obs, rew, term, trunc, info = env.step(rng.uniform(-1, 1, (2, 4)).astype(np.float32))
            rewards.append(rew.astype(np.float64))
            ended = t % 5 == 0
            assert not term.any()  # metaworld never terminates while training
            np.testing.assert_array_equal(trunc, [ended, ended])
            np.testing.assert_array_equal(info["done"], trunc)
            if ended:
                # same-step autoreset: obs is the next episode's first obs, final_obs the true last one
                assert not np.array_equal(info["final_obs"], obs)
                assert all(not np.array_equal(info["final_obs"][i], obs[i]) for i in range(2))
                np.testing.assert_array_equal(info["final_obs"][:, BASE:], np.eye(2))
                assert [r["task"] for r in info["episode"]] == ["reach-v3", "push-v3"]
                recs = env.pop_finished_episodes()
                assert len(recs) == 2
                ep = np.sum(rewards[-5:], axis=0)
                for r in recs:
                    assert r["length"] == 5 and r["truncated"] and not r["terminated"]
                    assert r["return"] == pytest.approx(ep[r["task_id"]], rel=1e-6)
                    assert r["success"] is False and r["final_success"] is False
                    assert r["task"] == env.tasks[r["task_id"]]
            else:
                np.testing.assert_array_equal(info["final_obs"], obs)
                assert info["episode"] == [] and env.pop_finished_episodes() == []
        # a reset drops the episode in progress
        env.reset()
        assert env.pop_finished_episodes() == []
    finally:
        env.close()


def _run_episode(env, act, away_after_success=False):
    """One reach episode; optionally move the hand away from the goal once it has succeeded."""
    obs = env.reset()
    succeeded = False
    for _ in range(env.max_episode_steps):
        a = act(obs)
        if away_after_success and succeeded:
            a = -a  # the reach expert's action points at the goal: go the other way
        obs, _, _, _, info = env.step(a)
        succeeded |= bool(info["success"][0])
        if info["episode"]:
            break
    (rec,) = env.pop_finished_episodes()
    return rec


def test_step_active_subset_matches_stepping_all(bench):
    """Stepping a subset of the sub-envs gives those rows exactly what stepping every sub-env gives (across an
    episode boundary, autoreset included); the others are left as they were and report nothing."""
    tasks = ["reach-v3", "push-v3"]
    actions = np.random.default_rng(2).uniform(-1, 1, size=(9, 2, 4)).astype(np.float32)
    full = MetaWorldMT("MT10", tasks, seed=3, max_episode_steps=4, benchmark_obj=bench)
    part = MetaWorldMT("MT10", tasks, seed=3, max_episode_steps=4, benchmark_obj=bench)
    try:
        full.reset(seed=5)
        last = part.reset(seed=5)[1].copy()
        only_reach = np.array([True, False])
        for a in actions:
            o_f, r_f, te_f, tr_f, i_f = full.step(a)
            o_p, r_p, te_p, tr_p, i_p = part.step(a, only_reach)
            np.testing.assert_array_equal(o_p[0], o_f[0])
            np.testing.assert_array_equal(i_p["final_obs"][0], i_f["final_obs"][0])
            assert (r_p[0], te_p[0], tr_p[0], i_p["success"][0]) == (r_f[0], te_f[0], tr_f[0], i_f["success"][0])
            np.testing.assert_array_equal(o_p[1], last)  # push-v3 not simulated
            assert r_p[1] == 0 and not te_p[1] and not tr_p[1]
        ends = [r for r in part.pop_finished_episodes()]
        assert [r["task"] for r in ends] == ["reach-v3", "reach-v3"]  # 9 steps of 4-step episodes
        assert [r["return"] for r in ends] == [r["return"] for r in full.pop_finished_episodes() if r["task"] == "reach-v3"]
    finally:
        full.close()
        part.close()
    async_env = MetaWorldMT("MT10", tasks, seed=3, vector="async", max_episode_steps=4, benchmark_obj=bench)
    try:
        async_env.reset()
        with pytest.raises(ValueError, match="vector='sync'"):
            async_env.step(actions[0], only_reach)
    finally:
        async_env.close()


def test_success_tracking_reach(bench):
    env = MetaWorldMT("MT10", ["reach-v3"], seed=0, max_episode_steps=150, benchmark_obj=bench)
    try:
        rec = _run_episode(env, scripted(["reach-v3"]))
        assert rec["length"] == 150 and rec["success"] and rec["final_success"]
        rec = _run_episode(env, zeros(1))
        assert not rec["success"] and not rec["final_success"]
        rec = _run_episode(env, scripted(["reach-v3"]), away_after_success=True)
        assert rec["success"] and not rec["final_success"]
    finally:
        env.close()


# ------------------------------------------------------------------------------- evaluate
def test_evaluate(bench):
    tasks = ["reach-v3", "push-v3"]
    res = evaluate(scripted(tasks), "MT10", tasks, seed=0, episodes_per_task=2,
                   max_episode_steps=150, benchmark_obj=bench)
    assert res["episodes_per_task"] == 2
    assert set(res["success_rate"]) == set(tasks)
    for t in tasks:
        recs = res["episodes"][t]
        assert len(recs) == 2 and all(r["task"] == t for r in recs)
        assert res["success_rate"][t] in (0.0, 0.5, 1.0)
        assert res["success_rate"][t] == np.mean([r["success"] for r in recs])
        assert res["return"][t] == pytest.approx(np.mean([r["return"] for r in recs]))
        for r in recs:  # metaworld's protocol: an episode stops at its first success
            assert r["terminated"] == r["success"]
            assert (r["length"] < 150) == r["success"]
    assert res["success_rate"]["reach-v3"] == 1.0
    assert res["mean_success_rate"] == pytest.approx(np.mean(list(res["success_rate"].values())))

    res0 = evaluate(zeros(1), "MT10", ["reach-v3"], seed=0, episodes_per_task=2,
                    max_episode_steps=30, benchmark_obj=bench)
    assert res0["success_rate"] == {"reach-v3": 0.0} and res0["mean_success_rate"] == 0.0
    assert all(r["length"] == 30 and r["truncated"] for r in res0["episodes"]["reach-v3"])


def test_evaluate_stops_simulating_finished_tasks_without_changing_results(bench):
    """reach-v3 ends its episodes at the first success, push-v3 runs them to the limit: the sync evaluation stops
    stepping reach once it has its episodes, the async one steps it throughout; the episodes are the same."""
    tasks = ["reach-v3", "push-v3"]
    runs = {v: evaluate(scripted(tasks), "MT10", tasks, seed=0, episodes_per_task=3, max_episode_steps=60,
                        benchmark_obj=bench, vector=v) for v in ("sync", "async")}
    assert runs["sync"]["episodes"] == runs["async"]["episodes"]
    reach, push = runs["sync"]["episodes"]["reach-v3"], runs["sync"]["episodes"]["push-v3"]
    assert sum(r["length"] for r in reach) < sum(r["length"] for r in push)  # reach was done first


def test_evaluation_goals_without_replacement(bench):
    # the evaluation envs walk through a seeded permutation of the 50 goal variations
    env = MetaWorldMT("MT10", ["reach-v3"], seed=0, max_episode_steps=1, benchmark_obj=bench,
                      task_select="pseudorandom")
    try:
        obs = env.reset()
        goals = [tuple(obs[0, 36:39])]
        for _ in range(49):
            obs, *_ = env.step(np.zeros((1, 4), np.float32))
            goals.append(tuple(obs[0, 36:39]))
        assert len(set(goals)) == 50
    finally:
        env.close()
