"""The supervised path end to end through the CLI: every supervised config on a tiny budget,
resume (exact, also mid-search after a signal), evaluation, Delta_m, and one-line user errors.

Multi-* and GLUE use the real data under MTRL_ARCH_DATA (default ../shared/data next to
the repository), else the real-data subset in tests/fixtures/data; NYUv2, CityScapes and
CelebA use tests/fixtures. Networks are shrunk (width, layers) so the whole file runs in a
couple of minutes on two CPU cores.
"""
from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from data_roots import data_overrides
import mtrl_arch.checkpoint as C
from mtrl_arch.cli import main
from mtrl_arch.config import available_configs, load_config
from mtrl_arch.logger import read_metrics

FIXTURES = Path(__file__).resolve().parent / "fixtures"

SUPERVISED_CONFIGS = sorted(
    [f"multi_fashion_mnist_{m}" for m in ("hps", "stl", "conal", "conal_pro", "ltb", "adashare", "recon")]
    + ["multi_mnist_hps", "multi_mnist_conal", "multi_fashion_hps", "multi_fashion_conal", "celeba9_conal_pro",
       "nyuv2_hps", "nyuv2_conal", "cityscapes_hps", "cityscapes_conal", "glue_hps", "glue_stl", "glue_conal"])


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: one thread is 10x faster on a busy 2-core CPU


def sigint_at_loss_call(n: int):
    """A ``make_adapter`` whose adapter raises SIGINT inside the n-th call of its losses (a stop mid-step)."""
    from mtrl_arch.envs.supervised import make_adapter

    calls = {"n": 0}

    def make(c):
        adapter = make_adapter(c)
        inner = adapter.losses

        def losses(out, batch):
            calls["n"] += 1
            if calls["n"] == n:
                signal.raise_signal(signal.SIGINT)
            return inner(out, batch)

        adapter.losses = losses
        return adapter

    return make


@pytest.fixture(scope="session")
def cache(tmp_path_factory) -> Path:
    """Generated Multi-* composites, shared by every test of the session."""
    return tmp_path_factory.mktemp("multi_cache")


def _tiny(config: str, cache: Path) -> list[str]:
    """Overrides that make a config a seconds-long smoke run on its test data."""
    common = ["train.epochs=1", "train.limit_batches=2", "eval.limit_batches=1", "arch.search_steps=2",
              "wandb.mode=disabled", "data.num_workers=0"]
    name = load_config(config).data.name
    if name.startswith("multi_"):
        return common + [*data_overrides("mnist", "fashion_mnist"), f"data.options.cache_dir={cache}",
                         "model.options.width=4", "train.batch_size=8", "eval.batch_size=64"]
    if name == "glue":
        return common + [*data_overrides("glue"), "data.options.train_subset=48", "data.options.eval_subset=16",
                         "data.options.vocab_size=300", "data.options.max_len=24", "model.options.d_model=16",
                         "model.options.d_ff=32", "model.options.n_layers=1", "model.options.n_heads=2",
                         "train.batch_size=4", "eval.batch_size=8"]
    return common + [f"data.root={FIXTURES / name}", "model.options.width=4", "model.options.out_features=8",
                     "train.batch_size=2", "eval.batch_size=2"]


def _train(config: str, run_dir: Path, overrides: list[str]) -> int:
    return main(["train", config, *overrides, f"run_dir={run_dir}", "--no-progress"])


def _last_eval(run_dir: Path) -> dict:
    return [r for r in read_metrics(run_dir) if any(k.startswith("eval/") for k in r)][-1]


def test_every_supervised_config_is_listed():
    found = sorted(c for c in available_configs() if load_config(c).domain == "supervised")
    assert found == SUPERVISED_CONFIGS


