"""Data-parallel supervised training under torchrun (gloo, CPU, 2 processes) against one process.

The end-to-end tests start real ``torchrun`` jobs of the CLI on Multi-Fashion+MNIST (LeNet,
tiny budget; the real files under MTRL_ARCH_DATA, default ../shared/data, else the subset
in tests/fixtures/data):
CoNAL with the conflict-noticed operation and PCGrad, so the per-task gradient rows, the
gradient combination, the architecture step and the derived tree all go through the
collectives. Two processes with a global batch of 16 (8 each) must end where one process
with a batch of 16 ends: same derived tree, parameters equal to 1e-5 (float32 sums taken in
another order; about 1e-8 is seen), same evaluation. About a minute and a half on two busy cores.

MT-SAC (Meta-World reach + push, tiny networks and budget, no data needed): a 2-process run
with a short CoNAL search writes one run directory, resumes under torchrun with a larger
budget, and its ranks end with bit-identical parameters although their replays differ (so
the gradients were averaged); a rank that fails mid-training stops the job. About 60 s + 25 s.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from data_roots import data_overrides
from mtrl_arch import distributed
from mtrl_arch.cli import main
from mtrl_arch.logger import read_metrics

TOL = 1e-5  # max |parameter difference| between 2 processes and 1 process after search + retrain


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("multi_cache")


def _tiny(cache: Path) -> list[str]:
    return [*data_overrides("mnist", "fashion_mnist"), f"data.options.cache_dir={cache}", "model.backbone=lenet",
            "data.options.train_subset=256", "data.options.eval_subset=128", "train.batch_size=16",
            "train.limit_batches=3", "eval.limit_batches=1", "eval.batch_size=64", "arch.search_steps=3",
            "arch.conflict_noticed=true", "weighting=pcgrad", "wandb.mode=disabled", "train.threads=1"]


def _torchrun(args: list[str], script: Path | None = None, timeout: float = 300,
              cwd: Path | None = None) -> subprocess.CompletedProcess:
    entry = [str(script)] if script is not None else ["-m", "mtrl_arch.cli"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *entry, *args,
           "--no-progress"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MTRL_ARCH_DIST_TIMEOUT": "120"}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=cwd)


def _net(run: Path) -> dict[str, torch.Tensor]:
    return torch.load(run / "model.pt", map_location="cpu", weights_only=False)["net"]


def test_two_processes_equal_one_and_resume(tmp_path, cache):
    one, two = tmp_path / "one", tmp_path / "two"
    assert main(["train", "multi_fashion_mnist_conal", *_tiny(cache), "train.epochs=2", f"run_dir={one}",
                 "--no-progress"]) == 0
    # two processes: 1 epoch, then resumed to 2 (every rank restarts from rank 0's checkpoint)
    p = _torchrun(["train", "multi_fashion_mnist_conal", *_tiny(cache), "train.epochs=1", f"run_dir={two}"])
    assert p.returncode == 0, p.stderr[-3000:]
    assert p.stdout.count('"eval/accuracy/mean"') == 1  # rank 0 alone prints the result
    p = _torchrun(["train", "--resume", str(two), "train.epochs=2"])
    assert p.returncode == 0, p.stderr[-3000:]

    assert (one / "arch.json").read_text() == (two / "arch.json").read_text()
    a, b = _net(one), _net(two)
    assert a.keys() == b.keys()
    diff = max((a[k].float() - b[k].float()).abs().max().item() for k in a)
    assert diff <= TOL, diff
    ea = [r for r in read_metrics(one) if "eval/accuracy/mean" in r]
    eb = [r for r in read_metrics(two) if "eval/accuracy/mean" in r]
    assert [r["step"] for r in ea] == [r["step"] for r in eb]
    for ra, rb in zip(ea, eb):  # same test numbers; conflict statistics from the global per-task gradients
        for k, v in ra.items():
            if k.startswith(("eval/", "val/", "train/loss/", "conflict/")):
                assert rb[k] == pytest.approx(v, abs=1e-5), k
    steps = [r["step"] for r in read_metrics(two) if "phase" in r]
    assert steps == [3, 6, 9]  # one writer: each epoch line once, none repeated by the resume
    assert not list((two / "checkpoints").glob(".*tmp"))


def test_a_failing_rank_stops_the_job_with_its_reason(tmp_path, cache):
    """Rank 1 cannot read the data (a node without it); torchrun stops rank 0 and names rank 1's error."""
    script = tmp_path / "rank1_without_data.py"
    script.write_text(
        "import os, sys\n"
        "from mtrl_arch.cli import main\n"
        "if os.environ.get('RANK') == '1':\n"
        "    import mtrl_arch.envs.supervised as sup\n"
        "    from mtrl_arch.envs.vision import DataError\n"
        "    def no_data(cfg):\n"
        "        raise DataError('MNIST not found under /data on this node')\n"
        "    sup.make_adapter = no_data\n"
        "sys.exit(main(sys.argv[1:]))\n")
    p = _torchrun(["train", "multi_fashion_mnist_hps", *_tiny(cache), "train.epochs=1",
                   f"run_dir={tmp_path / 'run'}"], script=script, timeout=240)
    assert p.returncode != 0
    assert "error: rank 1: MNIST not found under /data on this node" in p.stderr
    assert "exitcode  : 2" in p.stderr  # torchrun's summary: rank 1 exited with the CLI's user-error code
    assert not (tmp_path / "run" / "model.pt").exists()


