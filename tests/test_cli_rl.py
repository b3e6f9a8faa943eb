"""CLI smoke on real Meta-World MT10: every run-directory file, all ten success keys, read back
from metrics.jsonl and from the offline W&B run file; `arch` and `eval` on the result; the
SB3 single-task baseline through the same CLI."""
from __future__ import annotations

import json

import pytest
import yaml

from mtrl_arch.agents.sac import MTSAC
from mtrl_arch.cli import main
from mtrl_arch.config import load_config
from mtrl_arch.envs.metaworld import MT10_TASKS
from mtrl_arch.logger import read_metrics, read_wandb_history

SMOKE = ["arch.conflict_noticed=false", "arch.options.lr=3e-3", "train.updates_per_step=0.25", "train.total_env_steps=2000", "train.warmup_steps=50", "arch.search_steps=100", "eval.every_env_steps=1000",
         "eval.episodes_per_task=1", "eval.final_episodes_per_task=1", "train.log_every=500", "env.max_episode_steps=50",
         "model.hidden=[64,64,64]", "wandb.mode=offline"]


@pytest.fixture(scope="module")
def mt10_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("runs") / "mt10_conal"
    rc = main(["train", "mt10_conal", *SMOKE, f"run_dir={run_dir}", "--no-progress"])
    assert rc == 0
    return run_dir


def test_dry_run_prints_the_config_and_the_counts_a_run_logs(mt10_run, capsys, tmp_path, monkeypatch) -> None:
    """`train --dry-run`: the run's config.yaml (less its run: record) and the parameter counts that the same
    run logged at its start, from MTSAC built on the CPU without an environment; no run directory."""
    monkeypatch.chdir(tmp_path)  # where a default run directory (runs/NAME-TIME) would appear
    capsys.readouterr()
    assert main(["train", "mt10_conal", *SMOKE, f"run_dir={mt10_run}", "--dry-run"]) == 2  # holds a run: refused
    assert "already holds a run" in capsys.readouterr().err
    assert main(["train", "mt10_conal", *SMOKE, "--dry-run"]) == 0
    cfg_doc, counts_doc = yaml.safe_load_all(capsys.readouterr().out)
    written = yaml.safe_load((mt10_run / "config.yaml").read_text())
    del written["run"]
    assert cfg_doc == {**written, "run_dir": ""}
    logged = next(r for r in read_metrics(mt10_run) if any(k.startswith("params/") for k in r))
    counts = counts_doc["parameters"]
    assert set(counts) == {"actor", "critic"} and counts["actor"]["total"] > 0
    assert {f"params/{n}/{k}": v for n, c in counts.items() for k, v in c.items()} == \
        {k: v for k, v in logged.items() if k.startswith("params/")}
    cfg = load_config("mt10_conal", [*SMOKE, "agent.buffer_size=1000"])
    tasks = tuple(cfg.env.tasks or MT10_TASKS)
    assert counts == MTSAC(tasks, 39 + len(tasks), 4, cfg, "cpu").param_counts()
    assert "obs 49, action 4" in counts_doc["counted"]
    assert list(tmp_path.iterdir()) == []  # no run directory, nothing written
    assert main(["train", "mt10_conal", "agent.lrr=1", "--dry-run"]) == 2  # a bad override: one line, exit 2
    err = capsys.readouterr().err
    assert err.startswith("error: unknown config key 'agent.lrr'") and err.count("\n") == 1


def test_run_directory_holds_every_file(mt10_run) -> None:
    for f in ("config.yaml", "metrics.jsonl", "arch.json", "arch.txt", "model.pt"):
        assert (mt10_run / f).is_file(), f
    assert list((mt10_run / "checkpoints").glob("ckpt-*.pt"))
    cfg = yaml.safe_load((mt10_run / "config.yaml").read_text())
    assert cfg["arch"]["method"] == "conal" and cfg["seed"] == 0
    run = cfg["run"]
    assert {"git_commit", "versions", "machine"} <= set(run)
    env = run["env"]
    assert env["max_episode_steps"] == 50 and env["reward_version"] and env["metaworld_version"]
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


def test_search_lines_carry_every_tasks_branch_probabilities(mt10_run) -> None:
    """While CoNAL searches, each training line holds p_t(b) per network, task and branch point (summing to 1)."""
    search = [r for r in read_metrics(mt10_run) if r.get("phase") == "search"]
    assert search
    for r in search:
        for net in ("actor", "critic"):
            for t in MT10_TASKS:
                ps = [r[f"arch/{net}/{t}/b{b}"] for b in range(4)]  # 3 stages: branch points 0..3
                assert sum(ps) == pytest.approx(1.0) and min(ps) > 0
    assert not any(k.startswith("arch/") for r in read_metrics(mt10_run) if r.get("phase") == "train" for k in r)


@pytest.mark.slow  # about 35 s on the shared 2 cores; tests/test_mtsac.py checks the same mixed search without envs
def test_per_network_methods_search_derive_and_retrain_through_the_cli(tmp_path) -> None:
    """arch.critic.method=hps beside a searching actor (conal), on two real Meta-World tasks: the critic trains
    through the actor's search, arch.json holds each network's tree, config.yaml what each network used."""
    run_dir = tmp_path / "mixed"
    over = ["env.tasks=[reach-v3,push-v3]", "arch.critic.method=hps", "arch.search_steps=40",
            "train.total_env_steps=240", "train.warmup_steps=20", "train.updates_per_step=0.25",
            "eval.every_env_steps=0", "eval.final_episodes_per_task=1", "env.max_episode_steps=20",
            "model.hidden=[16,16]", "agent.batch_per_task=8", "wandb.mode=disabled", "arch.conflict_noticed=false"]
    assert main(["train", "mt10_conal", *over, f"run_dir={run_dir}", "--no-progress"]) == 0
    nets = json.loads((run_dir / "arch.json").read_text())["networks"]
    assert nets["actor"]["method"] == "conal" and nets["critic"]["method"] == "hps"
    written = yaml.safe_load((run_dir / "config.yaml").read_text())["arch"]
    assert written["actor"]["method"] == "conal" and written["actor"]["options"] == written["options"]
    assert written["critic"] == {"method": "hps", "options": {}, "derive": "argmax", "derive_margin": 0.1,
                                 "max_params": 0, "min_params": 0}
    assert MTSAC.load(str(run_dir / "model.pt")).trees["critic"].method == "hps"


def test_training_episodes_can_be_shorter_than_the_evaluations(tmp_path) -> None:
    """env.train_episode_steps shortens the training episodes (the env the run records) while evaluation keeps
    metaworld's 500 steps: a failed evaluation episode is 500 steps long, a success ends it early."""
    run_dir = tmp_path / "short"
    rc = main(["train", "mt10_hps", "env.tasks=[reach-v3]", "env.train_episode_steps=25", "train.total_env_steps=100",
               "train.warmup_steps=50", "model.hidden=[16,16]", "eval.every_env_steps=0", "eval.final_episodes_per_task=1",
               "wandb.mode=disabled", "train.report=false", f"run_dir={run_dir}", "--no-progress"])
    assert rc == 0
    env_meta = yaml.safe_load((run_dir / "config.yaml").read_text())["run"]["env"]
    assert env_meta["max_episode_steps"] == 25 and env_meta["metaworld_max_path_length"] == 500
    final = [m for m in read_metrics(run_dir) if "eval/env_steps" in m][-1]
    assert final["eval/env_steps"] == 500 or final["eval/success_rate/reach-v3"] == 1.0