@pytest.mark.parametrize("config", SUPERVISED_CONFIGS)
def test_smoke_every_supervised_config(config, tmp_path, cache):
    cfg = load_config(config)
    run = tmp_path / "run"
    assert _train(config, run, _tiny(config, cache)) == 0
    for f in ("config.yaml", "metrics.jsonl", "arch.json", "arch.txt", "model.pt"):
        assert (run / f).is_file(), f
    assert list((run / "checkpoints").glob("ckpt-*.pt"))
    arch = json.loads((run / "arch.json").read_text())["networks"]["trunk"]
    tasks = arch["tasks"]
    assert arch["method"] == cfg.arch.method and len(tasks) >= 2
    last = _last_eval(run)
    for t in tasks:  # every task has a finite test metric, and a finite parameter count was logged
        keys = [k for k in last if k.startswith("eval/") and k.endswith(f"/{t}")]
        assert keys, f"no eval/<metric>/{t} in {sorted(last)}"
        assert all(isinstance(last[k], float) and math.isfinite(last[k]) for k in keys)
    recs = read_metrics(run)
    params = {k: v for r in recs for k, v in r.items() if k.startswith("params/trunk/")}
    assert params["params/trunk/total"] == sum(params[f"params/trunk/{k}"] for k in ("shared", "subgroup", "specific", "heads"))
    losses = [v for r in recs for k, v in r.items() if k.startswith("train/loss/")]
    assert losses and all(math.isfinite(v) for v in losses)
    steps = [r["step"] for r in recs]
    assert steps == sorted(steps)
    if cfg.arch.method in ("conal", "conal_pro", "ltb", "adashare", "recon"):  # searched 2 steps, then retrained
        assert max(r["step"] for r in recs if r.get("phase") == "search") == 2 < last["step"]


def _multi(cache: Path, *extra: str) -> list[str]:
    return [*data_overrides("mnist", "fashion_mnist"), f"data.options.cache_dir={cache}", "model.backbone=lenet",
            "train.batch_size=32", "train.limit_batches=3", "eval.limit_batches=2", "eval.batch_size=256",
            "wandb.mode=disabled", *extra]


def test_resume_continues_exactly(tmp_path, cache):
    """1 epoch, then --resume with train.epochs=2, equals 2 epochs straight; eval reproduces the final eval."""
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert _train("multi_fashion_mnist_hps", straight, _multi(cache, "train.epochs=2", "train.lr_milestones=[1]")) == 0
    assert _train("multi_fashion_mnist_hps", resumed, _multi(cache, "train.epochs=1", "train.lr_milestones=[1]")) == 0
    assert main(["train", "--resume", str(resumed), "train.epochs=2", "--no-progress"]) == 0
    a, b = _last_eval(straight), _last_eval(resumed)
    keys = [k for k in a if k.startswith(("eval/", "val/"))]
    assert keys and {k: a[k] for k in keys} == {k: b[k] for k in keys}
    steps = [r["step"] for r in read_metrics(resumed) if "phase" in r]
    assert steps == [3, 6]  # one line per epoch, none repeated
    assert [r["lr"] for r in read_metrics(resumed) if "lr" in r] == [0.1, 0.010000000000000002]
    # the eval command re-evaluates the saved model to the same numbers
    from mtrl_arch.build import evaluate_run
    from mtrl_arch.run import read_run_config

    cfg, _ = read_run_config(resumed)
    res = evaluate_run(cfg, resumed, None)
    assert {k: res[k] for k in keys} == {k: b[k] for k in keys}


def test_resume_mid_search_after_signal(tmp_path, cache):
    """SIGINT in the middle of a CoNAL search epoch saves a checkpoint; resuming gives the uninterrupted result."""
    from mtrl_arch.build import train_supervised
    from mtrl_arch.envs.supervised import make_adapter

    over = _multi(cache, "arch.search_steps=5", "train.epochs=1", "arch.conflict_noticed=true")
    cfg = load_config("multi_fashion_mnist_conal", over)
    straight = train_supervised(cfg, tmp_path / "a", progress=False, make_adapter=make_adapter)

    # inside the second search step's weight step (2 loss calls per step: weights, alpha)
    part = train_supervised(cfg, tmp_path / "b", progress=False, make_adapter=sigint_at_loss_call(4))
    assert not any(k.startswith("eval/") for k in part)  # stopped before the retrain
    assert not (tmp_path / "b" / "arch.json").exists()
    resumed = train_supervised(cfg, tmp_path / "b", resume=True, progress=False, make_adapter=make_adapter)
    keys = [k for k in straight if k.startswith(("eval/", "val/", "params/"))]
    assert {k: straight[k] for k in keys} == {k: resumed[k] for k in keys}
    assert (tmp_path / "a" / "arch.json").read_text() == (tmp_path / "b" / "arch.json").read_text()


