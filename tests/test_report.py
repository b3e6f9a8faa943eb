"""mtrl_arch.report on run directories written by the real writers (run info, Logger, arch.json)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("matplotlib")

from mtrl_arch.cli import main  # noqa: E402
from mtrl_arch.config import ConfigError, load_config  # noqa: E402
from mtrl_arch.logger import Logger  # noqa: E402
from mtrl_arch.report import group_runs, load_run, make_report  # noqa: E402
from mtrl_arch.run import write_arch, write_run_info  # noqa: E402
from mtrl_arch.tree import Tree  # noqa: E402

TASKS = ("reach-v3", "push-v3", "pick-place-v3")
PNG = b"\x89PNG\r\n\x1a\n"


def make_rl_run(root: Path, method: str, seed: int, success: dict[str, list[float]]) -> Path:
    cfg = load_config("mt10_hps", [f"arch.method={method}", f"seed={seed}", f"env.tasks=[{','.join(TASKS)}]",
                                     "arch.search_steps=100", f"run_dir={root / f'{method}-s{seed}'}"])
    d = Path(cfg.run_dir)
    write_run_info(d, cfg)
    lg = Logger(d, None)
    lg.log({"params/actor/total": 1000, "params/critic/total": 2000}, 0)
    for i, step in enumerate((1000, 2000, 3000)):
        lg.log({"train/critic_loss": 1.0 / (i + 1), "time/env_steps_per_s": 100.0}, step)
        vals = {t: success[t][i] for t in TASKS}
        lg.log({**{f"eval/success_rate/{t}": v for t, v in vals.items()},
                "eval/success_rate/mean": sum(vals.values()) / len(vals),
                **{f"eval/return/{t}": 10.0 * v for t, v in vals.items()}}, step)
    lg.close()
    if method == "conal":
        trees = {"actor": Tree.from_branch_points(TASKS, 3, [2, 2, 0 if seed else 1]),
                 "critic": Tree(TASKS, (((0, 1, 2),), ((0, 1), (2,)), ((0,), (1,), (2,))), method="conal")}
    else:
        trees = {"actor": Tree.hps(TASKS, 3), "critic": Tree.hps(TASKS, 3)}
    write_arch(d, trees)
    return d


@pytest.fixture
def rl_runs(tmp_path):
    runs = []
    for seed in (0, 1):
        s = 0.1 * seed
        runs.append(make_rl_run(tmp_path, "conal", seed, {"reach-v3": [0.2 + s, 0.5 + s, 0.8 + s],
                                                          "push-v3": [0.0, 0.1, 0.2 + s], "pick-place-v3": [0, 0, s]}))
        runs.append(make_rl_run(tmp_path, "hps", seed, {"reach-v3": [0.1, 0.3, 0.4 + s],
                                                        "push-v3": [0.0, 0.0, 0.1], "pick-place-v3": [0, 0, 0]}))
    return runs


def test_groups_ignore_seed_and_run_dir(rl_runs):
    groups = group_runs([load_run(p) for p in rl_runs])
    assert sorted((label, len(m)) for label, m in groups) == [("arch.method=conal", 2), ("arch.method=hps", 2)]


def test_report_figures_trees_and_table(rl_runs, tmp_path):
    out = make_report(rl_runs, tmp_path / "report")
    assert out == tmp_path / "report"
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert pngs == ["return.png", "success_rate.png", "tree-conal-s0.png", "tree-conal-s1.png", "tree-hps-s0.png", "tree-hps-s1.png"]
    for p in out.glob("*.png"):
        assert p.read_bytes()[:8] == PNG and p.stat().st_size > 5000
    md = (out / "summary.md").read_text()
    # conal final mean over tasks: seed 0 (0.8+0.2+0)/3 = 0.333, seed 1 (0.9+0.3+0.1)/3 = 0.433
    assert "| arch.method=conal | 2 | 0.383 ± 0.071 | 0.850 ± 0.071 |" in md
    assert "| arch.method=hps | 2 | 0.183 ± 0.024 |" in md
    assert "| conal-s1 | 1 | 0.433 | 3,000 | actor 1,000, critic 2,000 |" in md
    assert "![success_rate](success_rate.png)" in md
    data = json.loads((out / "summary.json").read_text())
    assert data["metric"] == "success_rate" and len(data["runs"]) == 4
    # the methods table: RL rows get the IQM of the (seed, task) success rates; the trees per seed, per network
    rows = {r["setting"]: r for r in data["methods"]["rows"]}
    assert rows["arch.method=conal"]["trees"] == ["a:SGP c:SGP", "a:GGP c:SGP"]  # actor branch points [2,2,1], [2,2,0]
    # conal's 6 final values 0, 0.1, 0.2, 0.3, 0.8, 0.9: trimming one from each end leaves 0.1, 0.2, 0.3, 0.8
    iqm, lo, hi = rows["arch.method=conal"]["iqm"]
    assert iqm == pytest.approx(0.35) and lo <= iqm <= hi
    assert "## Methods table" in md and "IQM [95% CI]" in md


def test_default_output_folder_and_cli(rl_runs, capsys):
    assert main(["report", str(rl_runs[0])]) == 0
    assert (rl_runs[0] / "report" / "summary.md").is_file()
    assert "report written to" in capsys.readouterr().out


def test_supervised_metrics_and_search_not_finished(tmp_path):
    cfg = load_config(None, ["domain=supervised", "data.name=multi_mnist", "arch.method=hps",
                             f"run_dir={tmp_path / 'sup'}"])
    d = Path(cfg.run_dir)
    write_run_info(d, cfg)
    lg = Logger(d, None)
    for epoch in (1, 2, 3):
        lg.log({"eval/accuracy/top_left": 0.5 + 0.1 * epoch, "eval/accuracy/bottom_right": 0.4 + 0.1 * epoch,
                "eval/loss/top_left": 1.0 / epoch, "eval/loss/bottom_right": 1.2 / epoch, "eval/delta_m": 0.0}, epoch)
    lg.close()
    out = make_report([d], tmp_path / "rep")
    assert sorted(p.name for p in out.glob("*.png")) == ["accuracy.png", "loss.png"]  # no arch.json: no tree
    md = (out / "summary.md").read_text()
    assert "Final `eval/accuracy`" in md and "| 0.750 | 0.800 | 0.700 |" in md


def test_tasks_with_their_own_metrics_are_summarised_by_each_tasks_first(tmp_path):
    """GLUE: CoLA logs mcc, MRPC f1 and accuracy; the summary heads each task with its first metric."""
    cfg = load_config("glue_stl", [f"run_dir={tmp_path / 'glue'}", "data.tasks=[CoLA,MRPC]"])
    d = Path(cfg.run_dir)
    write_run_info(d, cfg)
    lg = Logger(d, None)
    lg.log({"eval/mcc/CoLA": 0.1, "eval/f1/MRPC": 0.7, "eval/accuracy/MRPC": 0.6}, 1)
    lg.log({"eval/mcc/CoLA": 0.2, "eval/f1/MRPC": 0.8, "eval/accuracy/MRPC": 0.7}, 2)
    lg.close()
    md = (make_report([d], tmp_path / "rep") / "summary.md").read_text()
    assert "| mean | CoLA mcc | MRPC f1 |" in md
    assert "| 0.500 | 0.200 | 0.800 |" in md  # the mean of the tasks' last values: (0.2 + 0.8) / 2


def test_not_a_run_directory(tmp_path, capsys):
    with pytest.raises(ConfigError, match="expected a folder with config.yaml and metrics.jsonl"):
        make_report([tmp_path / "nothing"])
    (tmp_path / "half").mkdir()
    assert main(["report", str(tmp_path / "half")]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "no config.yaml" in err


def test_reference_points_are_tabled_and_drawn(rl_runs, tmp_path):
    ref = tmp_path / "ref.yaml"
    ref.write_text("metric: success_rate\nsource: a test\nseries:\n"
                   "  - label: published\n    points: [[2000, 0.5], [3000, 0.2], [90000000, 0.9]]\n")
    out = make_report(rl_runs, tmp_path / "rep", reference=ref)
    data = json.loads((out / "summary.json").read_text())
    rows = {(r["setting"], r["step"]): r for r in data["reference"]}
    # conal seeds at 3000: means over tasks (0.8+0.2+0)/3 and (0.9+0.3+0.1)/3; the 9e7 point has no evaluation
    conal = rows[("arch.method=conal", 3000.0)]
    assert conal["values"] == pytest.approx([1.0 / 3, 1.3 / 3])
    assert conal["difference"] == pytest.approx((1.0 / 3 + 1.3 / 3) / 2 - 0.2)
    assert ("arch.method=hps", 2000.0) in rows and not any(s == 9e7 for _, s in rows)
    text = (out / "summary.md").read_text()
    assert "Against the reference" in text and "| arch.method=conal | 3,000 | 2 |" in text
    assert (out / "success_rate.png").read_bytes().startswith(PNG)


@pytest.mark.parametrize("content", ["series: []\n", "metric: success_rate\nseries:\n  - label: x\n    points: [[1]]\n", None])
def test_a_bad_reference_file_is_one_line_exit_2(rl_runs, tmp_path, capsys, content):
    ref = tmp_path / "ref.yaml"
    if content is not None:
        ref.write_text(content)
    assert main(["report", *map(str, rl_runs), "--out", str(tmp_path / "o"), "--reference", str(ref)]) == 2
    err = capsys.readouterr().err.strip()
    assert "reference file" in err and len(err.splitlines()) == 1


def test_search_trajectories_are_plotted_from_the_logged_probabilities(tmp_path):
    """arch/<network>/<task>/<choice> and conflict/<network>/<group>/<rate> lines become one figure each."""
    d = make_rl_run(tmp_path, "conal", 0, {"reach-v3": [0, 0, 0], "push-v3": [0, 0, 0], "pick-place-v3": [0, 0, 0]})
    with (d / "metrics.jsonl").open("a") as f:  # lines as the loops write them while searching
        for step, p in ((100, 0.25), (200, 0.6)):
            rec = {"step": step, **{f"arch/actor/{t}/b{b}": (p if b == 3 else (1 - p) / 3) for t in TASKS for b in range(4)},
                   "conflict/actor/stage0/withheld": 0.9, "conflict/actor/stage0/mean_cos": -0.1}
            f.write(json.dumps(rec) + "\n")
    run = load_run(d)
    from mtrl_arch.report import _logged_series

    series = _logged_series(run, "arch")
    assert set(series) == {f"actor/{t}" for t in TASKS} and set(series["actor/reach-v3"]) == {"b0", "b1", "b2", "b3"}
    assert series["actor/push-v3"]["b3"] == [(100.0, 0.25), (200.0, 0.6)]
    out = make_report([d], tmp_path / "rep")
    assert (out / f"arch-{d.name}.png").read_bytes().startswith(PNG)
    assert (out / f"conflict-{d.name}.png").read_bytes().startswith(PNG)
    assert f"arch-{d.name}.png" in (out / "summary.md").read_text()


def test_bands_are_clipped_to_the_metrics_range():
    from mtrl_arch.axes import clipped_band, metric_range

    def band(mean, std, name):
        lo, hi = clipped_band(mean, std, name)
        return [round(v, 9) for v in lo], [round(v, 9) for v in hi]

    assert band([0.05, 0.5, 0.95], [0.1, 0.1, 0.1], "success_rate") == ([0.0, 0.4, 0.85], [0.15, 0.6, 1.0])
    assert band([0.1], [0.5], "loss") == ([0.0], [0.6])  # no upper bound
    assert band([-0.9], [0.3], "mcc") == ([-1.0], [-0.6])
    assert band([-5.0], [2.0], "return") == ([-7.0], [-3.0])  # a name it does not know: not clipped
    assert metric_range("within_22.5") == (0.0, 1.0) and metric_range("abs_err")[0] == 0.0


def test_step_axes_read_in_k_and_m():
    from mtrl_arch.axes import count_formatter, human_count

    assert [human_count(x) for x in (0, 950, 1500, 200_000, 225_000, 1_200_000, 999_999, 2.5e9)] == \
        ["0", "950", "1.5k", "200k", "225k", "1.2M", "1M", "2.5B"]
    assert count_formatter()(2_000_000, 0) == "2M"


def test_a_finished_train_writes_its_report_and_the_switch_turns_it_off(tmp_path, capsys):
    """A tiny real search (CoNAL on the Multi-Fashion+MNIST test data): RUN_DIR/report holds what `report RUN_DIR`
    writes, the last line names it; a failing report is one warning line; train.report=false writes none."""
    import time

    from data_roots import data_overrides
    from mtrl_arch.build import report_at_end
    from mtrl_arch.run import read_run_config

    run = tmp_path / "run"
    tiny = ["model.backbone=lenet", "train.epochs=1", "train.limit_batches=2", "eval.limit_batches=1",
            "arch.search_steps=2", "train.batch_size=8", "eval.batch_size=64", "wandb.mode=disabled",
            "data.num_workers=0", *data_overrides("mnist", "fashion_mnist"), f"data.options.cache_dir={tmp_path / 'c'}"]
    assert main(["train", "multi_fashion_mnist_conal", *tiny, f"run_dir={run}", "--no-progress"]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == f"report written to {run / 'report'}"
    written = sorted(p.name for p in (run / "report").iterdir())
    assert written == ["accuracy.png", "arch-run.png", "summary.json", "summary.md", "tree-run.png"]
    assert main(["report", str(run), "--out", str(tmp_path / "by-hand")]) == 0
    assert sorted(p.name for p in (tmp_path / "by-hand").iterdir()) == written
    cfg, _ = read_run_config(run)
    assert report_at_end(cfg, run, since=time.time() + 60) is None  # model.pt older: stopped, not finished
    for p in (run / "report").iterdir():
        p.unlink()
    (run / "report").rmdir()
    (run / "report").write_text("in the way")  # the report cannot make its folder
    capsys.readouterr()
    assert report_at_end(cfg, run, since=0.0) is None
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("warning: the run's report failed (FileExistsError")
    (run / "report").unlink()
    # the switch: a resumed run trains one more epoch, saves its model, and writes no report
    assert main(["train", "--resume", str(run), "train.epochs=2", "train.report=false", "--no-progress"]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == "}"  # the result is the last thing printed
    assert (run / "model.pt").is_file() and not (run / "report").exists()
    assert main(["train", "multi_fashion_mnist_conal", "train.report=maybe", "--dry-run"]) == 2
    assert "train.report" in capsys.readouterr().err
