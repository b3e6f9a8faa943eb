"""Learning test (slow, not in the default run): MT-SAC learns reach-v3 on CPU.

Budget: 20,000 env steps, 2x256, one update per step, 200-step episodes, one torch thread.
Run with `python -m pytest -m slow tests/test_learning_slow.py`.
"""
from __future__ import annotations

import pytest

from mtrl_arch.cli import main
from mtrl_arch.logger import read_metrics


@pytest.mark.slow
def test_mtsac_learns_reach(tmp_path) -> None:
    rc = main(["train", "mt10_hps", "env.tasks=[reach-v3]", "train.total_env_steps=20000", "train.warmup_steps=1000",
               "model.hidden=[256,256]", "env.max_episode_steps=200", "eval.every_env_steps=0",
               "eval.final_episodes_per_task=20", "train.threads=1", "wandb.mode=disabled", "train.log_every=5000",
               "train.checkpoint_every=0", f"run_dir={tmp_path / 'reach'}", "--no-progress"])
    assert rc == 0
    final = [l for l in read_metrics(tmp_path / "reach") if "eval/success_rate/mean" in l][-1]
    assert final["eval/episodes_per_task"] == 20
    assert final["eval/success_rate/reach-v3"] > 0.5, final
