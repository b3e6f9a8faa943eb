"""One writer per run directory (mtrl_arch/run_lock.py): a second ``train`` or ``train --resume`` is refused
while the first runs, and the first finishes undisturbed; after a SIGKILL of the first, ``--resume`` works at
once, also while the killed run's children (async vector env workers, W&B's service, a forked process) live
on; readers and ``--dry-run`` take no lock; under torchrun rank 0 holds it; a sweep's trials hold their own.

Runs are the real CLI on Multi-Fashion+MNIST (LeNet, a few batches; the real files under MTRL_ARCH_DATA, else
the subset in tests/fixtures/data) or real Meta-World (two tasks, async vector env; marked slow). A first run
that must be alive while a second is tried is a subprocess paused just after its first checkpoint (until the
test lets it go), so the timing never depends on the machine's load. About a minute on two busy cores (the
slow MT-SAC test: 40 s more).
"""
from __future__ import annotations

import json
import os
import pickle
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from data_roots import data_overrides
from mtrl_arch.cli import main
from mtrl_arch.config import ConfigError
from mtrl_arch.logger import read_metrics
from mtrl_arch.run_lock import LOCK_NAME, lock_run_dir


def tiny(cache: Path, *extra: str) -> list[str]:
    """A seconds-long supervised run's overrides: 3 epochs of 3 batches, a checkpoint after each epoch;
    ``extra`` key=value pairs replace the same keys'."""
    base = [*data_overrides("mnist", "fashion_mnist"), f"data.options.cache_dir={cache}", "model.backbone=lenet",
            "data.options.train_subset=256", "data.options.eval_subset=64", "train.batch_size=8", "train.epochs=3",
            "train.limit_batches=3", "eval.limit_batches=1", "eval.batch_size=64", "data.num_workers=0",
            "wandb.mode=disabled", "train.threads=1", "train.report=false"]
    given = {e.split("=", 1)[0] for e in extra}
    return [*(o for o in base if o.split("=", 1)[0] not in given), *extra]


CONFIG = "multi_fashion_mnist_hps"


# the CLI in a subprocess, paused just after its first checkpoint: it touches PAUSE.saved and waits for PAUSE.go
PAUSED = """\
import os, sys, time
import mtrl_arch.loop as loop
pause, bench = sys.argv[1], sys.argv[2]
real = loop.save_checkpoint
def save(*a, **k):
    out = real(*a, **k)
    if not os.path.exists(pause + ".saved"):
        open(pause + ".saved", "w").close()
        while not os.path.exists(pause + ".go"):
            time.sleep(0.02)
    return out
loop.save_checkpoint = save
if bench:  # the MT10 benchmark object, built once by the test (its construction takes 10-15 s)
    import pickle, mtrl_arch.envs.metaworld as m
    m._BENCHMARK_CACHE[("MT10", 0)] = pickle.load(open(bench, "rb"))
from mtrl_arch.cli import main
sys.exit(main(sys.argv[3:]))
"""


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


