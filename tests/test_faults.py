"""Fault injection: kills, signals, damaged checkpoints, divergence, full disk, W&B outages, bad input.

Every training run here is the real CLI on real Meta-World (two tasks, 50-step episodes,
a 32x32 CoNAL network with a short search), so a resume crosses the search -> derive
switch, mid-episode and episode-boundary checkpoints. Runs that are compared for exact
resume use one torch thread (numerics then do not depend on the thread count); runs that
are killed are subprocesses, their resumes and the reference run happen in-process
(cli.main) to spare a ~5-10 s interpreter start each. The MT10 benchmark object (whose
construction takes 10-15 s) is built once and handed to every subprocess pickled.
Whole file: about 2-3 minutes on 2 loaded cores.
"""
from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import mtrl_arch.checkpoint as C
from mtrl_arch.cli import main
from mtrl_arch.logger import Logger, read_metrics
from run_compare import assert_same_state, child_env, cli_command, final_state, metric_lines, pickle_benchmark, start

pytest.importorskip("metaworld")

# CoNAL without the conflict-noticed operation, a fast alpha, a quarter update per vector step
TINY = ["mt10_conal", "arch.conflict_noticed=false", "arch.options.lr=3e-3", "train.updates_per_step=0.25",
        "env.tasks=[reach-v3,push-v3]", "env.max_episode_steps=50", "model.hidden=[32,32]",
        "train.total_env_steps=400", "train.warmup_steps=40", "train.checkpoint_every_env_steps=50", "train.log_every=40",
        "eval.every_env_steps=200", "eval.episodes_per_task=1", "eval.final_episodes_per_task=1",
        "arch.search_steps=80", "agent.batch_per_task=16", "agent.buffer_size=2000", "wandb.mode=disabled",
        "device=cpu"]
# checkpoints every 25 vector steps: env step 50k is mid-episode for odd k, a boundary for even k;
# the search ends (derive, rebuild, fresh weights) at env step 160

@pytest.fixture(scope="module")
def bench(tmp_path_factory) -> Path:
    return pickle_benchmark(tmp_path_factory.mktemp("bench") / "mt10-seed0.pkl")


def resume_in_process(d: Path, capsys) -> str:
    """``mtrl-arch train --resume d`` in this process; its stderr."""
    capsys.readouterr()
    assert main(["train", "--no-progress", "--resume", str(d)]) == 0
    return capsys.readouterr().err


