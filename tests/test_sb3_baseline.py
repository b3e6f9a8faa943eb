"""The SB3 single-task baseline (``agent.algo=sb3_stl``) checkpoints and resumes as every other run does.

Real CLI on real Meta-World (two tasks, 50-step episodes, 32x32 networks, 200 env steps per task in two
chunks of 100). A SIGTERM delivered in-process after a chosen SB3 gradient step (the second task's, mid-episode,
in the second chunk) stops the run; resumes happen in-process from copies of that run. The runs compared for
exact resume use one torch thread. Whole file: about a minute on one core.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import signal
from pathlib import Path

import numpy as np
import pytest
import torch

import mtrl_arch.checkpoint as C
from mtrl_arch.cli import main
from mtrl_arch.run import find_resume_checkpoint

from run_compare import assert_same_state, metric_lines

pytest.importorskip("metaworld")
SAC = pytest.importorskip("stable_baselines3").SAC

TASKS = ("reach-v3", "push-v3")
TINY = ["mt10_stl_sb3", f"env.tasks=[{','.join(TASKS)}]", "env.max_episode_steps=50", "model.hidden=[32,32]",
        "train.total_env_steps=400", "train.warmup_steps=50", "train.checkpoint_every_env_steps=200",
        "eval.every_env_steps=400", "eval.episodes_per_task=1", "eval.final_episodes_per_task=2",
        "agent.batch_per_task=16", "agent.buffer_size=2000", "wandb.mode=disabled", "device=cpu"]
# one update per env step after 50: task 0 makes updates 1-50 and task 1 51-100 in the first chunk, 101-200 and
# 201-300 in the second; a signal at update 230 stops task 1 at its env step 130 (mid-episode), i.e. env step 330
STOP_AT_UPDATE, STOP_STEP, CHUNK_STEP = 230, 330, 200


def train(run_dir: Path, *extra: str) -> int:
    return main(["train", "--no-progress", *TINY, f"run_dir={run_dir}", *extra])


def resume(run_dir: Path, capsys) -> str:
    capsys.readouterr()
    assert main(["train", "--no-progress", "--resume", str(run_dir)]) == 0
    return capsys.readouterr().err


def final_models(run_dir: Path) -> dict:
    """Every task's networks, optimisers, entropy coefficient and counters from model.pt."""
    d = torch.load(run_dir / "model.pt", map_location="cpu", weights_only=False)
    assert d["format"] == "mtrl-arch/sb3-stl" and d["tasks"] == list(TASKS)
    out = {}
    for t, z in d["models"].items():
        m = SAC.load(io.BytesIO(z), buffer_size=1)  # the test's own files: SB3's loading (cloudpickle) is fine here
        out[t] = {"params": m.get_parameters(), "counters": [m.num_timesteps, m._n_updates, m._episode_num],
                  "last_obs": d["sb3_state"][t]["_last_obs"]}  # SB3's state is kept beside its zip (no pickle)
    return out


def assert_same_replays(a: Path, b: Path) -> None:
    (_, sa), (_, sb) = C.load_latest(a / "checkpoints"), C.load_latest(b / "checkpoints")
    for t in TASKS:
        ra, rb = sa["agents"][t]["replay"], sb["agents"][t]["replay"]
        assert (ra["pos"], ra["full"]) == (rb["pos"], rb["full"]) and set(ra["arrays"]) == set(rb["arrays"])
        assert all(np.array_equal(ra["arrays"][k], rb["arrays"][k]) for k in ra["arrays"]), t


def assert_same_run(got: Path, want: Path) -> None:
    assert metric_lines(got) == metric_lines(want)  # every evaluation, the final one included (time/* aside)
    assert_same_state(final_models(got), final_models(want))
    assert_same_replays(got, want)


@pytest.fixture(scope="module")
def reference(one_thread, tmp_path_factory) -> Path:
    """The uninterrupted run every resumed run must reproduce."""
    d = tmp_path_factory.mktemp("sb3ref") / "run"
    assert train(d) == 0
    return d


@pytest.fixture(scope="module")
def stopped(one_thread, tmp_path_factory) -> tuple[Path, str]:
    """The same run, stopped by a real SIGTERM (to this process) right after SB3 update STOP_AT_UPDATE; its stderr."""
    d = tmp_path_factory.mktemp("sb3stop") / "run"
    mp, calls, orig = pytest.MonkeyPatch(), [0], SAC.train

    def counting_train(self, *a, **k):
        orig(self, *a, **k)
        calls[0] += 1
        if calls[0] == STOP_AT_UPDATE:
            os.kill(os.getpid(), signal.SIGTERM)

    mp.setattr(SAC, "train", counting_train)
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            rc = train(d)
    finally:
        mp.undo()
    assert rc == 0, err.getvalue()[-2000:]
    return d, err.getvalue()