def test_delta_m_against_a_baseline_run(tmp_path, cache):
    stl = tmp_path / "stl"
    assert _train("multi_fashion_mnist_stl", stl, _multi(cache, "train.epochs=1")) == 0
    # a run measured against itself is at 0; against given numbers, LibMTL's formula
    assert _train("multi_fashion_mnist_stl", tmp_path / "self", _multi(cache, "train.epochs=1", f"eval.baseline_run={stl}")) == 0
    me = _last_eval(tmp_path / "self")
    assert me["eval/delta_m"] == pytest.approx(0.0, abs=1e-9) and me["val/delta_m"] == pytest.approx(0.0, abs=1e-9)
    base = {"top_left": {"accuracy": 0.5}, "bottom_right": {"accuracy": 0.25}}
    assert _train("multi_fashion_mnist_hps", tmp_path / "hps",
                  _multi(cache, "train.epochs=1", f"eval.baseline={json.dumps(base)}")) == 0
    r = _last_eval(tmp_path / "hps")
    want = 100 / 2 * ((r["eval/accuracy/top_left"] - 0.5) / 0.5 + (r["eval/accuracy/bottom_right"] - 0.25) / 0.25)
    assert r["eval/delta_m"] == pytest.approx(want)
    assert "val/delta_m" not in r  # the given numbers are test results only