def run_cli(bench: Path, *argv: str, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run(cli_command(bench, *argv), env=child_env(), capture_output=True, text=True, timeout=timeout)


def train_args(run_dir: Path, *extra: str) -> list[str]:
    return ["train", "--no-progress", *TINY, f"run_dir={run_dir}", *extra]


def wait_for(p: subprocess.Popen, cond, timeout: float = 180) -> None:
    t0 = time.time()
    while not cond():
        if p.poll() is not None:
            raise AssertionError(f"process ended (rc {p.returncode}) before the kill point:\n{p.stderr.read()[-2000:]}")
        if time.time() - t0 > timeout:
            p.kill()
            raise AssertionError("kill point not reached in time")
        time.sleep(0.02)


def assert_steps_clean(lines: list[dict]) -> None:
    """No duplicate and no missing training-log steps; steps never go backwards."""
    steps = [r["step"] for r in lines]
    assert steps == sorted(steps)
    train = [r["step"] for r in lines if "train/n_updates" in r]
    assert len(train) == len(set(train))
    assert train == list(range(40, 401, 40))


@pytest.fixture(scope="module")
def reference(bench, one_thread, tmp_path_factory) -> Path:
    """The uninterrupted run every resumed run must reproduce."""
    d = tmp_path_factory.mktemp("ref") / "run"
    assert main(train_args(d)) == 0
    return d


# ---- SIGKILL / SIGTERM / SIGINT, then resume ---------------------------------------------------------
KILL_POINTS = {
    "before-first-checkpoint": lambda d: (d / "metrics.jsonl").is_file() and (d / "metrics.jsonl").stat().st_size > 0,
    "boundary-during-search": lambda d: (d / "checkpoints" / "ckpt-100.pt").is_file(),  # vector step 50
    "mid-episode-after-derive": lambda d: (d / "checkpoints" / "ckpt-250.pt").is_file(),  # vector step 125
}


@pytest.mark.parametrize("point", list(KILL_POINTS))
def test_sigkill_then_resume_is_exact(bench, reference, tmp_path, capsys, point):
    d = tmp_path / "run"
    p = start(bench, *train_args(d))
    wait_for(p, lambda: KILL_POINTS[point](d))
    p.send_signal(signal.SIGKILL)
    p.wait(30)
    assert p.returncode == -signal.SIGKILL
    # at most one checkpoint interval lost: the newest checkpoint is within 50 env steps of the last logged one
    logged = [json.loads(x)["step"] for x in (d / "metrics.jsonl").read_text().splitlines()[:-1]]
    steps = C.list_steps(d / "checkpoints")
    if steps:
        assert max(logged, default=0) - steps[-1] <= 50
    resume_in_process(d, capsys)
    got, want = metric_lines(d), metric_lines(reference)
    assert_steps_clean(got)
    assert got == want
    assert_same_state(final_state(d), final_state(reference))
    assert (d / "arch.json").read_text() == (reference / "arch.json").read_text()


def test_sigterm_saves_flushes_exits_0_and_resumes_exactly(bench, reference, tmp_path, capsys):
    d = tmp_path / "run"
    p = start(bench, *train_args(d))
    wait_for(p, lambda: (d / "checkpoints" / "ckpt-300.pt").is_file())
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=60)
    assert p.returncode == 0, err
    assert "stopped by SIGTERM at env step" in err and "--resume" in err
    stop_step = int(err.split("stopped by SIGTERM at env step ")[1].split(";")[0])
    assert C.list_steps(d / "checkpoints")[-1] == stop_step  # a checkpoint at the very step it stopped
    assert not (d / "model.pt").exists()  # only a finished run has the final model
    lines = (d / "metrics.jsonl").read_text()
    assert lines.endswith("\n")  # flushed, no torn line
    resume_in_process(d, capsys)
    assert metric_lines(d) == metric_lines(reference)
    assert_same_state(final_state(d), final_state(reference))


def test_finished_run_resumed_with_a_larger_budget_trains_on(reference, tmp_path, capsys):
    d = _finished_copy(reference, tmp_path)
    capsys.readouterr()
    assert main(["train", "--no-progress", "--resume", str(d), "train.total_env_steps=480"]) == 0
    lines, before = metric_lines(d), metric_lines(reference)
    assert lines[:len(before)] == before
    assert [r["step"] for r in lines[len(before):] if "train/n_updates" in r] == [440, 480]
    assert lines[-1]["step"] == 480 and "eval/success_rate/mean" in lines[-1]  # a new final evaluation


def test_a_budget_stop_then_a_larger_budget_logs_the_uninterrupted_windows(one_thread, tmp_path, capsys):
    """Training logs every 120 env steps; a run stopped by its budget at 200 (not a log step) and resumed to 400
    writes the uninterrupted run's lines (same windows, same values) plus only the stop point's lines at 200."""
    log = ["train.log_every=120", "train.checkpoint_every_env_steps=1000"]
    full, split = tmp_path / "full", tmp_path / "split"
    assert main(train_args(full, *log)) == 0
    assert main(train_args(split, *log, "train.total_env_steps=200")) == 0
    capsys.readouterr()
    assert main(["train", "--no-progress", "--resume", str(split), "train.total_env_steps=400"]) == 0
    a, b = metric_lines(full), metric_lines(split)
    assert [r["step"] for r in a if "train/n_updates" in r] == [120, 240, 360, 400]
    assert [r["step"] for r in b if "train/n_updates" in r] == [120, 200, 240, 360, 400]
    # the first line after the resume covers 120-240 in both (not 200-240), with the same values
    assert [r for r in b if r["step"] != 200] == [r for r in a if r["step"] != 200]
    assert_same_state(final_state(split), final_state(full))


# LTB and AdaShare on TINY's settings, with schedules that move at every update of the search (10 updates,
# at vector steps 44-80): LTB's warm-up and temperature, AdaShare's temperature and curriculum
SCHEDULED = {
    "ltb": ["arch.options.total_steps=10"],
    "adashare": ["arch.options.warmup_steps=2", "arch.options.weight_steps=1", "arch.options.policy_steps=1",
                 "arch.options.curriculum_speed=1", "arch.options.tau_decay_every=1"],
}