def test_shard_batch_pads_like_distributed_sampler(monkeypatch):
    monkeypatch.setattr(distributed, "active", lambda: True)
    monkeypatch.setattr(distributed, "world_size", lambda: 3)
    x = torch.arange(7)
    got = []
    for r in range(3):
        monkeypatch.setattr(distributed, "rank", lambda r=r: r)
        got.append(distributed.shard_batch({"x": x, "y": 10 * x, "w": torch.ones(2)})["x"].tolist())
    assert got == [[0, 1, 2], [3, 4, 5], [6, 0, 1]]  # ceil(7/3) each; the last padded from the start
    monkeypatch.setattr(distributed, "rank", lambda: 1)
    b = distributed.shard_batch({"x": torch.zeros(2, 6, 5), "valid": torch.ones(2, 6)}, dim=1)
    assert b["x"].shape == (2, 2, 5) and b["valid"].shape == (2, 2)


def test_one_process_pays_nothing():
    assert not distributed.active() and distributed.world_size() == 1 and distributed.is_main()
    batch = {"x": torch.ones(4)}
    assert distributed.shard_batch(batch) is batch
    p = torch.nn.Parameter(torch.ones(2))
    p.grad = torch.full((2,), 3.0)
    distributed.all_reduce_grads([p])
    assert p.grad.tolist() == [3.0, 3.0]


# ---- MT-SAC -------------------------------------------------------------------------------------------
SAC = ["mt10_conal", "arch.conflict_noticed=false", "env.tasks=[reach-v3,push-v3]", "model.hidden=[32,32]", "arch.search_steps=40",
       "train.warmup_steps=20", "train.updates_per_step=1", "agent.batch_per_task=16", "agent.buffer_size=2000",
       "env.max_episode_steps=20", "eval.every_env_steps=200", "eval.episodes_per_task=1",
       "eval.final_episodes_per_task=1", "train.log_every=100", "train.checkpoint_every_env_steps=200", "device=cpu",
       "wandb.mode=disabled", "train.threads=1"]

# each rank, after the loop's learn: a hash of its parameters and of its replay, written to the folder REPORT
_REPORTER = """\
import hashlib, json, os, sys
REPORT = None
from mtrl_arch.loop import Run
from mtrl_arch.cli import main
learn = Run.learn
def h(ts):
    return hashlib.sha256(b"".join(t.detach().cpu().contiguous().numpy().tobytes() for t in ts)).hexdigest()
def learn_and_report(self, *a, **k):
    learn(self, *a, **k)
    g = self.learner.agent
    out = {"params": h([*g.actor.state_dict().values(), *g.critic.state_dict().values(),
                        *g.critic_target.state_dict().values(), g.log_alpha]),
           "replay": h([g.replay.storage[:, :g.replay.size]]), "n_updates": g.n_updates}
    with open(os.path.join(REPORT, f"rank{os.environ['RANK']}-{self.learner.num_timesteps}.json"), "w") as f:
        json.dump(out, f)
Run.learn = learn_and_report
sys.exit(main(sys.argv[1:]))
"""


