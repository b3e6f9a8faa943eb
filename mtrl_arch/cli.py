"""``mtrl-arch``: train | eval | arch | bench | report | sweep | configs. Parses, builds, runs; nothing else.

``train CONFIG [key=value ...] --dry-run`` prints the resolved config (YAML, as a run's
config.yaml holds it) and the networks' parameter counts, then exits 0 without training
or creating a run directory. A finished ``train`` writes the run's report into RUN_DIR/report
(as ``report RUN_DIR`` would; ``train.report=false``: not) and its last line names that folder.
``configs`` lists the shipped configs with their descriptions (the first comment line of each
YAML file).

Exit codes: 0 finished, or stopped by SIGINT/SIGTERM after saving a checkpoint;
2 user error (bad config, missing or damaged data, bad or incompatible run directory or
checkpoint, a run directory that is read-only, a file, or in use by another ``train``, which
holds a lock on it for the life of its run; ``eval --video``: no off-screen renderer, the line
names what to install; ``sweep``: a bad grid, or no Ray where one is asked for); 3 training
diverged (a non-finite loss or parameter; the last good checkpoint is kept); 4 a checkpoint,
or the run directory at the start, could not be written (e.g. disk full; the previous files
are intact, nothing half-written); 1 anything unexpected (with
a traceback), or for ``sweep`` one or more failed trials (listed in one line; the others
ran to the end). Exit codes 2-4 print one line on stderr and no traceback; ``--debug``
shows the traceback instead.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings
from pathlib import Path

from .config import ConfigError, load_config
from .errors import RunWriteError
from .safe_load import TRUST_FLAG

EXIT_USER_ERROR, EXIT_DIVERGED, EXIT_WRITE = 2, 3, 4


def _preflight(cfg) -> None:
    """Cheap checks that need a domain module, before any run directory is touched or any sweep trial starts:
    RL task names; supervised data set, tasks, ``data.options`` and ``model.options`` (no data is read)."""
    if cfg.domain == "rl":
        from .envs.metaworld import resolve_tasks

        try:
            resolve_tasks(cfg.env.name, cfg.env.tasks or None)
        except ValueError as e:
            raise ConfigError(f"env.tasks: {e}") from None
    else:
        from .envs.supervised import check_config

        check_config(cfg)


def _train(args) -> int:
    if args.dry_run:
        return _dry_run(args)
    from contextlib import ExitStack

    from . import distributed
    from .build import report_at_end, train

    started = time.time()
    with ExitStack() as held:  # the run directory's lock (rank 0's under torchrun), until the run's report is written
        if not distributed.init_from_env():  # one process
            cfg, run_dir = _train_setup(args, held)
        else:  # torchrun: rank 0 decides, locks and writes; every rank gets its config and run directory
            from .config import config_from_dict

            msg = None
            if distributed.is_main():
                try:
                    cfg, run_dir = _train_setup(args, held, data_parallel=True)
                    msg = ("ok", cfg.to_dict(), str(run_dir))
                except (ConfigError, RunWriteError) as e:
                    msg = ("error", e, "")
            kind, payload, where = distributed.broadcast_object(msg)
            if kind == "error":
                raise payload  # every rank stops with rank 0's error (and its exit code)
            cfg, run_dir = config_from_dict(payload), Path(where)
        finished = False
        try:
            result = train(cfg, run_dir, resume=bool(args.resume), progress=not args.no_progress,
                           trust_file=args.trust_file)
            finished = True
        finally:
            distributed.shutdown(wait=finished)  # after an error another rank may never reach the barrier
        if distributed.rank_from_env() == 0:
            if result:
                print(json.dumps({k: v for k, v in result.items() if "mean" in k or not k.startswith("eval/return")},
                                 indent=1))
            report = report_at_end(cfg, run_dir, started)  # every domain, every sweep trial (a `train` process each)
            if report is not None:
                print(f"report written to {report}")
    return 0


def _resolve_config(args, data_parallel: bool = False):
    """The run's config (a resume's: the run's own with the new overrides), checked; nothing is written."""
    from .run import check_resume_key, read_run_config, resume_key

    def check(cfg) -> None:
        if data_parallel and cfg.domain == "rl" and cfg.agent.algo == "sb3_stl":
            raise ConfigError("agent.algo=sb3_stl (stable-baselines3, one agent per task) runs in one process; "
                              "torchrun trains MT-SAC and the supervised adapters (see README, Distributed training "
                              "and sweeps)")

    if args.trust_file and not args.resume:
        raise ConfigError(f"{TRUST_FLAG} is for reading a run's checkpoints: use it with --resume RUN_DIR")
    if args.resume:
        run_dir = Path(args.resume)
        old, _ = read_run_config(run_dir)
        cfg = load_config(None, args.overrides, base=old.to_dict())
        check(cfg)
        # overrides may not change what the checkpoints hold: the check train makes against each checkpoint's
        # own record (run.RESUME_KEYS), made here before config.yaml is rewritten with them
        check_resume_key(resume_key(old), cfg, str(run_dir))
    else:
        if not args.config:
            raise ConfigError("give a config name or YAML path (e.g. `mtrl-arch train mt10_quick`), or --resume RUN_DIR")
        cfg = load_config(args.config, args.overrides)
        check(cfg)
    return cfg