@pytest.mark.parametrize("method", list(SCHEDULED))
def test_scheduled_search_stopped_mid_search_resumes_exactly(bench, one_thread, tmp_path, capsys, method):
    """A run stopped by its budget mid-search (env step 120, update 5 of 10) and resumed to the full budget
    (240) ends with the uninterrupted run's log, architecture and model: the resumed search network takes
    the schedules the last update left in force, not the build-time ones, and the budget's final evaluation
    (the search network samples its architecture even for deterministic actions) leaves the training's
    random streams as they were."""
    args = [f"mt10_{method}", *(a for a in TINY[1:] if not a.startswith("arch.options.")), *SCHEDULED[method],
            "train.total_env_steps=240"]
    full, split = tmp_path / "full", tmp_path / "split"
    assert main(["train", "--no-progress", *args, f"run_dir={full}"]) == 0
    assert main(["train", "--no-progress", *args, f"run_dir={split}", "train.total_env_steps=120"]) == 0
    _, state = C.read_checkpoint(C.checkpoint_path(split / "checkpoints", 120))
    assert state["agent"]["searching"] and state["agent"]["n_updates"] == 5
    capsys.readouterr()
    assert main(["train", "--no-progress", "--resume", str(split), "train.total_env_steps=240"]) == 0
    # the stop point adds its lines (the budget's final evaluation); every other line is the uninterrupted run's
    a, b = metric_lines(full), metric_lines(split)
    assert [r for r in b if r["step"] != 120] == [r for r in a if r["step"] != 120]
    assert (split / "arch.json").read_text() == (full / "arch.json").read_text()
    assert_same_state(final_state(split), final_state(full))


def test_sigint_saves_and_exits_0(bench, tmp_path):
    d = tmp_path / "run"
    p = start(bench, *train_args(d, "train.checkpoint_every_env_steps=1000"))  # only the stop writes a checkpoint
    wait_for(p, lambda: (d / "metrics.jsonl").is_file() and len((d / "metrics.jsonl").read_text().splitlines()) >= 3)
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=60)
    assert p.returncode == 0, err
    assert "stopped by SIGINT" in err and "Traceback" not in err
    steps = C.list_steps(d / "checkpoints")
    assert len(steps) == 1
    C.read_checkpoint(C.checkpoint_path(d / "checkpoints", steps[0]))  # intact


# ---- damaged checkpoints ------------------------------------------------------------------------------
def test_damaged_newest_checkpoint_falls_back_to_previous(bench, reference, tmp_path, capsys):
    import shutil

    d = tmp_path / "run"
    shutil.copytree(reference, d)
    (d / "model.pt").unlink()
    newest = C.checkpoint_path(d / "checkpoints", C.list_steps(d / "checkpoints")[-1])
    newest.write_bytes(newest.read_bytes()[:-1000])  # as a disk that lost the file's tail would leave it
    err = resume_in_process(d, capsys)
    warn = [x for x in err.splitlines() if x.startswith("warning:")]
    assert len(warn) == 1 and newest.name in warn[0] and "damaged (truncated" in warn[0] and "falling back" in warn[0]
    assert "resumed from" in err and "ckpt-350.pt" in err
    assert (d / "checkpoints" / (newest.name + ".damaged")).exists()
    assert metric_lines(d) == metric_lines(reference)
    assert_same_state(final_state(d), final_state(reference))


def test_checkpoint_unit_damage_and_rotation(tmp_path):
    for s in (1, 2, 3):
        C.save_checkpoint(tmp_path, s, {"x": torch.full((4,), float(s))}, keep=2)
    assert C.list_steps(tmp_path) == [2, 3]
    p3 = C.checkpoint_path(tmp_path, 3)
    p3.write_bytes(p3.read_bytes()[:-1])
    step, state = C.load_latest(tmp_path)
    assert step == 2 and torch.equal(state["x"], torch.full((4,), 2.0))
    p2 = C.checkpoint_path(tmp_path, 2)
    raw = bytearray(p2.read_bytes())
    raw[-50] ^= 0x01  # one flipped bit: the size holds, the checksum does not
    p2.write_bytes(bytes(raw))
    with pytest.raises(C.CheckpointError, match="checksum mismatch"):
        C.read_checkpoint(p2)
    p2.write_bytes(b"garbage")
    with pytest.raises(C.CheckpointError, match="unreadable header"):
        C.read_checkpoint(p2)
    assert C.load_latest(tmp_path) is None
    # a header from a newer mtrl-arch is not damage: it is refused, never skipped silently
    C.save_checkpoint(tmp_path, 9, {"x": torch.zeros(1)})
    p9 = C.checkpoint_path(tmp_path, 9)
    raw = p9.read_bytes()
    p9.write_bytes(raw.replace(f'"version": {C.VERSION}'.encode(), b'"version": 9', 1))
    with pytest.raises(C.CheckpointVersionError):
        C.load_latest(tmp_path)


