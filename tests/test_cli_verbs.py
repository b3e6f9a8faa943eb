"""``mtrl-arch train --dry-run`` on the supervised path and ``mtrl-arch configs``.

The RL dry run is checked against a real run in test_cli_rl.py. Multi-* data: the real
files under MTRL_ARCH_DATA, else the subset in tests/fixtures/data (tests/data_roots.py).
"""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from data_roots import data_overrides
from mtrl_arch.cli import main
from mtrl_arch.config import available_configs, load_config, resolve_config_path
from mtrl_arch.logger import read_metrics


pytestmark = pytest.mark.usefixtures("one_thread")


def _lenet(cache: Path) -> list[str]:
    """multi_fashion_mnist_hps with the LeNet backbone, on a seconds-long budget."""
    return ["model.backbone=lenet", "train.epochs=1", "train.limit_batches=2", "eval.limit_batches=1",
            "train.batch_size=8", "eval.batch_size=64", "wandb.mode=disabled", "data.num_workers=0",
            *data_overrides("mnist", "fashion_mnist"), f"data.options.cache_dir={cache}"]


def _dry_run(capsys, argv: list[str]) -> tuple[dict, dict]:
    capsys.readouterr()
    assert main(["train", *argv, "--dry-run"]) == 0
    cfg_doc, counts_doc = yaml.safe_load_all(capsys.readouterr().out)
    return cfg_doc, counts_doc


def test_supervised_dry_run_prints_the_config_and_the_counts_a_run_logs(capsys, tmp_path, monkeypatch) -> None:
    over = _lenet(tmp_path / "cache")
    run_dir = tmp_path / "run"
    assert main(["train", "multi_fashion_mnist_hps", *over, f"run_dir={run_dir}", "--no-progress"]) == 0
    logged = next(r for r in read_metrics(run_dir) if any(k.startswith("params/") for k in r))
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)  # where a default run directory (runs/NAME-TIME) would appear
    cfg_doc, counts_doc = _dry_run(capsys, ["multi_fashion_mnist_hps", *over])
    written = yaml.safe_load((run_dir / "config.yaml").read_text())
    del written["run"]
    assert cfg_doc == {**written, "run_dir": ""}
    counts = counts_doc["parameters"]
    assert {f"params/{n}/{k}": v for n, c in counts.items() for k, v in c.items()} == \
        {k: v for k, v in logged.items() if k.startswith("params/")}
    assert counts["trunk"]["total"] == counts["trunk"]["shared"] + counts["trunk"]["heads"] > 0  # HPS: no split
    assert list(work.iterdir()) == []  # no run directory, no data cache: nothing written


def test_dry_run_without_data_says_the_counts_need_it(capsys, tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    cfg_doc, counts_doc = _dry_run(capsys, ["glue_hps", "data.root=/nonexistent"])
    assert cfg_doc["data"]["name"] == "glue" and counts_doc["parameters"] is None
    assert counts_doc["counted"].startswith("counts need the data")
    # a search network is counted as such; the data root is never read
    _, counts_doc = _dry_run(capsys, ["multi_fashion_mnist_conal", "model.backbone=lenet", "data.root=/nonexistent"])
    assert set(counts_doc["parameters"]) == {"search"} and counts_doc["parameters"]["search"]["total"] > 0
    assert list(tmp_path.iterdir()) == []
    assert main(["train", "multi_fashion_mnist_hps", "train.epoch=2", "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: unknown config key 'train.epoch'") and err.count("\n") == 1


def test_configs_lists_every_shipped_config_with_its_description(capsys) -> None:
    capsys.readouterr()
    assert main(["configs"]) == 0
    rows = [line.split(None, 1) for line in capsys.readouterr().out.splitlines()]
    assert [r[0] for r in rows] == available_configs()
    for name, description in rows:
        first = resolve_config_path(name).read_text().splitlines()[0]
        assert first.startswith("# ") and description.strip() == first[2:].strip() != "", name
        load_config(name)


def test_openmp_waits_passively_on_a_busy_cpu_only(monkeypatch) -> None:
    from mtrl_arch import cli

    assert cli.openmp_wait_policy({}, load=2.0, cpus=2) == "PASSIVE"    # busy: as many runnable as cores
    assert cli.openmp_wait_policy({}, load=7.5, cpus=2) == "PASSIVE"
    assert cli.openmp_wait_policy({}, load=1.2, cpus=2) is None         # idle: libgomp's spinning default
    assert cli.openmp_wait_policy({"OMP_WAIT_POLICY": "ACTIVE"}, load=9.0, cpus=2) is None  # the user's choice
    # once torch is loaded libgomp has read its settings: the CLI leaves the environment alone
    import torch  # noqa: F401
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    monkeypatch.setattr(cli.os, "getloadavg", lambda: (99.0, 99.0, 99.0))
    cli._set_openmp_wait_policy()
    assert "OMP_WAIT_POLICY" not in cli.os.environ