def _train_setup(args, held, data_parallel: bool = False):
    """The run's config and directory (a new one, or the one to resume), checked and locked (the lock goes on
    ``held``, an ExitStack, before anything is written there or a checkpoint read); records a resume's overrides."""
    from .run import new_run_dir, write_run_info
    from .run_lock import lock_run_dir

    cfg = _resolve_config(args, data_parallel)
    if args.resume:
        run_dir = Path(args.resume)
        _preflight(cfg)
        held.enter_context(lock_run_dir(run_dir))
        if args.overrides:  # e.g. a larger train.total_env_steps: record what the run now is
            write_run_info(run_dir, cfg, {"resumed_with": list(args.overrides)})
    else:
        run_dir = new_run_dir(cfg)
        _refuse_an_existing_run(run_dir)
        _preflight(cfg)
        held.enter_context(lock_run_dir(run_dir, create=True))
        _refuse_an_existing_run(run_dir)  # one started since the check above (it would hold the lock, or have ended)
        print(f"run directory: {run_dir}", file=sys.stderr)
    return cfg, run_dir


def _refuse_an_existing_run(run_dir: Path) -> None:
    if (run_dir / "config.yaml").exists():
        raise ConfigError(f"{run_dir} already holds a run; use --resume {run_dir} or another run_dir")


def _dry_run(args) -> int:
    """``train --dry-run``: the resolved config and the parameter counts on stdout; no training, nothing written."""
    import yaml

    from .build import param_counts
    from .config import to_yaml

    cfg = _resolve_config(args)
    if not args.resume:  # as train would refuse it
        from .run import new_run_dir

        _refuse_an_existing_run(new_run_dir(cfg))
    _preflight(cfg)
    counts, counted, trees = param_counts(cfg)  # first: it writes matched widths (model.match_params) into cfg
    print("# the resolved config, as a run's config.yaml writes it less its run: record (dry run: nothing trained, "
          "no run directory made)")
    print(to_yaml(cfg), end="")
    print("---\n# parameter counts (weights), built on the CPU without an environment or data")
    # trees known before training (hps, stl, manual, random): each task's module per stage and the derive record
    shown = {k: {"per_task": t.to_dict()["per_task"], "derive": {k2: v for k2, v in t.derive.items() if k2 != "scores"}}
             for k, t in trees.items()}
    print(yaml.safe_dump({"parameters": counts, "counted": counted, **({"trees": shown} if shown else {})},
                         sort_keys=False, width=1 << 16), end="")
    for k, t in trees.items():  # the same trees, rendered, as comments
        print("\n".join(f"# {line}" for line in [f"[{k}]", *t.render().splitlines()]))
    return 0


def config_description(path: Path) -> str:
    """A config file's description: its first line, a ``# ...`` comment ("" when it has none)."""
    with open(path, encoding="utf-8") as f:
        first = f.readline().strip()
    return first.lstrip("#").strip() if first.startswith("#") else ""


def _configs(args) -> int:
    from .config import available_configs, resolve_config_path

    names = available_configs()
    width = max(map(len, names), default=0)
    for n in names:
        print(f"{n:<{width}}  {config_description(resolve_config_path(n))}")
    return 0


def _eval(args) -> int:
    from .build import evaluate_run, videos_rl
    from .run import read_run_config

    run_dir = Path(args.run_dir)
    cfg, _ = read_run_config(run_dir)
    if args.video is not None:
        out = Path(args.video) if args.video else run_dir / "videos"
        videos = videos_rl(cfg, run_dir, out, args.episodes, args.trust_file)
        for v in videos.values():
            print(f"{v['path'].name}: {v['frames']} frames, {v['path'].stat().st_size / 1024:.0f} kB ({v['caption']})")
        print(f"videos written to {out}")
        return 0
    res = evaluate_run(cfg, run_dir, args.episodes, args.trust_file)
    print(json.dumps(res, indent=1))
    return 0


