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
import signal
from pathlib import Path

import pytest
import torch

from data_roots import data_overrides
from mtrl_arch.cli import main
from mtrl_arch.config import available_configs, load_config
from mtrl_arch.logger import read_metrics

FIXTURES = Path(__file__).resolve().parent / "fixtures"

SUPERVISED_CONFIGS = sorted(
    [f"multi_fashion_mnist_{m}" for m in ("hps", "stl", "conal", "conal_pro", "ltb", "adashare", "recon")]
    + ["multi_mnist_hps", "multi_mnist_conal", "multi_fashion_hps", "multi_fashion_conal", "celeba9_conal_pro",
       "nyuv2_hps", "nyuv2_conal", "cityscapes_hps", "cityscapes_conal", "glue_hps", "glue_stl", "glue_conal"])


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny tensors: one intra-op thread is 10x faster than two on a busy two-core machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


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
    from mtrl_arch.agents.supervised import train_supervised
    from mtrl_arch.envs.supervised import make_adapter

    over = _multi(cache, "arch.search_steps=5", "train.epochs=1", "arch.conflict_noticed=true")
    cfg = load_config("multi_fashion_mnist_conal", over)
    straight = train_supervised(cfg, tmp_path / "a", progress=False, make_adapter=make_adapter)

    calls = {"n": 0}

    def interrupting(c):
        adapter = make_adapter(c)
        inner = adapter.losses

        def losses(out, batch):
            calls["n"] += 1
            if calls["n"] == 4:  # inside the second search step's weight step (2 calls per step: weights, alpha)
                signal.raise_signal(signal.SIGINT)
            return inner(out, batch)

        adapter.losses = losses
        return adapter

    part = train_supervised(cfg, tmp_path / "b", progress=False, make_adapter=interrupting)
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