def _hash(ts) -> str:
    import hashlib

    return hashlib.sha256(b"".join(t.detach().cpu().contiguous().numpy().tobytes() for t in ts)).hexdigest()


def test_mtsac_two_processes_one_run_resume_and_identical_ranks(tmp_path):
    reports = tmp_path / "reports"
    reports.mkdir()
    script = tmp_path / "report.py"
    script.write_text(_REPORTER.replace("REPORT = None", f"REPORT = {str(reports)!r}"))
    work = tmp_path / "work"  # the run directory is chosen by rank 0 (runs/NAME-TIME); no rank may make another
    work.mkdir()
    p = _torchrun(["train", *SAC, "train.total_env_steps=400"], script=script, cwd=work, timeout=240)
    assert p.returncode == 0, p.stderr[-3000:]
    assert p.stdout.count('"eval/success_rate/mean"') == 1  # rank 0 alone prints the result
    (run,) = list((work / "runs").iterdir())
    assert sorted(f.name for f in work.iterdir()) == ["runs"]
    assert "world_size: 2" in (run / "config.yaml").read_text()
    p = _torchrun(["train", "--resume", str(run), "train.total_env_steps=800"], script=script, cwd=work, timeout=240)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "only rank 0's replay and episode are in the checkpoint" in p.stderr
    assert list((work / "runs").iterdir()) == [run]

    lines = read_metrics(run)
    assert len({(r["step"], tuple(sorted(r))) for r in lines}) == len(lines)  # one writer; no line again after resume
    train = [r for r in lines if "train/n_updates" in r]
    assert [r["step"] for r in train] == [100, 200, 300, 400, 500, 600, 700, 800]  # env steps over both ranks
    assert [r["step"] for r in lines if "eval/success_rate/mean" in r] == [200, 400, 600, 800]
    # 2 ranks x 2 tasks = 4 env steps per vector step: 100 vector steps, updates after the 20 of warm-up;
    # after the resume 20 more vector steps of refilling before the updates go on
    assert train[3]["train/n_updates"] == 80 and train[-1]["train/n_updates"] == 160
    assert (run / "arch.json").is_file() and (run / "model.pt").is_file()

    rep = {f.stem: json.loads(f.read_text()) for f in reports.iterdir()}
    assert set(rep) == {"rank0-400", "rank1-400", "rank0-800", "rank1-800"}
    for t in (400, 800):
        r0, r1 = rep[f"rank0-{t}"], rep[f"rank1-{t}"]
        assert r0["replay"] != r1["replay"]  # each rank its own environments and experience ...
        assert r0["params"] == r1["params"]  # ... and the same weights: the gradients were averaged
        assert r0["n_updates"] == r1["n_updates"]
    state = torch.load(run / "model.pt", map_location="cpu", weights_only=False)["state"]
    saved = _hash([*state["actor"].values(), *state["critic"].values(), *state["critic_target"].values(),
                   state["log_alpha"]])
    assert saved == rep["rank1-800"]["params"]


def test_mtsac_a_rank_failing_mid_training_stops_the_job(tmp_path):
    """Rank 1 diverges at its first log line; rank 0 fails in the collective it waits in (or torchrun stops it)."""
    script = tmp_path / "rank1_diverges.py"
    script.write_text(
        "import os, sys\n"
        "from mtrl_arch.cli import main\n"
        "if os.environ.get('RANK') == '1':\n"
        "    from mtrl_arch.agents.rl_loop import RLRun, NonFiniteError\n"
        "    def diverge(self, *args):\n"
        "        raise NonFiniteError('non-finite critic_loss (task push-v3) at env step 100')\n"
        "    RLRun.end_period = diverge\n"
        "sys.exit(main(sys.argv[1:]))\n")
    run = tmp_path / "run"
    p = _torchrun(["train", *SAC, "arch.method=hps", "arch.search_steps=0", "train.total_env_steps=400",
                   f"run_dir={run}"], script=script, timeout=240)
    assert p.returncode != 0
    assert "error: rank 1: non-finite critic_loss (task push-v3) at env step 100" in p.stderr
    assert "exitcode  : 3" in p.stderr  # the CLI's divergence code, named in torchrun's summary
    assert not (run / "model.pt").exists()