# ---- full disk ----------------------------------------------------------------------------------------
class _FullDisk:
    """A file whose writes fail with ENOSPC once ``room`` bytes have been written."""

    def __init__(self, f, room: int):
        self.f, self.room = f, room

    def write(self, b):
        self.room -= len(b)
        if self.room < 0:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return self.f.write(b)

    def __getattr__(self, k):
        return getattr(self.f, k)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()


def _full_disk_open(room: int):
    import builtins

    def fake_open(path, mode="r", *a, **k):
        f = builtins.open(path, mode, *a, **k)
        return _FullDisk(f, room) if "w" in mode else f
    return fake_open


def test_full_disk_keeps_previous_checkpoints(tmp_path, monkeypatch):
    C.save_checkpoint(tmp_path, 1, {"x": torch.ones(3)})
    C.save_checkpoint(tmp_path, 2, {"x": torch.ones(3) * 2})
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    monkeypatch.setattr(C, "open", _full_disk_open(room=10_000), raising=False)
    with pytest.raises(C.CheckpointWriteError, match="No space left on device.*previous checkpoints are intact"):
        C.save_checkpoint(tmp_path, 3, {"x": torch.zeros(100_000)})
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before  # no temp file, nothing touched
    assert C.load_latest(tmp_path)[0] == 2


def test_full_disk_during_training_exits_4(bench, tmp_path, monkeypatch, capsys, one_thread):
    d = tmp_path / "run"
    real_save = C.save_checkpoint
    calls = []

    def save_then_fill(folder, step, state, keep=2, meta=None):
        calls.append(step)
        if len(calls) == 3:  # the third checkpoint meets a full disk
            monkeypatch.setattr(C, "open", _full_disk_open(room=50_000), raising=False)
        return real_save(folder, step, state, keep, meta)

    monkeypatch.setattr("mtrl_arch.loop.save_checkpoint", save_then_fill)
    assert main(train_args(d)) == 4
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: could not write checkpoint") and "No space left on device" in err[-1]
    assert C.list_steps(d / "checkpoints") == [50, 100]
    for s in (50, 100):
        C.read_checkpoint(C.checkpoint_path(d / "checkpoints", s))
    assert not list((d / "checkpoints").glob(".*tmp"))


# ---- divergence ---------------------------------------------------------------------------------------
def test_non_finite_loss_stops_with_exit_3_keeping_last_good_checkpoint(bench, tmp_path, monkeypatch, capsys,
                                                                       one_thread):
    from mtrl_arch.agents.sac import MTSAC

    real_step = MTSAC.train_step

    def diverging_step(self):
        if self.n_updates == 30:  # an exploding critic: its first layer becomes NaN
            with torch.no_grad():
                next(self.critic.parameters()).fill_(float("nan"))
        return real_step(self)

    monkeypatch.setattr(MTSAC, "train_step", diverging_step)
    d = tmp_path / "run"
    assert main(train_args(d)) == 3
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: non-finite critic_loss (task reach-v3) at env step")
    assert "update 30" in err[-1] and "last good checkpoint kept" in err[-1]
    bad_step = int(err[-1].split("at env step ")[1].split(",")[0])
    steps = C.list_steps(d / "checkpoints")
    assert steps and steps[-1] <= bad_step  # nothing saved after the divergence
    _, state = C.read_checkpoint(C.checkpoint_path(d / "checkpoints", steps[-1]))
    assert all(torch.isfinite(v).all() for v in state["agent"]["critic"].values())
    assert not (d / "model.pt").exists()