def copy_of(run: Path, tmp_path: Path) -> Path:
    d = tmp_path / "run"
    shutil.copytree(run, d)
    return d


def test_sigterm_mid_chunk_saves_exits_0_and_resumes_exactly(reference, stopped, tmp_path, capsys):
    """SIGTERM: a checkpoint at the very step reached (mid-chunk, mid-episode), the MT-SAC loop's message, exit 0,
    no model.pt; the resume ends with the uninterrupted run's log, evaluations, networks, optimisers, counters and
    replays, and ``mtrl-arch eval`` reads the model.pt it writes."""
    run, err = stopped
    assert f"stopped by SIGTERM at env step {STOP_STEP}; checkpoint saved, continue with `mtrl-arch train --resume" in err
    assert C.list_steps(run / "checkpoints") == [CHUNK_STEP, STOP_STEP] and not (run / "model.pt").exists()
    assert (run / "metrics.jsonl").read_text().endswith("\n")
    d = copy_of(run, tmp_path)
    err = resume(d, capsys)
    assert f"ckpt-{STOP_STEP}.pt" in err and "warning" not in err
    assert_same_run(d, reference)
    assert main(["eval", str(d), "--episodes", "2"]) == 0  # the final evaluation's protocol: the same numbers
    res = json.loads(capsys.readouterr().out)
    final = metric_lines(reference)[-1]
    assert res["success_rate"] == {t: final[f"eval/success_rate/{t}"] for t in TASKS}


def test_damaged_newest_checkpoint_falls_back_to_previous(reference, stopped, tmp_path, capsys):
    d = copy_of(stopped[0], tmp_path)
    newest = C.checkpoint_path(d / "checkpoints", STOP_STEP)
    newest.write_bytes(newest.read_bytes()[:-1000])  # as a disk that lost the file's tail would leave it
    err = resume(d, capsys)
    warn = [x for x in err.splitlines() if x.startswith("warning:")]
    assert len(warn) == 1 and newest.name in warn[0] and "damaged (truncated" in warn[0] and "falling back" in warn[0]
    assert (d / "checkpoints" / (newest.name + ".damaged")).exists()
    assert_same_run(d, reference)  # from the chunk's end: still exact


def test_checkpoint_checksum_is_verified(stopped, tmp_path, capsys):
    """One flipped byte of the payload (the size holds): detected by the checksum, the previous checkpoint used."""
    d = copy_of(stopped[0], tmp_path)
    newest = C.checkpoint_path(d / "checkpoints", STOP_STEP)
    h = C.read_header(newest)
    assert len(h["sha256"]) == 64 and h["meta"]["env_step"] == STOP_STEP and h["meta"]["config"]["env.tasks"] == list(TASKS)
    raw = bytearray(newest.read_bytes())
    raw[C.HEADER_SIZE + h["size"] // 2] ^= 0x01
    newest.write_bytes(bytes(raw))
    with pytest.raises(C.CheckpointError, match="checksum mismatch"):
        C.read_checkpoint(newest)
    capsys.readouterr()
    step, state = find_resume_checkpoint(d)
    assert step == CHUNK_STEP and state["algo"] == "sb3_stl" and state["pos"] == 100
    assert "checksum mismatch" in capsys.readouterr().err


def test_old_layout_runs_are_evaluated_not_resumed(reference, tmp_path, capsys):
    """A run checkpointed before (one SB3 zip per task in checkpoints/sb3/) still evaluates; a resume is refused."""
    from mtrl_arch.agents.sb3_baseline import load_sb3_policy
    from mtrl_arch.envs.metaworld import make_task_env
    from mtrl_arch.run import read_run_config

    d = tmp_path / "old"
    (d / "checkpoints" / "sb3").mkdir(parents=True)
    shutil.copy(reference / "config.yaml", d / "config.yaml")
    for t, z in torch.load(reference / "model.pt", weights_only=False)["models"].items():
        (d / "checkpoints" / "sb3" / f"{t}.zip").write_bytes(z)
    cfg, _ = read_run_config(d)
    policy = load_sb3_policy(d, cfg, TASKS, lambda t: make_task_env(cfg.env.name, t, cfg.seed, 50, cfg.env.reward_version))
    assert policy.act(np.zeros((2, 39), np.float32)).shape == (2, 4)
    capsys.readouterr()
    assert main(["train", "--no-progress", "--resume", str(d)]) == 2
    assert "older mtrl-arch" in capsys.readouterr().err
