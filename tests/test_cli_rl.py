"""CLI smoke on real Meta-World MT10: every run-directory file, all ten success keys, read back
from metrics.jsonl and from the offline W&B run file; `arch` and `eval` on the result; the
SB3 single-task baseline through the same CLI."""
from __future__ import annotations

import json

import pytest
import yaml

from mtrl_arch.cli import main
from mtrl_arch.envs.metaworld import MT10_TASKS
from mtrl_arch.logger import read_metrics, read_wandb_history


@pytest.fixture(scope="module")
def mt10_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("runs") / "mt10_quick"
    rc = main(["train", "mt10_quick", "train.total_env_steps=2000", "train.warmup_steps=50", "arch.search_steps=100",
               "eval.every_env_steps=1000", "eval.episodes_per_task=1", "eval.final_episodes_per_task=1",
               "train.log_every=500", "env.max_episode_steps=100", "model.hidden=[64,64,64]", "wandb.mode=offline",
               f"run_dir={run_dir}", "--no-progress"])
    assert rc == 0
    return run_dir


def test_run_directory_holds_every_file(mt10_run) -> None:
    for f in ("config.yaml", "metrics.jsonl", "arch.json", "arch.txt", "model.pt"):
        assert (mt10_run / f).is_file(), f
    assert list((mt10_run / "checkpoints").glob("ckpt-*.pt"))
    cfg = yaml.safe_load((mt10_run / "config.yaml").read_text())
    assert cfg["arch"]["method"] == "conal" and cfg["seed"] == 0
    run = cfg["run"]
    assert {"git_commit", "versions", "machine"} <= set(run)
    env = run["env"]
    assert env["max_episode_steps"] == 100 and env["reward_version"] and env["metaworld_version"]
    arch = json.loads((mt10_run / "arch.json").read_text())
    assert set(arch["networks"]) == {"actor", "critic"} if "networks" in arch else {"actor", "critic"} <= set(arch)


def test_metrics_have_all_ten_success_keys_and_params(mt10_run) -> None:
    lines = read_metrics(mt10_run)
    steps = [l["step"] for l in lines]
    assert steps == sorted(steps)
    evals = [l for l in lines if "eval/success_rate/mean" in l]
    assert len(evals) >= 2
    for l in evals:
        for t in MT10_TASKS:
            assert 0.0 <= l[f"eval/success_rate/{t}"] <= 1.0
    assert evals[-1]["step"] == 2000
    assert any(k.startswith("params/actor/") for l in lines for k in l)
    train = [l for l in lines if any(k.startswith("train/") for k in l)]
    assert train and any("alpha" in k for k in train[-1])


def test_offline_wandb_run_contains_the_success_keys(mt10_run) -> None:
    rows = read_wandb_history(mt10_run)
    keys = {k for r in rows for k in r}
    for t in MT10_TASKS:
        assert f"eval/success_rate/{t}" in keys
    assert "eval/success_rate/mean" in keys
    last = [r for r in rows if "eval/success_rate/mean" in r][-1]
    jsonl_last = [l for l in read_metrics(mt10_run) if "eval/success_rate/mean" in l][-1]
    assert last["eval/success_rate/mean"] == pytest.approx(jsonl_last["eval/success_rate/mean"])


def test_arch_and_eval_commands(mt10_run, capsys) -> None:
    assert main(["arch", str(mt10_run), "--json"]) == 0
    trees = json.loads(capsys.readouterr().out)
    assert set(trees) == {"actor", "critic"}
    assert trees["actor"]["tasks"] == list(MT10_TASKS)
    assert main(["arch", str(mt10_run)]) == 0
    assert "reach-v3" in capsys.readouterr().out
    assert main(["eval", str(mt10_run), "--episodes", "1"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert set(res["success_rate"]) == set(MT10_TASKS) and res["episodes_per_task"] == 1


def test_sb3_single_task_baseline_runs_and_resumes(tmp_path) -> None:
    run_dir = tmp_path / "sb3"
    common = ["train.warmup_steps=50", "eval.every_env_steps=400", "eval.episodes_per_task=1",
              "eval.final_episodes_per_task=1", "env.max_episode_steps=50", "model.hidden=[32,32]",
              "agent.buffer_size=2000"]
    assert main(["train", "mt10_stl_sb3", "env.tasks=[reach-v3,push-v3]", "train.total_env_steps=400",
                 "wandb.mode=disabled", f"run_dir={run_dir}", "--no-progress", *common]) == 0
    assert main(["train", "--resume", str(run_dir), "train.total_env_steps=800", "--no-progress"]) == 0
    evals = [l for l in read_metrics(run_dir) if "eval/success_rate/mean" in l]
    assert [l["step"] for l in evals] == [400, 800]
    assert set(k for k in evals[-1] if k.startswith("eval/success_rate/")) == {
        "eval/success_rate/reach-v3", "eval/success_rate/push-v3", "eval/success_rate/mean"}
