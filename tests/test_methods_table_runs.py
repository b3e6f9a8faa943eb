"""benchmarks/methods_table.py: every (regime, row) it would run is a config the CLI accepts, and the
CoNAL size budget it derives is below the STL trunk the real model builds (``train --dry-run``)."""
from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest
import yaml

from mtrl_arch.cli import main

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "methods_table.py"
spec = importlib.util.spec_from_file_location("methods_table", SCRIPT)
methods_table = importlib.util.module_from_spec(spec)
spec.loader.exec_module(methods_table)


def dry_run(config: str, overrides: list[str], tmp_path: Path, capsys) -> tuple[dict, dict]:
    """The resolved config and parameter counts that ``train --dry-run`` prints."""
    capsys.readouterr()
    assert main(["train", config, *overrides, f"run_dir={tmp_path / 'never-made'}", "--dry-run"]) == 0
    resolved, counts = capsys.readouterr().out.split("\n---\n")
    assert not (tmp_path / "never-made").exists()
    return yaml.safe_load(resolved), yaml.safe_load(counts)


@pytest.mark.parametrize("regime", list(methods_table.REGIMES))
def test_every_row_of_every_regime_resolves(regime: str, tmp_path: Path, capsys) -> None:
    ran = []
    for row in methods_table.rows(1):
        which = methods_table.overrides_for(regime, row, str(tmp_path), tmp_path / "cache")
        if which is None:
            continue
        cfg, _ = dry_run(*which, tmp_path, capsys)
        ran.append(row)
        family = methods_table.REGIMES[regime][0]
        expected = {"stl": "stl", "hps": "hps", "hps_pcgrad": "hps"}.get(row, re.sub(r"_(margin|budget)$", "", row))
        assert cfg["arch"]["method"] == expected, (regime, row)
        assert cfg["train"]["threads"] == 1
        if family != "mt10_quick":
            assert cfg["data"]["root"] == str(tmp_path)
        if row == "hps_pcgrad":
            assert cfg["weighting"]["method"] == "pcgrad"
    # every regime has the Delta_m baseline (stl), hard sharing and CoNAL
    assert {"stl", "hps", "conal"} <= set(ran)


@pytest.mark.parametrize("regime", ["capacity", "wide"])
def test_the_conal_budget_is_95_percent_of_the_real_stl_trunk(regime: str, tmp_path: Path, capsys) -> None:
    _, stl = dry_run(*methods_table.overrides_for(regime, "stl", str(tmp_path), tmp_path), tmp_path, capsys)
    cfg, _ = dry_run(*methods_table.overrides_for(regime, "conal_budget", str(tmp_path), tmp_path), tmp_path, capsys)
    trunk = stl["parameters"]["trunk"]["total"] - stl["parameters"]["trunk"]["heads"]
    assert cfg["arch"]["max_params"] == int(0.95 * trunk)
