"""Faults at random moments, seeded: benchmarks/soak.py with three SIGKILLs on the MT-SAC CoNAL search + retrain
(the benchmark records twenty per learner in benchmarks/results/reliability.md). Every run it finishes, resumed
with ``mtrl-arch train --resume`` after each kill, must match the uninterrupted run exactly: metrics.jsonl
less ``time/*``, model.pt byte for byte, arch.json. The supervised and SB3 learners' three-kill versions are
``slow``. The RL one: 1.5-2.5 minutes on 2 busy cores (mostly interpreter start-ups).
"""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

pytest.importorskip("metaworld")

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "soak.py"
spec = importlib.util.spec_from_file_location("soak", SCRIPT)
soak = sys.modules["soak"] = importlib.util.module_from_spec(spec)  # registered first: its dataclasses look it up
spec.loader.exec_module(soak)


@pytest.fixture(scope="module")
def bench(tmp_path_factory) -> Path:
    return soak.pickle_benchmark(tmp_path_factory.mktemp("bench") / "mt10-seed0.pkl")


def _check(record: dict, kills: int) -> None:
    assert record["kills"] == kills
    assert record["runs"] >= 1 and record["identical"] == record["runs"], record["detail"]
    sessions = [s for r in record["detail"] for s in r["sessions"]]
    assert sum(s["killed_at"] is not None for s in sessions) == kills
    assert all(s["phase"] for s in sessions if s["killed_at"] is not None)
    assert sessions[-1]["killed_at"] is None and sessions[-1]["rc"] == 0  # the last run resumed to its end


def test_rl_three_random_kills_resume_exactly(bench, tmp_path):
    # the benchmark's run cut to 240 env steps: the search ends (derive, retrain) at 120, checkpoints every 50
    short = ("train.total_env_steps=240", "arch.search_steps=60", "eval.every_env_steps=120")
    record = soak.soak("rl", 3, seed=0, root=tmp_path, bench=bench, say=lambda s: None, overrides=short)
    _check(record, 3)
    assert record["model_compared"] == ["bytes"]  # model.pt byte for byte


@pytest.mark.slow
@pytest.mark.parametrize("learner", ["supervised", "sb3"])
def test_other_learners_three_random_kills_resume_exactly(learner, bench, tmp_path):
    _check(soak.soak(learner, 3, seed=0, root=tmp_path, bench=bench, say=lambda s: None), 3)


def test_model_file_bytes_depend_only_on_content(tmp_path):
    """What the soak found: equal content, one string object shared in one process and two in the other (a derived
    tree naming the agent's own task names, or names read back from a checkpoint), gave different model.pt bytes."""
    import io

    import torch

    from mtrl_arch.checkpoint import save_model_file

    name = "reach-v3"
    shared = {"tasks": [name], "tree": {"tasks": [name]}, "w": torch.arange(3.0)}
    separate = {"tasks": [name], "tree": {"tasks": ["".join(["reach", "-v3"])]}, "w": torch.arange(3.0)}
    plain = [io.BytesIO(), io.BytesIO()]
    torch.save(shared, plain[0])
    torch.save(separate, plain[1])
    assert plain[0].getvalue() != plain[1].getvalue()  # why the helper exists
    save_model_file(shared, tmp_path / "a.pt")
    save_model_file(separate, tmp_path / "b.pt")
    assert (tmp_path / "a.pt").read_bytes() == (tmp_path / "b.pt").read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.pt", "b.pt"]  # no temporary file left
    assert torch.equal(torch.load(tmp_path / "a.pt", weights_only=True)["w"], torch.arange(3.0))
