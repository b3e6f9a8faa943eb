"""Data-parallel supervised training under torchrun (gloo, CPU, 2 processes) against one process.

The end-to-end tests start real ``torchrun`` jobs of the CLI on Multi-Fashion+MNIST (LeNet,
tiny budget; skipped without the data under MTRL_ARCH_DATA, default ../shared/data):
CoNAL with the conflict-noticed operation and PCGrad, so the per-task gradient rows, the
gradient combination, the architecture step and the derived tree all go through the
collectives. Two processes with a global batch of 16 (8 each) must end where one process
with a batch of 16 ends: same derived tree, parameters equal to 1e-5 (float32 sums taken in
another order; about 1e-8 is seen), same evaluation. About a minute and a half on two busy cores.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mtrl_arch import distributed
from mtrl_arch.cli import main
from mtrl_arch.logger import read_metrics

TOL = 1e-5  # max |parameter difference| between 2 processes and 1 process after search + retrain


def _data_root() -> Path:
    env = os.environ.get("MTRL_ARCH_DATA")
    return Path(env) if env else Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    if not ((_data_root() / "mnist").is_dir() and (_data_root() / "fashion_mnist").is_dir()):
        pytest.skip(f"mnist/fashion_mnist not found under {_data_root()} (set MTRL_ARCH_DATA)")
    return tmp_path_factory.mktemp("multi_cache")


def _tiny(cache: Path) -> list[str]:
    return [f"data.root={_data_root()}", f"data.options.cache_dir={cache}", "model.backbone=lenet",
            "data.options.train_subset=256", "data.options.eval_subset=128", "train.batch_size=16",
            "train.limit_batches=3", "eval.limit_batches=1", "eval.batch_size=64", "arch.search_steps=3",
            "arch.conflict_noticed=true", "weighting=pcgrad", "wandb.mode=disabled", "train.threads=1"]


def _torchrun(args: list[str], script: Path | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    entry = [str(script)] if script is not None else ["-m", "mtrl_arch.cli"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *entry, *args,
           "--no-progress"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MTRL_ARCH_DIST_TIMEOUT": "120"}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)


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