def _arch(args) -> int:
    from .run import read_arch

    trees = read_arch(Path(args.run_dir))
    if args.json:
        print(json.dumps({k: t.to_dict() for k, t in trees.items()}, indent=1))
    else:
        print("\n\n".join(f"[{k}]\n{t.render()}" for k, t in trees.items()))
    return 0


def _bench(args) -> int:
    from . import bench
    from .build import benchmarks

    return bench.main(args.what, args.json, args.options, benchmarks())


def _report(args) -> int:
    from .build import report

    out = report([Path(p) for p in args.run_dirs], Path(args.out) if args.out else None,
                 Path(args.reference) if args.reference else None, args.baseline)
    print(f"report written to {out}")
    return 0


def _sweep(args) -> int:
    from . import sweep

    seeds = sweep.parse_seeds(args.seeds) if args.seeds else [load_config(args.config).seed]
    res = sweep.run_sweep(args.config, args.overrides, seeds, Path(args.out) if args.out else None, args.address,
                          args.cpus_per_trial, args.gpus_per_trial, args.runner, args.trial_timeout, check=_preflight)
    print(f"sweep summary: {res['out']}/summary.md ({res['n_ok']} of {res['n_trials']} trials finished)")
    if res["failed"]:
        print(f"error: {len(res['failed'])} of {res['n_trials']} trial(s) failed: "
              + "; ".join(f"{f['trial']} ({f['why']})" for f in res["failed"]), file=sys.stderr)
        return 1
    return 0


class _Parser(argparse.ArgumentParser):
    """argparse whose usage errors are one line, as every other user error (exit code 2); subcommands' too."""

    def error(self, message: str):
        self.exit(EXIT_USER_ERROR, f"error: {' '.join(message.split())} (see `{self.prog} --help`)\n")


TRUST_HELP = ("read the run's model.pt and checkpoints with full pickle, which can run code in them: only for files "
              "you made or trust (without it, a file holding more than tensors and plain data is refused)")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="mtrl-arch", description=__doc__.splitlines()[0])
    p.add_argument("--debug", action="store_true", help="show tracebacks for user errors")
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train from a config: mtrl-arch train CONFIG [key=value ...]")
    t.add_argument("config", nargs="?", help="a config name from configs/ (e.g. mt10_quick) or a YAML path")
    t.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.total_env_steps=20000 wandb.mode=disabled")
    t.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR (overrides may follow)")
    t.add_argument("--no-progress", action="store_true", help="no progress bar")
    t.add_argument("--dry-run", action="store_true",
                   help="print the resolved config and the networks' parameter counts; train nothing, write nothing")
    t.add_argument(TRUST_FLAG, action="store_true", help=TRUST_HELP)
    t.set_defaults(fn=_train)
    e = sub.add_parser("eval", help="evaluate a trained run")
    e.add_argument("run_dir")
    e.add_argument("--episodes", type=int, default=None,
                   help="episodes per task (default: the benchmark's protocol; with --video: 1)")
    e.add_argument("--video", nargs="?", const="", default=None, metavar="DIR",
                   help="RL: instead of scores, one video per task of the deterministic policy in DIR "
                        "(default RUN_DIR/videos), rendered off-screen (EGL, else OSMesa; MUJOCO_GL overrides)")
    e.add_argument(TRUST_FLAG, action="store_true", help=TRUST_HELP)
    e.set_defaults(fn=_eval)
    a = sub.add_parser("arch", help="print a run's derived architecture")
    a.add_argument("run_dir")
    a.add_argument("--json", action="store_true")
    a.set_defaults(fn=_arch)
    b = sub.add_parser("bench", help="benchmarks: trunk | sac-update | stl-vs-mt | env | gpu")
    b.add_argument("what")
    b.add_argument("options", nargs="*", help="key=value options of the benchmark")
    b.add_argument("--json", action="store_true")
    b.set_defaults(fn=_bench)
    w = sub.add_parser("sweep", help="a grid of overrides x seeds, one run per trial, on Ray or local processes")
    w.add_argument("config", help="a config name from configs/ or a YAML path")
    w.add_argument("overrides", nargs="*", help="key=v1,v2 (the grid: every combination) or key=v (every trial)")
    w.add_argument("--seeds", help="comma list of seeds, e.g. 0,1,2 (default: the config's seed)")
    w.add_argument("--address", help="an existing Ray cluster (e.g. ray://head:10001 or auto); default: a local Ray")
    w.add_argument("--cpus-per-trial", type=float, default=1.0)
    w.add_argument("--gpus-per-trial", type=float, default=0.0)
    w.add_argument("--runner", choices=("auto", "ray", "local"), default="auto",
                   help="auto: Ray when installed, else local subprocesses")
    w.add_argument("--trial-timeout", type=float, default=None, metavar="S", help="stop a trial after S seconds")
    w.add_argument("--out", help="sweep folder (default runs/sweep-NAME-TIMESTAMP)")
    w.set_defaults(fn=_sweep)
    r = sub.add_parser("report", help="figures and a summary table for one or more runs")
    r.add_argument("run_dirs", nargs="+")
    r.add_argument("--out", help="output folder (default: the first run's report/)")
    r.add_argument("--reference", metavar="FILE",
                   help="YAML/JSON of published points (metric, series: [{label, points: [[step, value], ...]}]) "
                        "drawn on the mean panel and tabled against the runs")
    r.add_argument("--baseline", metavar="SETTING",
                   help="the methods table's Delta_m baseline: a substring of one setting's label (default: the STL one)")
    r.set_defaults(fn=_report)
    c = sub.add_parser("configs", help="list the shipped configs with their descriptions")
    c.set_defaults(fn=_configs)
    return p


