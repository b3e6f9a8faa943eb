"""One training loop for every domain: the learner steps, the loop owns when things happen.

A :class:`Run` drives a *learner* (duck-typed: ``RLRun``, MT-SAC, in :mod:`mtrl_arch.agents.rl_loop`;
``SupervisedRun`` in :mod:`mtrl_arch.agents.supervised`; ``SB3Run`` in :mod:`mtrl_arch.agents.sb3_baseline`;
the regression in ``tests/test_loop.py``) and owns what they share: cadence, SIGINT/SIGTERM, checkpoints,
resume, the non-finite check, the log window, the data-parallel stop agreement, the progress bar, callbacks
the final evaluation and the training's wall time (``time/wall_s`` on every line: seconds inside ``learn`` and
the final evaluation, summed over resumed sessions). It never names a domain or a method.

``progress()`` counts the learner's ``unit`` (env steps, optimisation steps): the log's x axis, a checkpoint's
step. Cadence counts *periods*: runs of ``train_step()`` that end where the learner says (RL: a vector step;
supervised: an epoch, or the search's end; SB3: a chunk). The budget's last period always logs and checkpoints
(and evaluates where ``eval_at_end``); the search's end always checkpoints.

A period ends: evaluation (when due) -> the line (``end_period`` turns the window's means into it; the
evaluation is merged in) -> ``finish_search()`` when ``search_over()`` -> checkpoint (when due) -> the stop
agreement. A stop during the evaluation abandons it and leaves the period open: the checkpoint holds the state
after the period's last step, and a resumed run ends the period again, evaluation included. Evaluations run
inside ``rng_preserved``, so they never move the training's random streams.

The learner provides::

    unit; searching; last_eval; model          # model: what callbacks receive (SB3's)
    eval_everywhere                            # every data-parallel rank evaluates (an evaluation can then be abandoned by agreement)
    begin(budget) / progress() / total() / finished()
    train_step(stop) -> [record]               # one step; records (dicts of numbers/tensors) go to the window;
                                               # stop() raises StopRequested (a long step may end early there)
    period_pending() / periods() / cadence() -> Cadence
    end_period(evaluation, means) -> dict      # close the period; means: the window's (None between lines)
    search_over() / finish_search()
    evaluate(stop, final) -> dict              # stop() between batches/steps
    finite(window)                             # NonFiniteError naming the first bad statistic or parameter
    state_dict() / load_state_dict(d)          # state_dict: on every rank
    postfix(line) -> dict                      # optional: what the progress bar shows of a line
"""
from __future__ import annotations

import signal
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from . import distributed
from .checkpoint import NonFiniteError, StopRequested, list_steps, rng_preserved, save_checkpoint
from .config import Config, ConfigError
from .logger import progress_bar
from .safe_load import UntrustedFileError
from .run import check_resume_key, find_resume_checkpoint, resume_key


@dataclass
class Cadence:
    """Periods between log lines, evaluations and checkpoints (0: never, except where the loop always does)."""
    log: int = 1
    eval: int = 0
    checkpoint: int = 0
    eval_at_end: bool = False  # the budget's last period evaluates (RL evaluates after it: Run.final_evaluate)


def find_resume(run_dir: Path, shared: Callable[[dict], dict] = lambda d: d,
                trust_file: bool = False) -> tuple[int, dict] | None:
    """The checkpoint ``train --resume`` continues from (:func:`~mtrl_arch.run.find_resume_checkpoint`): rank 0
    reads it, every other rank of a data-parallel run receives ``shared(state)`` (what is not rank 0's alone)."""
    main = distributed.is_main()
    found = find_resume_checkpoint(run_dir, trust_file) if main else None
    if distributed.active():
        got = distributed.broadcast_object(None if found is None else (found[0], shared(found[1])))
        found = found if main else got
    return found


