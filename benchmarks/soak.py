"""Faults at random moments: SIGKILL training runs at seeded random wall-clock moments, resume, compare.

For each learner (an MT-SAC CoNAL search + retrain on two Meta-World tasks; a supervised CoNAL search +
retrain on Multi-Fashion+MNIST; the stable-baselines3 single-task baseline), tiny and on one thread:

1. the uninterrupted reference run, as a subprocess; its duration T (process start to exit) and its start-up S
   (process start to its first write to the run directory) are the scale of the kill moments;
2. a soaked run: start it, SIGKILL it at a moment drawn by a seeded RNG: one kill in four uniformly from (0, T)
   after the process's start, the others uniformly from (0, T - S) after the process's first write to the run
   directory (start-up is most of a tiny run's time and every resume starts up again: counted from the start
   alone, most kills would hit the imports); look at what the run directory holds (the phase the kill hit:
   start-up, search, retrain, a checkpoint write, the final evaluation or model write), start it again with
   ``mtrl-arch train --resume RUN_DIR``, kill it again, ...
   A kill before ``config.yaml`` exists leaves nothing to resume (``--resume`` would refuse the directory):
   the run is started afresh with its own arguments and counted as a restart. A run directory with
   ``config.yaml`` but no checkpoint is resumed (the CLI then starts it from the beginning);
3. once N kills are spent, the last run is resumed to its end; a session that ends by itself before its
   kill moment finishes its run, which is compared and a new soaked run begins;
4. every finished run is compared with the reference: ``metrics.jsonl`` less ``time/*``, ``model.pt``
   (bytes; SB3's model holds zip archives whose file times differ, so there every member's bytes), and
   ``arch.json``'s text.

Every run's config and relative ``run_dir=run`` are the same; each run lives in its own working directory,
so model.pt's embedded config is byte for byte the reference's.

    python benchmarks/soak.py                      # N=20 kills per learner, seed 0, under /tmp/soak-runs
    python benchmarks/soak.py --kills 3 --learners rl --json out.json

tests/test_soak.py runs a seeded three-kill version; benchmarks/results/reliability.md records the N=20 run.
"""
from __future__ import annotations

import argparse
import json
import platform
import random
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the run-comparison helpers tests/test_faults.py uses too

from data_roots import data_overrides  # noqa: E402
from run_compare import child_env, cli_command, compare_runs, pickle_benchmark  # noqa: E402

# train.report=false: the end-of-train report (seconds at these sizes) would draw most moments after training
ONE_THREAD = ["train.threads=1", "device=cpu", "wandb.mode=disabled", "train.report=false", "run_dir=run"]

# CoNAL, a quarter update per vector step; checkpoints every 25 vector steps (mid-episode for odd multiples of 50
# env steps); the search ends (derive, rebuild, fresh weights) at env step 320 of 600, so that kills land in the
# search after its first checkpoints as well as in the retrain
RL = ["mt10_conal", "arch.conflict_noticed=false", "arch.options.lr=3e-3", "train.updates_per_step=0.25",
      "env.tasks=[reach-v3,push-v3]", "env.max_episode_steps=50", "model.hidden=[32,32]",
      "train.total_env_steps=600", "train.warmup_steps=40", "train.checkpoint_every_env_steps=50", "train.log_every=40",
      "eval.every_env_steps=300", "eval.episodes_per_task=1", "eval.final_episodes_per_task=1",
      "arch.search_steps=160", "agent.batch_per_task=16", "agent.buffer_size=2000"]
# one SB3 SAC per task, 100 env steps each (learning after 25), a checkpoint every 50 env steps summed over tasks
SB3 = ["mt10_stl_sb3", "env.tasks=[reach-v3,push-v3]", "env.max_episode_steps=50", "model.hidden=[32,32]",
       "train.total_env_steps=200", "train.warmup_steps=25", "train.checkpoint_every_env_steps=50",
       "eval.every_env_steps=100", "eval.episodes_per_task=1", "eval.final_episodes_per_task=2",
       "agent.batch_per_task=16", "agent.buffer_size=2000"]


def supervised_args(cache: Path) -> list[str]:
    """CoNAL on Multi-Fashion+MNIST, LeNet width 4, 64 training composites in batches of 8: 14 search steps (two
    passes over the search's share, a checkpoint after each), derive, 3 epochs of 8 batches (a checkpoint and an
    evaluation of 2 batches after each)."""
    return ["multi_fashion_mnist_conal", *data_overrides("mnist", "fashion_mnist"), f"data.options.cache_dir={cache}",
            "model.options.width=4", "train.batch_size=8", "eval.batch_size=64", "train.epochs=3",
            "data.options.train_subset=64", "eval.limit_batches=2", "arch.search_steps=14", "train.checkpoint_every_epochs=1",
            "data.num_workers=0"]


LEARNERS = ("rl", "supervised", "sb3")


