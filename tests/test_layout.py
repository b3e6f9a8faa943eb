"""Packaging and layering: agents/envs/configs install under mtrl_arch; the core imports no domain."""
from __future__ import annotations

import json
import subprocess
import sys
from importlib import resources

from mtrl_arch.config import available_configs, load_config

CORE = ["tree", "trunk", "search", "conflict", "weighting", "update", "steps", "config", "logger",
        "checkpoint", "run", "metrics", "synthetic"]


def test_configs_are_package_data_and_all_validate() -> None:
    names = available_configs()
    assert {"mt10_quick", "mt10_hps", "mt10_stl", "mt10_conal", "mt10_conal_pro", "mt10_ltb", "mt10_adashare",
            "mt10_recon", "mt10_stl_sb3", "mt50_conal_pro"} <= set(names)
    assert resources.files("mtrl_arch.configs").joinpath("mt10_quick.yaml").is_file()
    for n in names:
        load_config(n)  # validated up front: every shipped config is valid


def test_core_imports_no_domain_code() -> None:
    code = ("import sys, json; " + "; ".join(f"import mtrl_arch.{m}" for m in CORE) +
            "; print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in "
            "('metaworld', 'gymnasium', 'stable_baselines3', 'agents', 'envs') or m.startswith(('mtrl_arch.envs', 'mtrl_arch.agents')))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert json.loads(out) == []


def test_agents_and_envs_are_not_top_level_packages(tmp_path) -> None:
    """Run outside the checkout (whose folders are importable from its root) to see the install."""
    code = ("import importlib.util as u, json; print(json.dumps([u.find_spec(m) is not None for m in "
            "('mtrl_arch.agents.sac', 'mtrl_arch.envs.metaworld', 'mtrl_arch.configs', 'agents', 'envs', 'configs')]))")
    out = subprocess.run([sys.executable, "-I", "-c", code], capture_output=True, text=True, check=True, cwd=tmp_path).stdout
    assert json.loads(out) == [True, True, True, False, False, False]