def test_missing_data_root_exits_2_with_one_line(tmp_path, capsys):
    run = tmp_path / "run"
    assert _train("multi_fashion_mnist_hps", run, [f"data.root={tmp_path / 'nowhere'}", "wandb.mode=disabled"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: MNIST not found or damaged under") and "mnist/train-images-idx3-ubyte.gz" in err[-1]
    assert not any("Traceback" in line for line in err)
    assert not (run / "config.yaml").exists()  # nothing written for a run that cannot start
    assert _train("nyuv2_hps", tmp_path / "n", [f"data.root={tmp_path}", "wandb.mode=disabled"]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith("error: NYUv2 not found under")


@pytest.mark.parametrize("override, needle", [
    ("data.options.cache_dri=x", "unknown config key 'data.options.cache_dri'; did you mean data.options.cache_dir?"),
    ("model.backbone=transformer", "model.backbone 'transformer' does not fit data.name=multi_fashion_mnist; choose from lenet, resnet18"),
    ("data.name=multi_mnst", "did you mean 'multi_mnist'?"),
    ("data.tasks=[top_left,left]", "data.tasks has ['left']"),
    ("model.options.width=0", "model.options.width must be positive"),
    ("train.lr_milestones=[a]", "train.lr_milestones must be a list of positive epoch numbers"),
    ("eval.limit_batchs=1", "did you mean eval.limit_batches?"),
])
def test_bad_config_is_one_line_exit_2(tmp_path, capsys, override, needle):
    assert _train("multi_fashion_mnist_hps", tmp_path / "r", [override, "wandb.mode=disabled"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: ") and needle in err


class _CountingMetrics:
    """An adapter's metrics accumulator that counts the batches it is given (``on_update`` sees the count)."""

    def __init__(self, inner, on_update=None):
        self.inner, self.on_update, self.n = inner, on_update, 0

    def update(self, out, batch) -> None:
        self.n += 1
        if self.on_update is not None:
            self.on_update(self.n)
        self.inner.update(out, batch)

    def compute(self):
        return self.inner.compute()


def _counting(make_adapter, seen: list, on_update=None):
    """``make_adapter`` whose evaluations append their accumulators (one per split evaluated) to ``seen``."""
    def make(c):
        adapter = make_adapter(c)
        inner = adapter.metrics

        def metrics():
            seen.append(_CountingMetrics(inner(), on_update))
            return seen[-1]

        adapter.metrics = metrics
        return adapter
    return make


def test_diverging_run_exits_3_with_one_line(tmp_path, cache):
    """A non-finite supervised loss is the CLI's divergence (exit 3, one line), as in RL: no traceback."""
    run = tmp_path / "run"
    r = subprocess.run([sys.executable, "-m", "mtrl_arch.cli", "train", "multi_fashion_mnist_hps",
                        *_multi(cache, "train.epochs=1", "train.lr=1e30"), f"run_dir={run}", "--no-progress"],
                       capture_output=True, text=True, timeout=600,
                       env={**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"})
    assert r.returncode == 3, r.stderr[-2000:]
    err = r.stderr.strip().splitlines()
    assert err[0] == f"run directory: {run}"  # the CLI's note at the start of every new run
    assert len(err) == 2 and err[1].startswith("error: non-finite train loss at step 3"), r.stderr[-2000:]
    assert "last good checkpoint is kept" in err[1]
    assert not (run / "model.pt").exists()


def test_limit_batches_caps_the_search_and_eval_limit_batches_the_evaluation(tmp_path, cache):
    """``train.limit_batches=5`` makes a CoNAL search 5 steps (and the retrain epoch 5 batches);
    ``eval.limit_batches=2`` evaluates 2 batches of each split."""
    from mtrl_arch.build import train_supervised
    from mtrl_arch.envs.supervised import make_adapter

    seen: list[_CountingMetrics] = []
    cfg = load_config("multi_fashion_mnist_conal", _multi(cache, "arch.search_steps=40", "train.limit_batches=5",
                                                           "eval.limit_batches=2", "eval.batch_size=8", "train.epochs=1"))
    res = train_supervised(cfg, tmp_path / "run", progress=False, make_adapter=_counting(make_adapter, seen))
    recs = read_metrics(tmp_path / "run")
    assert [r["step"] for r in recs if r.get("phase") == "search"] == [5]  # one epoch of 5 search steps
    assert [r["step"] for r in recs if r.get("phase") == "train"] == [10]
    assert any(k.startswith("eval/") for k in res)
    assert len(seen) == 2 and [m.n for m in seen] == [2, 2]  # validation and test splits


def test_stop_during_evaluation_abandons_it_and_resumes_exactly(tmp_path, cache, monkeypatch, capsys):
    """SIGTERM during an evaluation: no further batch is evaluated, the run exits 0 keeping the checkpoint
    of the epoch's last step, and the resumed run ends that epoch (evaluation included) as if uninterrupted."""
    import mtrl_arch.envs.supervised as S

    # eval batches of 8: several per split on the real-data subset too
    over = _multi(cache, "train.epochs=2", "eval.limit_batches=4", "eval.batch_size=8", "eval.every_epochs=1",
                  "train.checkpoint_every_epochs=1")
    straight, run = tmp_path / "straight", tmp_path / "run"
    assert _train("multi_fashion_mnist_hps", straight, over) == 0
    seen: list[_CountingMetrics] = []
    fired: list[int] = []

    def stop_at_first_batch(n: int) -> None:
        if not fired:  # once: the resumed run evaluates undisturbed
            fired.append(n)
            signal.raise_signal(signal.SIGTERM)

    monkeypatch.setattr(S, "make_adapter", _counting(S.make_adapter, seen, stop_at_first_batch))
    capsys.readouterr()
    assert _train("multi_fashion_mnist_hps", run, over) == 0  # a stop's exit code
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith("stopped by SIGTERM")
    assert [m.n for m in seen] == [1]  # the batch the signal came in finished; no other batch, no test split
    assert not any(r.get("phase") == "train" for r in read_metrics(run))  # the epoch did not end
    assert not (run / "model.pt").exists()
    assert C.list_steps(run / "checkpoints") == [3]  # the epoch's last step (3 batches)
    _, state = C.read_checkpoint(C.checkpoint_path(run / "checkpoints", 3))
    assert (state["epoch"], state["pos"], state["last_eval"]) == (0, 3, {})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert main(["train", "--resume", str(run), "--no-progress"]) == 0
    assert not [w for w in caught if "lr_scheduler" in str(w.message)]  # the epoch's lr step is the checkpoint's
    a, b = _last_eval(straight), _last_eval(run)
    keys = [k for k in a if k.startswith(("eval/", "val/"))]
    assert keys and {k: a[k] for k in keys} == {k: b[k] for k in keys}
    assert [(r["step"], r["lr"]) for r in read_metrics(run) if "phase" in r] == \
        [(r["step"], r["lr"]) for r in read_metrics(straight) if "phase" in r]
    assert [r["step"] for r in read_metrics(run) if "phase" in r] == [3, 6]
    assert (run / "model.pt").is_file()


# ---- resume: the same rules as RL (mtrl_arch.run's resume helpers) ----------------------------------------
def _lines(run_dir: Path) -> list[dict]:
    """metrics.jsonl less wall-clock fields (``time/*``), which no two runs share."""
    return [{k: v for k, v in r.items() if not k.startswith("time/")} for r in read_metrics(run_dir)]


def _assert_same_model(a: Path, b: Path) -> None:
    sa, sb = (torch.load(d / "model.pt", map_location="cpu", weights_only=False) for d in (a, b))
    assert sa["tree"] == sb["tree"] and set(sa["net"]) == set(sb["net"])
    for k, v in sa["net"].items():
        assert torch.equal(v, sb["net"][k]), f"net/{k} differs"


def test_resume_with_a_changed_data_or_model_key_exits_2_naming_it(tmp_path, cache, capsys):
    """A resume must keep the config fields that fix what a checkpoint holds (mtrl_arch.run.RESUME_KEYS), as in
    RL: a model.backbone given with --resume is refused before anything is written, a data.name edited into
    config.yaml by hand by the checkpoint's own record; each exits 2 with one line naming the key."""
    run = tmp_path / "run"
    assert _train("multi_fashion_mnist_hps", run, _multi(cache, "train.epochs=1")) == 0
    cfg = (run / "config.yaml").read_text()
    capsys.readouterr()
    assert main(["train", "--resume", str(run), "model.backbone=resnet18", "train.epochs=2", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: cannot resume from {run}: it was made with "
                                               "model.backbone='lenet' (now 'resnet18')"), err
    assert (run / "config.yaml").read_text() == cfg  # not rewritten with the refused override
    (run / "config.yaml").write_text(cfg.replace("\n  name: multi_fashion_mnist\n", "\n  name: multi_mnist\n", 1))
    assert main(["train", "--resume", str(run), "train.epochs=2", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: cannot resume from the checkpoint at step 3: it was made "
                                               "with data.name='multi_fashion_mnist' (now 'multi_mnist')"), err


def test_damaged_newest_checkpoint_falls_back_to_previous(tmp_path, cache, capsys):
    """As in RL: a damaged newest checkpoint is named in one warning line, moved aside (``*.damaged``) and the
    previous one resumed; the run ends with the undamaged run's log and model."""
    import shutil

    ref, run = tmp_path / "ref", tmp_path / "run"
    assert _train("multi_fashion_mnist_hps", ref, _multi(cache, "train.epochs=2", "train.checkpoint_every_epochs=1")) == 0
    shutil.copytree(ref, run)
    (run / "model.pt").unlink()
    assert C.list_steps(run / "checkpoints") == [3, 6]
    newest = C.checkpoint_path(run / "checkpoints", 6)
    newest.write_bytes(newest.read_bytes()[:-1000])  # as a disk that lost the file's tail would leave it
    capsys.readouterr()
    assert main(["train", "--resume", str(run), "--no-progress"]) == 0
    err = capsys.readouterr().err
    warn = [x for x in err.splitlines() if x.startswith("warning:")]
    assert len(warn) == 1 and "ckpt-6.pt is damaged (truncated" in warn[0], err
    assert "moved to ckpt-6.pt.damaged; falling back to the previous checkpoint" in warn[0]
    assert "resumed from" in err and "ckpt-3.pt at step 3" in err
    assert (run / "checkpoints" / "ckpt-6.pt.damaged").exists()
    assert _lines(run) == _lines(ref)
    _assert_same_model(run, ref)


# schedules that move at every step of a 5-step search: LTB's warm-up and temperature, AdaShare's
# temperature and curriculum (warm-up 1 step, then one weight and one policy step per cycle)
SCHEDULED = {
    "ltb": ["arch.options.total_steps=5"],
    "adashare": ["arch.options.warmup_steps=1", "arch.options.weight_steps=1", "arch.options.policy_steps=1",
                 "arch.options.curriculum_speed=1", "arch.options.tau_decay_every=1"],
}


@pytest.mark.parametrize("method", list(SCHEDULED))
def test_scheduled_search_stopped_and_resumed_is_exact(tmp_path, cache, method):
    """SIGINT in the middle of an LTB / AdaShare search, then a resume: the schedules in force at the stop
    (not the build-time ones) drive the next step, and the run ends with the uninterrupted run's log,
    evaluation, architecture and model."""
    from mtrl_arch.build import train_supervised
    from mtrl_arch.envs.supervised import make_adapter

    over = _multi(cache, "arch.search_steps=5", "train.limit_batches=5", "train.epochs=1", *SCHEDULED[method])
    cfg = load_config(f"multi_fashion_mnist_{method}", over)
    straight = train_supervised(cfg, tmp_path / "a", progress=False, make_adapter=make_adapter)
    # in the third search step (one loss call each: weights or policy)
    train_supervised(cfg, tmp_path / "b", progress=False, make_adapter=sigint_at_loss_call(3))
    assert C.list_steps(tmp_path / "b" / "checkpoints") == [3]
    _, state = C.read_checkpoint(C.checkpoint_path(tmp_path / "b" / "checkpoints", 3))
    assert state["searching"] and state["search_done"] == 3
    resumed = train_supervised(cfg, tmp_path / "b", resume=True, progress=False, make_adapter=make_adapter)
    keys = [k for k in straight if k.startswith(("eval/", "val/", "params/"))]
    assert keys and {k: straight[k] for k in keys} == {k: resumed[k] for k in keys}
    assert (tmp_path / "a" / "arch.json").read_text() == (tmp_path / "b" / "arch.json").read_text()
    assert _lines(tmp_path / "b") == _lines(tmp_path / "a")
    _assert_same_model(tmp_path / "b", tmp_path / "a")