def _one_line_warning(message, category, filename, lineno, line=None) -> str:
    return f"warning: {message}\n"


def openmp_wait_policy(environ: dict, load: float, cpus: int) -> str | None:
    """``PASSIVE`` for torch's OpenMP threads when the CPU is already busy (1-minute load average >= usable
    CPUs) and the user set no ``OMP_WAIT_POLICY``; else None (libgomp's default: spin between parallel regions).

    With more runnable threads than cores, a spinning thread burns its process's share while each parallel
    region waits for the partner thread's next time slice: on the 2-core VM at load average 5-9 one SAC update
    took 20-40x as long as with passive waits or one thread (benchmarks/results/benchmarks.md, "The main job's
    minutes"). On an idle CPU spinning is what keeps back-to-back small ops fast, so it stays. The policy changes
    no arithmetic, only how threads wait."""
    if "OMP_WAIT_POLICY" in environ or load < cpus:
        return None
    return "PASSIVE"


def _set_openmp_wait_policy() -> None:
    """Apply :func:`openmp_wait_policy`; libgomp reads it once, when torch is first imported (nothing has yet)."""
    if "torch" in sys.modules or not hasattr(os, "getloadavg"):
        return
    policy = openmp_wait_policy(os.environ, os.getloadavg()[0], len(os.sched_getaffinity(0)))
    if policy is not None:
        os.environ["OMP_WAIT_POLICY"] = policy


def main(argv: list[str] | None = None) -> int:
    warnings.formatwarning = _one_line_warning  # a CLI user gets one line per warning, no source excerpt
    _set_openmp_wait_policy()
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # key=value pairs may also follow flags (`train mt10_quick --no-progress seed=1`)
    if extra:
        target = {"train": "overrides", "bench": "options", "sweep": "overrides"}.get(args.command)
        if target is None or not all("=" in x and not x.startswith("-") for x in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        setattr(args, target, [*getattr(args, target), *extra])
    # `train CONFIG k=v` and `train --resume DIR k=v`: argparse puts the first k=v in config
    if args.command == "train" and args.config and "=" in args.config:
        args.overrides = [args.config, *args.overrides]
        args.config = None
    try:
        return args.fn(args)
    except Exception as e:  # noqa: BLE001
        code = _exit_code(e)
        if code is None or args.debug:
            raise
        from .distributed import rank_from_env

        where = f"rank {rank_from_env()}: " if os.environ.get("WORLD_SIZE", "1") != "1" else ""  # torchrun
        print(f"error: {where}{' '.join(str(e).split())}", file=sys.stderr)  # one line, whatever the message
        return code


def _exit_code(e: BaseException) -> int | None:
    """The exit code of a known failure, None for a bug (which keeps its traceback)."""
    from .checkpoint import CheckpointError, CheckpointWriteError, NonFiniteError
    from .tree import TreeError

    if isinstance(e, NonFiniteError):
        return EXIT_DIVERGED
    if isinstance(e, (CheckpointWriteError, RunWriteError)):
        return EXIT_WRITE
    user_errors: tuple[type[BaseException], ...] = (ConfigError, FileNotFoundError, TreeError, CheckpointError)
    try:
        from .envs.vision import DataError

        user_errors += (DataError,)
    except ImportError:
        pass
    return EXIT_USER_ERROR if isinstance(e, user_errors) else None


if __name__ == "__main__":
    sys.exit(main())
