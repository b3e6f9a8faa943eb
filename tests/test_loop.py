"""mtrl_arch.loop.Run driven by a tiny learner: a real 2-task linear regression, periods of 4 steps.

Nothing of the loop is mocked: real checkpoints, real signals, a real logger; the learner is the
smallest thing that speaks the protocol (see mtrl_arch/loop.py's docstring).
"""
from __future__ import annotations

import signal
from pathlib import Path

import pytest
import torch

import mtrl_arch.checkpoint as C
from mtrl_arch.config import load_config
from mtrl_arch.logger import Logger, read_metrics
from mtrl_arch.loop import Cadence, Run, find_resume

PERIOD = 4  # steps per period


def lines(run_dir: Path) -> list[dict]:
    """metrics.jsonl less the wall time (``time/wall_s``), which no two runs share."""
    return [{k: v for k, v in r.items() if k != "time/wall_s"} for r in read_metrics(run_dir)]


class Regression:
    """Two tasks y_t = x . w_t, one shared linear layer with a head per task; SGD on fresh random batches."""
    unit, eval_everywhere = "step", True

    def __init__(self, periods: int = 6, search_periods: int = 0, cadence: Cadence | None = None,
                 on_eval=None, nan_at: int = -1):
        torch.manual_seed(0)
        self.model = torch.nn.Linear(3, 2)
        self.opt = torch.optim.SGD(self.model.parameters(), lr=0.1)
        self.w = torch.tensor([[1.0, -2.0, 0.5], [0.0, 1.0, 3.0]])
        self.periods_total, self.search_periods, self.every = periods, search_periods, cadence or Cadence()
        self.on_eval, self.nan_at = on_eval, nan_at
        self.step = self.closed = 0
        self.searching = search_periods > 0
        self.last_eval: dict = {}
        self.calls = {"eval": 0, "line": 0, "finish_search": 0}

    # progress and periods
    def begin(self, budget): pass
    def progress(self): return self.step
    def total(self): return self.periods_total * PERIOD
    def finished(self): return self.step >= self.total()
    def periods(self): return self.step // PERIOD
    def period_pending(self): return self.closed < self.step // PERIOD
    def cadence(self): return self.every
    def search_over(self): return self.step >= self.search_periods * PERIOD

    def train_step(self, stop):
        x = torch.randn(8, 3)
        loss = ((self.model(x) - x @ self.w.T) ** 2).mean(0)
        if self.step == self.nan_at:
            loss = loss * float("nan")
        self.opt.zero_grad()
        loss.sum().backward()
        self.opt.step()
        self.step += 1
        return [{"loss": loss.detach()}]  # the loop's window averages it over the log window

    def end_period(self, evaluation, means):
        self.closed = self.step // PERIOD
        if means is None:
            return {}
        self.calls["line"] += 1
        return {f"train/loss/{t}": v for t, v in enumerate(means["loss"].tolist())}

    def finish_search(self):
        self.calls["finish_search"] += 1
        self.searching = False

    def evaluate(self, stop, final):
        self.calls["eval"] += 1
        x = torch.randn(64, 3)  # inside rng_preserved: training's stream untouched
        for i in range(4):
            if stop is not None:
                stop()
            if self.on_eval is not None:
                self.on_eval(i)
        self.last_eval = {"eval/loss": float(((self.model(x) - x @ self.w.T) ** 2).mean().detach())}
        return self.last_eval

    def finite(self, window):
        if not torch.isfinite(window.values("loss")[1]).all():
            raise C.NonFiniteError(f"non-finite loss at step {self.step}")
        C.assert_finite(self.model.named_parameters(), f"at step {self.step}")

    def state_dict(self):
        return {"step": self.step, "closed": self.closed, "searching": self.searching, "model": self.model.state_dict(),
                "opt": self.opt.state_dict(), "last_eval": dict(self.last_eval),
                "rng": C.rng_state()}

    def load_state_dict(self, d):
        self.step, self.closed, self.searching = d["step"], d["closed"], d["searching"]
        self.model.load_state_dict(d["model"])
        self.opt.load_state_dict(d["opt"])
        self.last_eval = dict(d["last_eval"])
        C.set_rng_state(d["rng"])


@pytest.fixture()
def cfg():
    return load_config("multi_fashion_mnist_hps", ["train.keep_checkpoints=100"])


def make(cfg, d: Path, **kw) -> tuple[Run, Regression]:
    learner = Regression(**kw)
    return Run(learner, cfg, d, Logger(d, None), progress=False), learner