def start_paused(pause: Path, argv: list[str], bench: Path | None = None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", PAUSED, str(pause), str(bench or ""), *argv], env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_paused(p: subprocess.Popen, pause: Path, timeout: float = 240) -> None:
    t0 = time.time()
    while not Path(f"{pause}.saved").exists():
        if p.poll() is not None:
            raise AssertionError(f"the first run ended (rc {p.returncode}) before its first checkpoint:\n"
                                 f"{p.stderr.read()[-3000:]}")
        if time.time() - t0 > timeout:
            p.kill()
            raise AssertionError("the first run did not reach its first checkpoint in time")
        time.sleep(0.05)


def files(run_dir: Path) -> dict[str, bytes]:
    return {str(p.relative_to(run_dir)): p.read_bytes() for p in sorted(run_dir.rglob("*")) if p.is_file()}


def refused(capsys, argv: list[str], pid: int) -> str:
    """``argv`` exits 2 with one line naming the lock's holder ``pid`` on this host; that line."""
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith("error: run directory ") and " is in use by another `mtrl-arch train`: " in err[0]
    assert f"PID {pid} on host {socket.gethostname()}" in err[0]
    return err[0]


def assert_log_clean(run_dir: Path, epoch_steps: list[int]) -> None:
    steps = [r["step"] for r in read_metrics(run_dir)]
    assert steps == sorted(steps)
    assert [r["step"] for r in read_metrics(run_dir) if "phase" in r] == epoch_steps  # each epoch's line once


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("multi_cache")


@pytest.fixture(scope="module")
def finished(tmp_path_factory, cache) -> Path:
    d = tmp_path_factory.mktemp("finished") / "run"
    assert main(["train", "--no-progress", CONFIG, *tiny(cache, "train.epochs=1"), f"run_dir={d}"]) == 0
    return d


# ---- one writer ---------------------------------------------------------------------------------------
def test_a_second_writer_is_refused_and_the_first_finishes_undisturbed(tmp_path, cache, capsys, one_thread):
    d, pause = tmp_path / "run", tmp_path / "pause"
    p = start_paused(pause, ["train", "--no-progress", CONFIG, *tiny(cache), f"run_dir={d}"])
    try:
        wait_paused(p, pause)  # mid-run: one checkpoint written, two epochs to go
        before = files(d)
        assert json.loads((d / LOCK_NAME).read_text())["pid"] == p.pid  # the record names the holder
        # the case: a second --resume of a live run (here with an override, which would rewrite config.yaml)
        refused(capsys, ["train", "--no-progress", "--resume", str(d), "train.epochs=4"], p.pid)
        refused(capsys, ["train", "--no-progress", "--resume", str(d)], p.pid)
        assert files(d) == before  # the refused writers read no checkpoint into a run and wrote nothing
        assert main(["train", "--no-progress", CONFIG, *tiny(cache), f"run_dir={d}"]) == 2  # a new run there: refused too
        assert "already holds a run" in capsys.readouterr().err
        # readers take no lock: the live run's architecture, its checkpoint evaluated, a dry run of a resume
        assert main(["arch", str(d)]) == 0
        assert main(["eval", str(d)]) == 0
        assert main(["train", "--resume", str(d), "--dry-run"]) == 0
        assert files(d) == before
    finally:
        Path(f"{pause}.go").touch()
    out, err = p.communicate(timeout=240)
    assert p.returncode == 0, err[-3000:]
    assert_log_clean(d, [3, 6, 9])
    # undisturbed: the log of a run that nobody tried to join, line for line (wall-clock times aside)
    alone = tmp_path / "alone"
    assert main(["train", "--no-progress", CONFIG, *tiny(cache), f"run_dir={alone}"]) == 0
    assert untimed(read_metrics(d)) == untimed(read_metrics(alone))


def untimed(lines: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if not k.startswith("time/")} for r in lines]


def test_sigkill_then_resume_works_at_once(tmp_path, cache, capsys, one_thread):
    d, pause = tmp_path / "run", tmp_path / "pause"
    p = start_paused(pause, ["train", "--no-progress", CONFIG, *tiny(cache), f"run_dir={d}"])
    wait_paused(p, pause)
    p.send_signal(signal.SIGKILL)
    p.wait(30)
    assert json.loads((d / LOCK_NAME).read_text())["pid"] == p.pid  # a stale record: never blocks
    capsys.readouterr()
    assert main(["train", "--no-progress", "--resume", str(d)]) == 0
    assert "resumed from" in capsys.readouterr().err
    assert_log_clean(d, [3, 6, 9])
    assert json.loads((d / LOCK_NAME).read_text())["pid"] == os.getpid()


def _children(pid: int) -> list[int]:
    out = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        out += [int(c) for c in (task / "children").read_text().split()]
    return out


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


def _kill(pids: list[int]) -> None:
    for c in pids:
        try:
            os.kill(c, signal.SIGKILL)
        except ProcessLookupError:
            pass


FORKS = """\
import multiprocessing, subprocess, sys, time
from pathlib import Path
from mtrl_arch.run_lock import lock_run_dir
lock = lock_run_dir(Path(sys.argv[1]), create=True)
forked = multiprocessing.get_context("fork").Process(target=time.sleep, args=(120,))
forked.start()
execd = subprocess.Popen(["sleep", "120"], close_fds=False)
print(forked.pid, execd.pid, flush=True)
time.sleep(120)
"""


def test_children_that_outlive_a_killed_holder_do_not_hold_its_lock(tmp_path):
    """A forked child (copies of every descriptor, as multiprocessing's fork workers) and an exec'd one
    (as W&B's service) both live on after their parent's SIGKILL; the lock is free at once."""
    d = tmp_path / "run"
    p = subprocess.Popen([sys.executable, "-c", FORKS, str(d)], stdout=subprocess.PIPE, text=True, env=_env())
    kids = [int(x) for x in p.stdout.readline().split()]
    try:
        with pytest.raises(ConfigError, match=f"PID {p.pid} on host"):
            lock_run_dir(d)
        p.send_signal(signal.SIGKILL)
        p.wait(30)
        assert all(_alive(k) for k in kids)
        lock_run_dir(d).release()
    finally:
        _kill(kids)