def learner_args(name: str, work: Path) -> list[str]:
    if name == "rl":
        return RL + ONE_THREAD
    if name == "sb3":
        return SB3 + ONE_THREAD
    if name == "supervised":
        return supervised_args(work / "multi-cache") + ONE_THREAD
    raise ValueError(f"unknown learner {name!r}; one of {', '.join(LEARNERS)}")


def warm_data(name: str, args: list[str]) -> None:
    """Build what the first run would otherwise build inside the reference's timing (the Multi-* composites)."""
    if name == "supervised":
        from mtrl_arch.config import load_config
        from mtrl_arch.envs.supervised import make_adapter

        make_adapter(load_config(args[0], args[1:]))


@dataclass
class Session:
    how: str                 # fresh | resume | restart (fresh again: killed before config.yaml existed)
    seconds: float
    killed_at: float | None  # the drawn moment; None: ran to its end
    counted_from: str = ""   # start (of the process) | first write (of the process to the run directory)
    phase: str = ""          # what the run directory showed right after the kill
    rc: int | None = None


@dataclass
class SoakedRun:
    folder: str
    sessions: list[Session] = field(default_factory=list)
    result: dict[str, Any] = field(default_factory=dict)


def footprint(run: Path) -> tuple:
    """What a session changes in its run directory as it goes: config.yaml, checkpoints, the log, model.pt."""
    def stamp(p: Path):
        return p.stat().st_mtime_ns if p.is_file() else None

    ck = sorted(p.name for p in (run / "checkpoints").glob("*")) if (run / "checkpoints").is_dir() else []
    return stamp(run / "config.yaml"), ck, stamp(run / "metrics.jsonl"), stamp(run / "model.pt")


def phase_of(run: Path, reference: Path, before: tuple) -> str:
    """What the killed session was doing, read off its run directory (``before``: its :func:`footprint` when the
    session started; the reference tells the run's last step and whether it derives an architecture)."""
    if not (run / "config.yaml").is_file():
        return "start-up (no config.yaml yet)"
    if footprint(run) == before:
        return "start-up (nothing written yet)"
    ck = run / "checkpoints"
    if list(ck.glob(".ckpt-*.tmp")):
        return "checkpoint write"
    if footprint(run)[3] != before[3] or [*run.glob(".model.pt.*.tmp"), *run.glob("model.pt.tmp")]:
        return "final model write / exit"
    steps = sorted(int(p.name[5:-3]) for p in ck.glob("ckpt-*.pt") if p.name[5:-3].isdigit())
    if not steps:
        return "before the first checkpoint"
    last = json.loads((reference / "metrics.jsonl").read_text().splitlines()[-1])["step"]
    if steps[-1] >= last:
        return "final evaluation"
    if (reference / "arch.json").is_file() and not (run / "arch.json").is_file():
        return "search"
    return "retrain" if (reference / "arch.json").is_file() else "training"


def run_session(bench: Path | str, work: Path, argv: list[str], kill_at: float | None, log: Path,
                from_first_write: bool = False) -> tuple[int | None, float, float | None]:
    """One process of ``mtrl-arch ARGV`` in ``work`` (its run directory ``work/run``): SIGKILLed ``kill_at`` seconds
    after its start, or ``from_first_write`` after it first changed the run directory (:func:`footprint`), unless
    it ends first. Its exit code (None: killed), its seconds, and the seconds to its first write (None: none)."""
    run, t0 = work / "run", time.perf_counter()
    before, first = footprint(work / "run"), None
    with open(log, "a") as err:
        p = subprocess.Popen(cli_command(bench, *argv), cwd=work, env=child_env(), stdout=subprocess.DEVNULL,
                             stderr=err)
        while p.poll() is None:
            now = time.perf_counter() - t0
            if first is None and footprint(run) != before:
                first = now
            start = first if from_first_write else 0.0
            if kill_at is not None and start is not None and now - start >= kill_at:
                p.send_signal(signal.SIGKILL)
                p.wait()
                return None, time.perf_counter() - t0, first
            time.sleep(0.01)
    return p.returncode, time.perf_counter() - t0, first