class Window:
    """The training statistics since the last log line: every observation ``train_step()`` returned (a dict of
    numbers or tensors, e.g. one update's per-task losses or one episode's return), with the progress it was made
    at. Kept whole (not summed) so that ``finite(window)`` can name the first non-finite one; part of the loop's
    checkpoint, so a resumed run logs the uninterrupted run's windows."""

    def __init__(self):
        self.records: list[tuple[int, dict]] = []

    def keys(self) -> list[str]:
        return list(dict.fromkeys(k for _, r in self.records for k in r))

    def values(self, key: str) -> tuple[list[int], torch.Tensor]:
        """The progress of each observation of ``key`` and the observations stacked ``[n, ...]``."""
        rows = [(at, torch.as_tensor(r[key])) for at, r in self.records if key in r]
        dev = rows[-1][1].device if rows else None  # a resumed window holds CPU tensors
        return [at for at, _ in rows], torch.stack([v.to(dev) for _, v in rows]) if rows else torch.zeros(0)

    def means(self) -> dict[str, torch.Tensor]:
        """The mean of every key over its observations; data-parallel: over every rank's (a collective: every rank
        calls it at the same point, with the same keys)."""
        keys = self.keys()
        sums = [self.values(k)[1].double().sum(0).cpu() for k in keys]
        counts = torch.tensor([float(sum(k in r for _, r in self.records)) for k in keys], dtype=torch.float64)
        if distributed.active():  # means of sums over means of counts: the pooled mean
            *sums, counts = distributed.all_reduce_mean([*sums, counts])
        return {k: s / n for k, s, n in zip(keys, sums, counts.tolist())}

    def state_dict(self) -> list:
        return [(at, {k: v.detach().cpu() if torch.is_tensor(v) else v for k, v in r.items()}) for at, r in self.records]

    def load_state_dict(self, records: list | None) -> None:
        self.records = list(records or [])