@pytest.fixture(scope="module")
def bench(tmp_path_factory) -> Path:
    pytest.importorskip("metaworld")
    from mtrl_arch.envs.metaworld import make_benchmark

    p = tmp_path_factory.mktemp("bench") / "mt10-seed0.pkl"
    p.write_bytes(pickle.dumps(make_benchmark("MT10", 0)))
    return p


RL = ["mt10_hps", "env.tasks=[reach-v3,push-v3]", "env.vector=async", "env.max_episode_steps=50",
      "model.hidden=[32,32]", "train.total_env_steps=200", "train.warmup_steps=40", "train.updates_per_step=0.25",
      "train.checkpoint_every_env_steps=100", "train.log_every=100", "eval.every_env_steps=0",
      "eval.final_episodes_per_task=1", "agent.batch_per_task=16", "agent.buffer_size=1000", "wandb.mode=offline",
      "device=cpu", "train.threads=1", "train.report=false"]


@pytest.mark.slow  # about a minute on two busy cores; test_children_that_outlive_... checks the same in a second
def test_a_killed_mtsac_run_with_live_env_workers_and_wandb_resumes_at_once(tmp_path, bench, capsys, one_thread):
    """MT-SAC with an async vector env (a process per task, forked) and offline W&B (its service): the run is
    SIGKILLed alone, its children are orphaned, and ``--resume`` takes the lock at once."""
    d, pause = tmp_path / "run", tmp_path / "pause"
    p = start_paused(pause, ["train", "--no-progress", *RL, f"run_dir={d}"], bench)
    wait_paused(p, pause)
    kids = _children(p.pid)
    try:
        assert len(kids) >= 2  # the two env workers, at least
        p.send_signal(signal.SIGKILL)
        p.wait(30)
        # at once, before the workers notice that their parent is gone (seen here: all of them still alive
        # after the lock was taken; without the lock's fork handler this lock is refused)
        lock_run_dir(d).release()
        capsys.readouterr()
        assert main(["train", "--no-progress", "--resume", str(d)]) == 0
        err = capsys.readouterr().err
        assert "resumed from" in err and "ckpt-100.pt" in err
    finally:
        _kill(kids)
    steps = [r["step"] for r in read_metrics(d) if "train/n_updates" in r]
    assert steps == [100, 200]
    assert (d / "model.pt").is_file()


# ---- where the lock is held: torchrun's rank 0, each sweep trial ---------------------------------------
def test_under_torchrun_rank_0_is_refused_and_every_rank_stops(finished, tmp_path):
    before = files(finished)
    with lock_run_dir(finished):
        p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                            "-m", "mtrl_arch.cli", "train", "--resume", str(finished), "train.epochs=2", "--no-progress"],
                           capture_output=True, text=True, timeout=300,
                           env={**_env(), "MTRL_ARCH_DIST_TIMEOUT": "120"})
    assert p.returncode != 0
    for rank in (0, 1):  # rank 0's refusal, broadcast: every rank names the holder and exits 2
        assert f"error: rank {rank}: run directory {finished} is in use by another `mtrl-arch train`: " \
               f"PID {os.getpid()} on host {socket.gethostname()}" in p.stderr, p.stderr[-3000:]
    assert "exitcode  : 2" in p.stderr
    assert {k: v for k, v in files(finished).items() if k != LOCK_NAME} == \
        {k: v for k, v in before.items() if k != LOCK_NAME}


def test_each_sweep_trial_holds_its_own_lock(tmp_path, cache):
    from mtrl_arch import sweep

    out = tmp_path / "sweep"
    busy = out / "base-seed1"
    with lock_run_dir(busy, create=True):  # someone else's run in trial seed1's directory
        res = sweep.run_sweep(CONFIG, tiny(cache, "train.epochs=1"), [0, 1], out, runner="local",
                              report=False, echo=lambda s: None)
    assert res["n_ok"] == 1
    (failed,) = res["failed"]
    assert failed["trial"] == "base-seed1" and failed["exit"] == 2
    assert f"is in use by another `mtrl-arch train`: PID {os.getpid()}" in failed["error"]
    assert (out / "base-seed0" / "model.pt").is_file() and not (busy / "config.yaml").exists()


def test_a_new_run_that_ends_before_writing_leaves_no_directory(tmp_path, capsys):
    """The lock is the run directory's first write; a start that fails after it (no data here) removes it."""
    d = tmp_path / "a" / "run"
    assert main(["train", "--no-progress", CONFIG, *tiny(tmp_path / "cache", f"data.root={tmp_path / 'nothing'}"),
                 f"run_dir={d}"]) == 2
    assert "not found" in capsys.readouterr().err
    assert not (tmp_path / "a").exists()