def soak(name: str, kills: int, seed: int, root: Path, bench: Path | str, say=print,
         overrides: tuple[str, ...] = ()) -> dict[str, Any]:
    """Kill ``name``'s runs ``kills`` times at random moments (seeded), resume each to its end, compare each
    finished run with the reference; the record of it all (see the module docstring). ``overrides`` change the
    learner's budget (e.g. a shorter run for the tests)."""
    work = root / name
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    args = [*learner_args(name, work), *overrides]
    warm_data(name, args)
    train = ["train", "--no-progress", *args]
    (work / "ref").mkdir()
    rc, duration, startup = run_session(bench, work / "ref", train, None, work / "ref" / "stderr.log")
    if rc != 0:
        raise RuntimeError(f"{name}: the reference run failed (exit {rc}); see {work / 'ref' / 'stderr.log'}")
    reference = work / "ref" / "run"
    say(f"{name}: reference run {duration:.1f} s, {startup:.1f} s of them before its first write")
    rng = random.Random(f"{seed}-{name}")
    runs: list[SoakedRun] = []
    spent = 0
    while spent < kills:
        r = SoakedRun(f"soak-{len(runs) + 1}")
        runs.append(r)
        cwd = work / r.folder
        cwd.mkdir()
        run = cwd / "run"
        while True:
            # one kill in four counts from the process's start (start-up included), the others from its first write
            # to the run directory: start-up is most of a tiny run's time, and each resume starts up again
            from_start = rng.random() < 0.25
            kill_at = rng.uniform(0, duration if from_start else duration - startup) if spent < kills else None
            if (run / "config.yaml").is_file():
                how, argv = "resume", ["train", "--no-progress", "--resume", "run"]
            else:
                how, argv = ("restart" if r.sessions else "fresh"), train
            before = footprint(run)
            rc, secs, _ = run_session(bench, cwd, argv, kill_at, cwd / "stderr.log", from_first_write=not from_start)
            s = Session(how, round(secs, 2), None if rc is not None else round(kill_at, 2), rc=rc,
                        counted_from="start" if from_start else "first write")
            r.sessions.append(s)
            if rc is None:
                spent += 1
                s.phase = phase_of(run, reference, before)
                say(f"{name}: kill {spent}/{kills} at {kill_at:.1f} s from its {s.counted_from} of a {how} session: "
                    f"{s.phase}")
                continue
            if rc != 0:
                tail = (cwd / "stderr.log").read_text().strip().splitlines()[-1:]
                r.result = {"identical": False, "why": f"a {how} session exited {rc}: {tail}"}
                say(f"{name}: {r.folder}: {r.result['why']}")
                break
            r.result = compare_runs(run, reference)
            say(f"{name}: {r.folder} finished after {len(r.sessions)} session(s): "
                + ("identical" if r.result["identical"] else f"DIFFERS ({r.result['why']})"))
            break
    killed = sum(s.killed_at is not None for r in runs for s in r.sessions)
    phases: dict[str, int] = {}
    for r in runs:
        for s in r.sessions:
            if s.phase:
                phases[s.phase] = phases.get(s.phase, 0) + 1
    return {"learner": name, "reference_s": round(duration, 2), "reference_startup_s": round(startup, 2), "kills": killed,
            "resumed": sum(s.how == "resume" for r in runs for s in r.sessions),
            "restarted": sum(s.how == "restart" for r in runs for s in r.sessions),
            "runs": len(runs), "identical": sum(bool(r.result.get("identical")) for r in runs),
            "model_compared": sorted({str(r.result.get("model")) for r in runs}), "phases": phases,
            "detail": [{"folder": r.folder, "result": r.result, "sessions": [vars(s) for s in r.sessions]} for r in runs]}


def environment() -> dict[str, Any]:
    import os

    out = {"python": platform.python_version(), "platform": platform.platform(), "cpus": os.cpu_count(),
           "load_avg_1m": round(os.getloadavg()[0], 2)}
    for pkg in ("torch", "numpy", "metaworld", "mujoco", "stable-baselines3"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = "not installed"
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--kills", type=int, default=20, help="SIGKILLs per learner (N)")
    p.add_argument("--seed", type=int, default=0, help="seeds the kill moments")
    p.add_argument("--learners", default=",".join(LEARNERS), help=f"comma list of {', '.join(LEARNERS)}")
    p.add_argument("--root", default="/tmp/soak-runs", help="where the runs go (emptied per learner)")
    p.add_argument("--json", help="write the record here")
    a = p.parse_args(argv)
    root = Path(a.root)
    root.mkdir(parents=True, exist_ok=True)
    names = a.learners.split(",")
    bench = pickle_benchmark(root / "mt10-seed0.pkl") if {"rl", "sb3"} & set(names) else "-"
    t0 = time.time()
    env = environment()
    results = [soak(n, a.kills, a.seed, root, bench) for n in names]
    record = {"kills_per_learner": a.kills, "seed": a.seed, "minutes": round((time.time() - t0) / 60, 1),
              "environment": {**env, "load_avg_1m_end": round(__import__("os").getloadavg()[0], 2)},
              "results": results}
    print("| learner | reference run (s) | killed | resumed | restarted | runs finished | identical | model.pt compared by |")
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['learner']} | {r['reference_s']} | {r['kills']} | {r['resumed']} | {r['restarted']} | {r['runs']} "
              f"| {r['identical']} | {', '.join(r['model_compared'])} |")
        print(f"|  phases hit: {', '.join(f'{k} {v}' for k, v in sorted(r['phases'].items()))} |")
    if a.json:
        Path(a.json).write_text(json.dumps(record, indent=1))
    return 0 if all(r["identical"] == r["runs"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