# ---- Weights & Biases ---------------------------------------------------------------------------------
def test_wandb_online_without_credentials_keeps_training(bench, tmp_path, monkeypatch, capsys, one_thread):
    for k in ("WANDB_API_KEY", "WANDB_MODE"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb-config"))  # no stored login
    monkeypatch.setenv("WANDB_INIT_TIMEOUT", "10")
    d = tmp_path / "run"
    args = train_args(d, "wandb.mode=online", "wandb.entity=no-such-entity-xyz", "train.total_env_steps=100",
                      "eval.every_env_steps=0", "arch.search_steps=45")
    with pytest.warns(UserWarning, match="W&B unavailable") as rec:
        assert main(args) == 0
    assert sum("W&B" in str(w.message) for w in rec) == 1  # warned once
    assert (d / "model.pt").exists() and read_metrics(d)[-1]["step"] == 100


def test_wandb_failing_mid_run_warns_once(tmp_path):
    class Broken:
        def log(self, *a, **k):
            raise ConnectionError("network down")

        summary: dict = {}

        def finish(self):
            raise ConnectionError("network down")

    lg = Logger(tmp_path, None)
    lg._wandb = Broken()
    with pytest.warns(UserWarning, match="W&B log failed") as rec:
        for s in range(5):
            lg.log({"x": float(s)}, s)
    assert len(rec) == 1
    lg.close()
    assert [r["step"] for r in read_metrics(tmp_path)] == [0, 1, 2, 3, 4]


def test_wandb_finish_that_hangs_does_not_hold_the_process(tmp_path):
    import threading

    class Hanging:
        summary: dict = {}

        def log(self, *a, **k):
            pass

        def finish(self):
            threading.Event().wait(30)

    lg = Logger(tmp_path, None)
    lg._wandb = Hanging()
    lg.log({"x": 1.0}, 1)
    t0 = time.time()
    with pytest.warns(UserWarning, match="did not finish"):
        lg.close(wandb_timeout=0.5)
    assert time.time() - t0 < 5
    assert read_metrics(tmp_path)[0]["x"] == 1.0


# ---- bad input: exit 2, one line on stderr, no traceback ------------------------------------------------
BAD_CONFIGS = {
    "unknown key": (["train.lrr=0.1"], "unknown config key 'train.lrr'; did you mean train.lr?"),
    "unknown section": (["trian.lr=0.1"], "unknown config key 'trian'; did you mean train?"),
    "wrong type": (["train.total_env_steps=abc"], "train.total_env_steps must be an integer"),
    "wrong type bool": (["train.amp=maybe"], "train.amp must be true or false"),
    "negative lr": (["train.lr=-0.001"], "train.lr must be positive"),
    "out of range gamma": (["agent.gamma=1.5"], "agent.gamma must be in (0, 1]"),
    "bad literal": (["wandb.mode=sometimes"], "wandb.mode must be one of offline, online, disabled"),
    "unknown method": (["arch.method=conall"], "conal"),
    "unknown weighting": (["weighting=pcgard"], "pcgrad"),
    "unknown method option": (["arch.options.lrr=1"], "unknown config key 'arch.options.lrr' (valid here: none)"),  # hps has no options
    "unknown task": (["env.tasks=[reach-v3,pushh-v3]"], "unknown task(s) for MT10: 'pushh-v3' (close matches: push-v3"),
    "not key=value": (["train.lr"], "is not of the form key=value"),
}


@pytest.mark.parametrize("case", list(BAD_CONFIGS))
def test_bad_config_exit_2_one_line(case, tmp_path, capsys):
    overrides, expected = BAD_CONFIGS[case]
    d = tmp_path / "run"
    assert main(["train", "mt10_quick", f"run_dir={d}", *overrides]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err
    assert err.startswith("error: ") and expected in err and "Traceback" not in err
    assert not d.exists()  # nothing was created before the config was checked


def test_bad_config_files(tmp_path, capsys):
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("train:\n  lr: [1, 2\n")
    not_mapping = tmp_path / "list.yaml"
    not_mapping.write_text("- 1\n- 2\n")
    cases = [([str(bad_yaml)], "is not valid YAML at line"), ([str(not_mapping)], "must hold a mapping"),
             (["mt10_quik"], "no config named 'mt10_quik' (did you mean mt10_quick"),
             ([str(tmp_path / "missing.yaml")], "does not exist")]
    for argv, expected in cases:
        assert main(["train", *argv]) == 2
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and expected in err, err


def test_debug_shows_the_traceback():
    from mtrl_arch.config import ConfigError

    with pytest.raises(ConfigError, match="train.lr must be positive"):
        main(["--debug", "train", "mt10_quick", "train.lr=-1"])


def test_bad_config_in_a_fresh_process_prints_one_line_only():
    r = subprocess.run([sys.executable, "-m", "mtrl_arch.cli", "train", "mt10_quick", "train.checkpoint_every_env_step=5"],
                       capture_output=True, text=True, env=child_env(), timeout=120)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [
        "error: unknown config key 'train.checkpoint_every_env_step'; did you mean train.checkpoint_every_env_steps? "
        "(valid here: "
        + r.stderr.split("(valid here: ")[1].strip()]


def _finished_copy(reference: Path, tmp_path: Path) -> Path:
    import shutil

    d = tmp_path / "run"
    shutil.copytree(reference, d)
    return d


def test_bad_run_directories(reference, tmp_path, capsys):
    d = _finished_copy(reference, tmp_path)
    cfg = (d / "config.yaml").read_text()
    cases = []
    cases.append((["--resume", str(tmp_path / "nowhere")], None, "is not a run directory (no config.yaml)"))
    cases.append((["--resume", str(d), "model.hidden=[64,64]"], None, "cannot resume"))
    cases.append((["--resume", str(d)], lambda: (d / "config.yaml").write_text("train: [unclosed\n"),
                  "config.yaml is damaged (not valid YAML"))
    cases.append((["--resume", str(d)], lambda: (d / "config.yaml").write_text(cfg.replace("format_version: 1", "format_version: 7")),
                  "was written by a newer mtrl-arch (run format 7)"))
    cases.append((["--resume", str(d)], lambda: (d / "config.yaml").write_text(cfg.replace("  lr: 0.0003\n", "  lr: 0.0003\n  future_knob: 1\n", 1)),
                  "config.yaml does not fit this mtrl-arch version: unknown config key"))
    for argv, prepare, expected in cases:
        if prepare:
            prepare()
        assert main(["train", "--no-progress", *argv]) == 2
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and expected in err, err
        (d / "config.yaml").write_text(cfg)


def test_resume_checkpoint_from_incompatible_config_or_version(bench, reference, tmp_path, capsys, one_thread):
    d = _finished_copy(reference, tmp_path)
    cfg = (d / "config.yaml").read_text()
    # config.yaml edited by hand after the run: the checkpoint's own record disagrees
    (d / "config.yaml").write_text(cfg.replace("buffer_size: 2000", "buffer_size: 4000"))
    assert main(["train", "--no-progress", "--resume", str(d)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: cannot resume from the checkpoint at env step 400: it was made with "
                              "agent.buffer_size=2000 (now 4000)"), err
    (d / "config.yaml").write_text(cfg)
    # a checkpoint written by a newer mtrl-arch
    for p in (d / "checkpoints").glob("ckpt-*.pt"):
        p.write_bytes(p.read_bytes().replace(f'"version": {C.VERSION}'.encode(), b'"version": 5', 1))
    assert main(["train", "--no-progress", "--resume", str(d)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "format version 5, newer than this mtrl-arch reads" in err[-1] and len(err) <= 2, err


def test_damaged_run_files_for_other_commands(reference, tmp_path, capsys):
    d = _finished_copy(reference, tmp_path)
    (d / "arch.json").write_text("{not json")
    assert main(["arch", str(d)]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "arch.json is damaged" in err and "expected" in err


def test_missing_data_names_expected_layout(tmp_path, capsys):
    from mtrl_arch.config import available_configs

    name = next((c for c in ("multi_mnist_hps", "multi_fashion_mnist_hps") if c in available_configs()), None)
    if name is None:
        pytest.skip("no supervised config in this checkout")
    rc = main(["train", "--no-progress", name, f"data.root={tmp_path / 'nothing-here'}", f"run_dir={tmp_path / 'r'}",
               "wandb.mode=disabled", "device=cpu"])
    err = capsys.readouterr().err
    assert rc == 2, err
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: ") and "expected" in last and "Traceback" not in err