class Run:
    def __init__(self, learner: Any, cfg: Config, run_dir: Path | None = None, logger: Any = None,
                 progress: bool = False):
        self.learner, self.cfg, self.run_dir, self.logger, self.progress = learner, cfg, run_dir, logger, progress
        self.flag: dict = {}            # set by SIGINT/SIGTERM (signals)
        self.stopped_by: str | None = None
        self.final_eval_done = False
        self.window = Window()
        self._saved_at = -1
        self._signals_on = False
        self.wall = 0.0                  # seconds of closed sessions of learn / final_evaluate
        self._since: float | None = None  # the open session's start

    def wall_s(self) -> float:
        """Seconds spent training and evaluating, summed over this run's sessions (a resumed run's included)."""
        return self.wall + (time.perf_counter() - self._since if self._since is not None else 0.0)

    @contextmanager
    def _clock(self):
        outer = self._since is None  # nests (e.g. a callback's final_evaluate during learn): no second counted twice
        if outer:
            self._since = time.perf_counter()
        try:
            yield
        finally:
            if outer:
                self.wall, self._since = self.wall_s(), None

    # ---- stopping ------------------------------------------------------------------------------------------
    @contextmanager
    def signals(self):
        """SIGINT/SIGTERM set ``flag["stop"]`` while inside (nests; outside the main thread, which alone gets
        signals, nothing): the loop saves, flushes and returns. A second signal while stopping raises
        KeyboardInterrupt (checkpoints are atomic, so the previous ones stay intact)."""
        if self._signals_on or threading.current_thread() is not threading.main_thread():
            yield
            return

        def handler(signum, frame):
            if self.flag.get("stop"):
                raise KeyboardInterrupt
            self.flag["stop"] = signal.Signals(signum).name

        old = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
        self._signals_on = True
        try:
            yield
        finally:
            self._signals_on = False
            for s, h in old.items():
                signal.signal(s, h)

    def _stop_now(self, local: bool = False) -> bool:
        """Whether to stop here; data-parallel: the same answer on every rank (a signal reaches them at
        different steps), so every rank must call it at the same point."""
        mine = local or bool(self.flag.get("stop"))
        if distributed.active() and distributed.any_true(mine) and not mine:
            self.stopped_by = self.stopped_by or "a stop on another rank"
            return True
        return mine

    def _stopper(self, agreed: bool) -> Callable[[], None]:
        def stop() -> None:
            if self._stop_now() if agreed else self.flag.get("stop"):
                raise StopRequested
        return stop

    def _report_stop(self) -> None:
        if distributed.is_main():
            where = f"; checkpoint saved, continue with `mtrl-arch train --resume {self.run_dir}`" if self.run_dir else ""
            print(f"stopped by {self.stopped_by} at {self.learner.unit.replace('-', ' ')} {self.learner.progress()}{where}", file=sys.stderr)

    # ---- checkpoints ---------------------------------------------------------------------------------------
    def kept(self) -> str:
        """Where the last good checkpoint is, for a NonFiniteError's message."""
        if self.run_dir is None:
            return "no checkpoint directory"
        steps = list_steps(self.run_dir / "checkpoints")
        return f"last good checkpoint kept: {self.run_dir / 'checkpoints' / f'ckpt-{steps[-1]}.pt'}" if steps \
            else "no checkpoint was written yet"

    def state_dict(self) -> dict:
        pos = self.logger.position() if self.logger is not None and hasattr(self.logger, "position") else None
        return {**self.learner.state_dict(), "final_eval_done": self.final_eval_done, "logger_pos": pos,
                "window": self.window.state_dict(), "wall": self.wall_s(), "meta": resume_key(self.cfg)}

    def save(self) -> None:
        """Checkpoint now; refused with NonFiniteError when a loss or parameter is not finite."""
        L = self.learner
        L.finite(self.window)
        state = self.state_dict()  # on every rank: a learner may agree on its state (e.g. BatchNorm statistics)
        if self.run_dir is not None:
            save_checkpoint(self.run_dir / "checkpoints", L.progress(), state, self.cfg.train.keep_checkpoints,
                            meta={**resume_key(self.cfg), L.unit.replace("-", "_"): L.progress()})
        self._saved_at = L.progress()

    def restore(self, found: tuple[int, dict]) -> None:
        """Continue from a checkpoint ``(step, state)`` (:func:`find_resume`); ConfigError when it does not fit."""
        step, d = found
        at = f"{self.learner.unit.replace('-', ' ')} {step}"
        where = f"the checkpoint at {at}"
        check_resume_key(d.get("meta"), self.cfg, where)  # every rank checks: all of them stop
        try:
            self.learner.load_state_dict(d)
        except UntrustedFileError as e:  # a learner's own reading of what the checkpoint holds (e.g. SB3's zips)
            path = self.run_dir / "checkpoints" / f"ckpt-{step}.pt" if self.run_dir is not None else where
            raise UntrustedFileError(f"{path}: {e}") from None
        except ConfigError:
            raise
        except (KeyError, RuntimeError, ValueError) as e:  # shapes/keys of another config or version
            raise ConfigError(f"{where} does not fit this config or "
                              f"mtrl-arch version ({type(e).__name__}: {str(e).splitlines()[0][:160]})") from None
        self.final_eval_done = d.get("final_eval_done", False)
        self.window.load_state_dict(d.get("window"))
        self.wall = float(d.get("wall", 0.0))
        if self.logger is not None and d.get("logger_pos") is not None and hasattr(self.logger, "rewind"):
            self.logger.rewind(d["logger_pos"])  # lines logged after the checkpoint are logged again
        self._saved_at = self.learner.progress()
        if self.run_dir is not None:
            print(f"resumed from {self.run_dir}/checkpoints/ckpt-{step}.pt at {at}", file=sys.stderr)

    # ---- the loop ------------------------------------------------------------------------------------------
    def learn(self, budget: int | None = None, callback: Any = None) -> None:
        """Train until the budget (in the learner's unit; None: the config's) or a stop; checkpoint at the end."""
        try:
            self._learn(budget, callback)
        except NonFiniteError as e:  # the learner names the bad value; the loop knows what it kept
            if "checkpoint" in str(e):
                raise
            try:  # e.g. a non-finite action: the first non-finite statistic, when there is one, is its cause
                self.learner.finite(self.window)
            except NonFiniteError as cause:
                e = cause
            raise NonFiniteError(f"{e}; {self.kept()}") from None

    def _learn(self, budget: int | None, callback: Any) -> None:
        L = self.learner
        L.begin(budget)
        if not L.finished():  # e.g. a finished run resumed with a larger budget
            self.final_eval_done = False
        cb = _Callbacks(callback, L.model)
        bar = progress_bar(self.progress, L.total(), L.progress(), L.unit)
        shown = L.progress()
        stop = self._stopper(agreed=False)  # for a learner whose step is long (SB3's learn): it may end early there
        with self.signals(), self._clock(), distributed.sync_other_optimizers():
            while True:
                if L.period_pending():
                    if not self._end_period(bar):
                        break  # a stop abandoned the evaluation: the period stays open
                elif L.finished():
                    break
                else:
                    self.window.records.extend((L.progress(), r) for r in L.train_step(stop) or ())
                    if bar is not None:
                        bar.update(L.progress() - shown)
                        shown = L.progress()
                    if L.period_pending() and not self._end_period(bar):
                        break
                if self._stop_now(not cb.on_step()):
                    break
        if bar is not None:
            bar.close()
        cb.on_training_end()
        self.stopped_by = self.flag.get("stop") or self.stopped_by
        if self._saved_at != L.progress():  # at the end of training, and on a stop
            self.save()
        if self.logger is not None:
            self.logger.flush()
        if self.stopped_by:
            self._report_stop()

    def _end_period(self, bar) -> bool:
        """Evaluate, log, switch phase, checkpoint (see the module docstring); False when a stop abandoned it."""
        L, every = self.learner, self.learner.cadence()
        p, last = L.periods(), L.finished()
        due = lambda n: bool(n) and p % n == 0  # noqa: E731
        regular = due(every.log)
        if regular or last:
            L.finite(self.window)  # names the exact step and loss before the window holding it closes, or is evaluated
        ev: dict = {}
        if due(every.eval) and not last or last and every.eval_at_end:
            try:
                ev = self._evaluate(interruptible=distributed.world_size() == 1 or L.eval_everywhere)
            except StopRequested:
                self.stopped_by = self.flag.get("stop") or self.stopped_by
                return False
        rec = {**L.end_period(ev, self.window.means() if regular or last else None), **ev}
        if rec:
            rec["time/wall_s"] = self.wall_s()
        if regular:  # a budget's last period between two lines keeps the window open: a run resumed with a larger
            self.window.records.clear()  # budget logs the windows of an uninterrupted run
        if rec and self.logger is not None:
            self.logger.log(rec, L.progress())
        if bar is not None and hasattr(L, "postfix") and rec:
            bar.set_postfix(L.postfix(rec))
        switched = L.searching and L.search_over()
        if switched:
            L.finish_search()
        if switched or last or due(every.checkpoint):
            self.save()
        return True

    def _evaluate(self, interruptible: bool, final: bool = False) -> dict:
        # a stop is agreed between the ranks when every rank evaluates; otherwise rank 0 alone checks its flag
        stop = self._stopper(agreed=self.learner.eval_everywhere) if interruptible else None
        with rng_preserved():  # the training's random streams go on as if no evaluation ran
            return self.learner.evaluate(stop, final)

    def final_evaluate(self) -> dict | None:
        """The final evaluation, logged, then a checkpoint recording it; None when stopped.

        A stop request during it ends it at once; the checkpoint from the end of :meth:`learn` stands and a
        resumed run evaluates again.
        """
        if self.stopped_by:
            return None
        if self.final_eval_done:
            return self.learner.last_eval
        with self.signals(), self._clock():
            try:
                out = self._evaluate(interruptible=True, final=True)
            except StopRequested:
                self.stopped_by = self.flag.get("stop") or "a stop on another rank"
                self._report_stop()
                return None
            if self.logger is not None:
                self.logger.log({**out, "time/wall_s": self.wall_s()}, self.learner.progress())
            self.final_eval_done = True
            self.save()
        return out


class _Callbacks:
    """None, a function ``f(model) -> bool`` (False stops), a stable-baselines3 BaseCallback, or a list of them."""

    def __init__(self, callback: Any, model: Any):
        self.cbs = [] if callback is None else list(callback) if isinstance(callback, (list, tuple)) else [callback]
        self.sb3, self.model = [c for c in self.cbs if hasattr(c, "init_callback")], model
        for c in self.sb3:
            c.init_callback(model)  # SB3's: the callback reads model.num_timesteps, model.logger
            c.on_training_start({}, {})

    def on_step(self) -> bool:  # every callback sees every step
        return all([c.on_step() if c in self.sb3 else c(self.model) is not False for c in self.cbs])

    def on_training_end(self) -> None:
        for c in self.sb3:
            c.on_training_end()


__all__ = ["Run", "Cadence", "Window", "find_resume", "NonFiniteError", "StopRequested"]