def test_cadence_counts_lines_evaluations_checkpoints_and_the_phase_switch(cfg, tmp_path):
    run, L = make(cfg, tmp_path, periods=6, search_periods=2, cadence=Cadence(log=2, eval=3, checkpoint=2))
    run.learn()
    # lines at periods 2, 4, 6 (6 is also the last); evaluations at 3 (6 is last: no eval_at_end); switch at 2
    assert L.calls == {"eval": 1, "line": 3, "finish_search": 1}
    assert [r["step"] for r in read_metrics(tmp_path)] == [8, 12, 16, 24]  # line, eval line, line, line
    assert "eval/loss" in read_metrics(tmp_path)[1]
    assert C.list_steps(tmp_path / "checkpoints") == [8, 16, 24]  # every 2 periods (2 = the switch), the end
    assert run.final_evaluate() == L.last_eval and L.calls["eval"] == 2
    assert C.list_steps(tmp_path / "checkpoints") == [8, 16, 24]  # the final evaluation's checkpoint replaces 24


def test_a_stop_saves_and_a_resume_ends_bit_for_bit_as_an_uninterrupted_run(cfg, tmp_path):
    straight, S = make(cfg, tmp_path / "a", cadence=Cadence(log=1, eval=2, checkpoint=3))
    straight.learn()
    n = []

    def stop_at_step_10(model):  # a callback receives the model; the flag is what SIGTERM sets
        n.append(1)
        if len(n) == 10:
            signal.raise_signal(signal.SIGTERM)
        return True

    part, P = make(cfg, tmp_path / "b", cadence=Cadence(log=1, eval=2, checkpoint=3))
    part.learn(callback=stop_at_step_10)
    assert part.stopped_by == "SIGTERM" and C.list_steps(tmp_path / "b" / "checkpoints") == [10]
    resumed, R = make(cfg, tmp_path / "b", cadence=Cadence(log=1, eval=2, checkpoint=3))
    resumed.restore(find_resume(tmp_path / "b"))
    resumed.learn()
    for k, v in S.model.state_dict().items():
        assert torch.equal(v, R.model.state_dict()[k])
    assert lines(tmp_path / "a") == lines(tmp_path / "b")
    # the wall time is on every line and goes on across the resume: the resumed session adds to the first's
    walls = [r["time/wall_s"] for r in read_metrics(tmp_path / "b")]
    assert len(walls) == len(read_metrics(tmp_path / "b")) and walls == sorted(walls) and walls[0] > 0
    assert resumed.wall_s() >= part.wall_s() > 0
    assert C.read_checkpoint(C.checkpoint_path(tmp_path / "b" / "checkpoints", 24))[1]["wall"] >= part.wall_s()


def test_a_non_finite_step_raises_and_keeps_the_last_good_checkpoint(cfg, tmp_path):
    run, L = make(cfg, tmp_path, periods=6, cadence=Cadence(log=1, checkpoint=1), nan_at=13)
    with pytest.raises(C.NonFiniteError, match=r"non-finite loss at step 16; last good checkpoint kept: .*ckpt-12\.pt"):
        run.learn()
    assert C.list_steps(tmp_path / "checkpoints") == [4, 8, 12]
    _, state = C.read_checkpoint(C.checkpoint_path(tmp_path / "checkpoints", 12))
    assert all(torch.isfinite(v).all() for v in state["model"].values())


def test_a_stop_during_an_evaluation_abandons_it_and_the_resume_evaluates_again(cfg, tmp_path):
    straight, S = make(cfg, tmp_path / "a", periods=4, cadence=Cadence(log=1, eval=2))
    straight.learn()
    seen: list[int] = []

    def sigterm_in_first_eval(i):
        seen.append(i)
        if len(seen) == 1:
            signal.raise_signal(signal.SIGTERM)

    run, L = make(cfg, tmp_path / "b", periods=4, cadence=Cadence(log=1, eval=2), on_eval=sigterm_in_first_eval)
    run.learn()
    assert seen == [0] and run.stopped_by == "SIGTERM"  # no batch after the one the signal came in
    assert [r["step"] for r in read_metrics(tmp_path / "b")] == [4]  # period 2 did not end
    assert C.list_steps(tmp_path / "b" / "checkpoints") == [8]  # the state after the period's last step
    resumed, R = make(cfg, tmp_path / "b", periods=4, cadence=Cadence(log=1, eval=2))
    resumed.restore(find_resume(tmp_path / "b"))
    resumed.learn()
    assert lines(tmp_path / "a") == lines(tmp_path / "b")
    assert R.last_eval == S.last_eval
