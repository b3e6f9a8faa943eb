"""``mtrl-arch bench``: the benchmarks run with tiny sizes and print valid JSON with their keys (no timings checked)."""
from __future__ import annotations

import json

import pytest

from mtrl_arch import bench
from mtrl_arch.build import benchmarks
from mtrl_arch.cli import main as cli_main
from mtrl_arch.config import ConfigError

TINY_TRUNK = ["reps=1", "iters=1", "warmup=0", "tasks=3", "width=8", "batch=4", "input=5",
              "pro_tasks=[2,4]", "pro_steps=2", "pro_reps=1", "pro_width=4"]


def run(capsys, what: str, options: list[str]) -> dict:
    """``mtrl-arch bench WHAT OPTIONS --json``: the CLI's registry joins the core's and the RL adapters' benchmarks."""
    assert cli_main(["bench", what, *options, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_the_cli_registry_joins_the_core_and_rl_benchmarks(capsys) -> None:
    assert list(benchmarks()) == ["trunk", "sac-update", "stl-vs-mt", "env", "gpu"]
    assert list(bench.BENCHES) == ["trunk"]  # the core's own: domain-free
    assert cli_main(["bench", "sac-updat"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "did you mean 'sac-update'" in err and "trunk, sac-update, stl-vs-mt, env, gpu" in err


def test_trunk_bench_prints_json_with_its_keys(capsys, tmp_path) -> None:
    out = tmp_path / "bench_trunk.json"
    res = run(capsys, "trunk", [*TINY_TRUNK, f"out={out}"])
    for k in ("stl_over_hps", "conal_over_hps", "conal_search_over_hps", "conal_search_cn_over_hps"):
        assert isinstance(res[k], float) and res[k] > 0, k
    assert set(res["conal_pro"]["per_tasks"]) == {"2", "4"}
    assert len(res["conal_pro"]["per_tasks"]["4"]["stage_ms"]) == 4
    for k in ("machine", "versions", "load_average", "options", "seed"):
        assert k in res, k
    assert res["versions"]["torch"] and res["machine"]["torch_threads"] >= 1
    assert json.loads(out.read_text()) == res


def test_sac_update_bench_prints_json_with_its_keys(capsys) -> None:
    res = run(capsys, "sac-update", ["reps=1", "iters=1", "warmup=0", "tasks=2", "batch=4", "hidden=[8,8]", "obs=5",
                                     "action=2", "buffer=64", "search=false"])
    for k in ("sb3_updates_per_s", "ours_updates_per_s", "speedup_vs_sb3", "conal_speedup_vs_sb3", "ours_gflops",
              "matmul_gflops", "ours_fraction_of_matmul_peak", "flop_formula"):
        assert k in res, k
    # the FLOP formula for these sizes: N=8 rows, actor 5-8-8-4, critic 7-8-8-1
    pa, pc = 5 * 8 + 8 * 8 + 8 * 4, 7 * 8 + 8 * 8 + 8
    assert res["gflop_per_update_ours"] * 1e9 == pytest.approx(2 * 8 * (3 * pa + (pa - 40) + 10 * pc + 2 * (pc - 56)))


def test_bad_options_are_refused_in_one_line() -> None:
    with pytest.raises(ConfigError, match="unknown bench trunk option 'rep'; did you mean reps?"):
        bench.main("trunk", True, ["rep=1"])
    with pytest.raises(ConfigError, match="bench trunk reps must be an integer; got 'many'"):
        bench.main("trunk", True, ["reps=many"])
    with pytest.raises(ConfigError, match="unknown benchmark"):
        bench.main("trunks", True, [])


def test_gpu_check_dry_mode_runs_every_part_and_writes_one_json(capsys, tmp_path) -> None:
    """benchmarks/gpu_check.sh's command in the dry mode it takes without a GPU: every part runs at tiny sizes."""
    out = tmp_path / "gpu_check.json"
    res = run(capsys, "gpu", ["dry=true", "device=cpu", f"out={out}", f"run_dir={tmp_path / 'run'}"])
    assert res["dry"] is True and res["device"] == "cpu"
    for k in ("sb3_updates_per_s", "ours_updates_per_s", "speedup_vs_sb3", "mt_speedup_over_stl", "run_env_steps_per_s",
              "run_updates_per_s", "run_eval_seconds_50_episodes", "projected_hours_20M"):
        assert isinstance(res[k], float) and res[k] > 0, k
    # the projection: 20M env steps at the run's rate plus 100 evaluations of 50 episodes per task
    assert res["projected_hours_20M"] == pytest.approx(
        2e7 / res["run_env_steps_per_s"] / 3600 + 100 * res["run_eval_seconds_50_episodes"] / 3600)
    assert set(res["met"]) == {"speedup_vs_sb3", "projected_hours_20M"} and "versions" in res and "machine" in res
    assert json.loads(out.read_text()) == res
    evals = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
             if "time/eval_seconds" in line]
    assert len(evals) == 1 and evals[0]["eval/episodes_per_task"] == 1 and evals[0]["eval/env_steps"] > 0
