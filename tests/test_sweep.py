"""``mtrl-arch sweep``: grid parsing and statistics; a real local-Ray sweep of tiny supervised runs
(2 methods x 2 seeds -> four run directories and a summary table); a trial that fails inside
its run is reported while the others finish; without Ray, one line naming the install.

The Ray tests start one local Ray instance for the module (about 10 s) and run every trial
as a real ``mtrl-arch train`` process on Multi-Fashion+MNIST (the real files under
MTRL_ARCH_DATA, default ../shared/data, else the subset in tests/fixtures/data), so the
file takes about a minute and a half on two busy CPU cores.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from data_roots import data_overrides, data_root
from mtrl_arch import sweep, sweep_summary
from mtrl_arch.cli import main
from mtrl_arch.config import ConfigError


def _tiny(cache: Path) -> list[str]:
    """A seconds-long supervised run (most of a trial's time is starting Python and torch)."""
    return [*data_overrides("mnist", "fashion_mnist"), f"data.options.cache_dir={cache}", "model.backbone=lenet",
            "data.options.train_subset=256", "data.options.eval_subset=128", "train.batch_size=8",
            "train.epochs=1", "train.limit_batches=2", "eval.limit_batches=1", "eval.batch_size=64",
            "wandb.mode=disabled", "train.threads=1"]


# ---- pure parts -----------------------------------------------------------------------------------
def test_grid_names_and_values():
    grid = sweep.parse_grid(["arch.method=hps,stl", "env.tasks=[a,b],[c]", "train.lr=0.1"])
    assert grid == [("arch.method", ["hps", "stl"]), ("env.tasks", ["[a,b]", "[c]"]), ("train.lr", ["0.1"])]
    names = sweep.setting_names(grid)
    assert [n for n, _ in names] == ["method-hps_tasks-ab", "method-hps_tasks-c", "method-stl_tasks-ab", "method-stl_tasks-c"]
    assert names[0][1] == ["arch.method=hps", "env.tasks=[a,b]", "train.lr=0.1"]
    assert sweep.setting_names(sweep.parse_grid(["train.lr=0.1"])) == [("base", ["train.lr=0.1"])]
    # the same leaf under two sections keeps the full key
    assert sweep.setting_names(sweep.parse_grid(["arch.options.lr=1,2", "weighting.options.lr=3"]))[0][0] == "lr-1"
    assert sweep.setting_names(sweep.parse_grid(["arch.options.lr=1,2", "weighting.options.lr=3,4"]))[0][0] == \
        "arch.options.lr-1_weighting.options.lr-3"
    for bad, needle in [(["seed=0,1"], "--seeds"), (["run_dir=x"], "--out"), (["a=1", "a=2"], "given twice"),
                        (["arch.method"], "key=v1,v2")]:
        with pytest.raises(ConfigError, match=needle):
            sweep.parse_grid(bad)
    assert sweep.parse_seeds("0,1,2") == [0, 1, 2]
    with pytest.raises(ConfigError):
        sweep.parse_seeds("0,x")


def test_t_interval_matches_the_formula():
    st = sweep_summary.t_interval([0.2, 0.4, 0.9])
    m, s = 0.5, math.sqrt(((0.3) ** 2 + 0.1 ** 2 + 0.4 ** 2) / 2)
    h = 4.302652729911275 * s / math.sqrt(3)  # t_{0.975, 2}
    assert st["mean"] == pytest.approx(m) and st["std"] == pytest.approx(s)
    assert st["ci95"] == pytest.approx([m - h, m + h])
    assert sweep_summary.t_interval([0.3]) == {"n": 1, "mean": 0.3, "std": None, "ci95": None, "values": [0.3]}


def test_plan_refuses_a_bad_setting_before_anything_runs(tmp_path, capsys):
    rc = main(["sweep", "multi_fashion_mnist_hps", "arch.method=hps,stll", "--out", str(tmp_path / "s"), "--runner", "local"])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert rc == 2 and err.startswith("error: sweep setting method-stll (arch.method=stll):") and "stl" in err
    assert not (tmp_path / "s").exists()


@pytest.mark.parametrize("override, needle", [("data.options.train_subsett=100,200", "data.options.train_subset"),
                                              ("model.options.width=8,wide", "model.options.width")])
def test_a_bad_supervised_option_in_any_setting_fails_before_any_trial(tmp_path, capsys, override, needle):
    rc = main(["sweep", "multi_fashion_mnist_hps", override, "--out", str(tmp_path / "s"), "--runner", "local"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith("error: sweep setting") and needle in err[0]
    assert not (tmp_path / "s").exists()  # nothing started, nothing written


def test_without_ray_one_line_naming_the_extra(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(sweep, "ray_available", lambda: False)
    rc = main(["sweep", "multi_fashion_mnist_hps", "--address", "auto", "--out", str(tmp_path / "s")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "pip install 'mtrl-arch[sweep]'" in err[0]


# ---- a real sweep on local Ray --------------------------------------------------------------------
@pytest.fixture(scope="module")
def local_ray():
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("multi_cache")


def test_sweep_two_methods_two_seeds_on_ray(local_ray, tmp_path, cache):
    out = tmp_path / "sweep"
    res = sweep.run_sweep("multi_fashion_mnist_hps", ["arch.method=hps,stl", *_tiny(cache)], [0, 1], out)
    names = sorted(t["name"] for t in res["trials"])
    assert names == ["method-hps-seed0", "method-hps-seed1", "method-stl-seed0", "method-stl-seed1"]
    assert res["n_ok"] == 4 and not res["failed"] and "Ray" in res["runner"]
    for n in names:  # ordinary run directories
        for f in ("config.yaml", "metrics.jsonl", "arch.json", "model.pt"):
            assert (out / n / f).is_file(), (n, f)
    summary = json.loads((out / "summary.json").read_text())
    by = {s["setting"]: s for s in summary["settings"]}
    assert set(by) == {"method-hps", "method-stl"}
    for s in by.values():
        assert s["seeds"] == [0, 1] or sorted(s["seeds"]) == [0, 1]
        for k in ("eval/accuracy/top_left", "eval/accuracy/bottom_right", "eval/accuracy/mean"):
            st = s["metrics"][k]
            assert st["n"] == 2 and st["mean"] == pytest.approx(sum(st["values"]) / 2)
            assert st["ci95"][0] <= st["mean"] <= st["ci95"][1]
    # the per-seed values are the runs' own last evaluations
    last = sweep_summary.last_eval(out / "method-stl-seed1")
    assert last["eval/accuracy/mean"] in by["method-stl"]["metrics"]["eval/accuracy/mean"]["values"]
    md = (out / "summary.md").read_text()
    assert "| method-hps | 2 |" in md and "| method-stl | 2 |" in md and "## `eval/accuracy`" in md
    assert (out / "report" / "summary.md").is_file() and (out / "report" / "accuracy.png").is_file()
    assert len(json.loads((out / "report" / "summary.json").read_text())["groups"]) == 2  # seed bands per method
    rec = json.loads((out / "sweep.json").read_text())
    assert all(t["status"] == "ok" and t["returncode"] == 0 for t in rec["trials"])


def test_a_failing_trial_is_reported_and_the_others_finish(local_ray, tmp_path, cache, capsys):
    """data.root of one setting holds no data: that trial fails inside its run (exit 2), the other finishes."""
    out = tmp_path / "sweep"
    empty = tmp_path / "nodata"
    empty.mkdir()
    over = [o for o in _tiny(cache) if not o.startswith("data.root=")]
    rc = main(["sweep", "multi_fashion_mnist_hps", f"data.root={data_root('mnist', 'fashion_mnist')},{empty}", *over, "--seeds", "0",
               "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 1
    summary = json.loads((out / "summary.json").read_text())
    assert summary["n_trials"] == 2 and summary["n_ok"] == 1
    (failed,) = summary["failed"]
    assert failed["trial"].endswith("nodata-seed0") and failed["exit"] == 2
    assert failed["error"].startswith("error: MNIST not found or damaged under")
    assert Path(failed["log"]).is_file()
    ok = [t for t in summary["trials"] if t["status"] == "ok"]
    assert len(ok) == 1 and (Path(ok[0]["run_dir"]) / "model.pt").is_file()
    md = (out / "summary.md").read_text()
    assert "## Failed trials" in md and "MNIST not found" in md
    assert "1 of 2 trial(s) failed" in err and "FAILED (user error)" in err
