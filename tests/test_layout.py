"""Packaging and layering: agents/envs/configs install under mtrl_arch; the core imports no domain.

The layering rule (issue 16): the core package holds only domain-free code. Every import
statement of every module is read from its source (function-level ones included), so a
lazy import cannot hide a dependency: no core module imports an adapter (agents/, envs/,
installed as mtrl_arch.agents / mtrl_arch.envs) or a domain library, except the modules in
:data:`MAY_IMPORT_ADAPTERS`, and no two modules import each other, directly or round a loop.
"""
from __future__ import annotations

import ast
import json
import subprocess
import sys
from importlib import resources
from pathlib import Path

import pytest

from mtrl_arch.config import available_configs, load_config

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: the same parser, a dependency of pytest there
    import tomli as tomllib

CORE = ["tree", "trunk", "search", "conflict", "weighting", "update", "steps", "config", "options", "logger",
        "checkpoint", "safe_load", "run", "run_lock", "metrics", "synthetic", "bench", "loop", "table", "sweep",
        "sweep_summary"]

ROOT = Path(__file__).resolve().parents[1]
# packages installed under mtrl_arch that are not the core (pyproject's package-dir maps them to agents/, envs/, configs/)
ADAPTERS = ("mtrl_arch.agents", "mtrl_arch.envs", "mtrl_arch.configs")
# what only the adapters may import: the domains' libraries, and the adapters' checkout-relative names
DOMAIN_LIBRARIES = ("metaworld", "gymnasium", "stable_baselines3", "agents", "envs")
# The only core modules that may import adapters. Every other core module is domain-free.
MAY_IMPORT_ADAPTERS = {
    "mtrl_arch.build": "the composition root: turns a config into environments or data, the agent and the loop, "
                       "and joins the core's benchmarks with the RL adapters' for `mtrl-arch bench`",
    "mtrl_arch.cli": "the CLI verbs: task-name preflight (envs.metaworld), the data error's exit code (envs.vision); "
                     "everything else it reaches through mtrl_arch.build",
}


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


# ---- the import graph, read from the sources --------------------------------------------------------


def package_dirs(root: Path) -> dict[str, Path]:
    """Installed package name -> its folder, from pyproject.toml's setuptools packages and package-dir."""
    tool = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]
    return {pkg: root / tool["package-dir"][pkg] for pkg in tool["packages"]}


def module_files(packages: dict[str, Path]) -> dict[str, Path]:
    """Module name -> source file of every module of ``packages`` (a package's ``__init__.py`` under its own name)."""
    out = {}
    for pkg, folder in packages.items():
        for f in sorted(folder.glob("*.py")):
            out[pkg if f.stem == "__init__" else f"{pkg}.{f.stem}"] = f
    return out


def imports_of(name: str, path: Path, modules: set[str]) -> set[str]:
    """Every module that an import statement anywhere in ``path`` (module ``name``) names, function bodies included.

    ``from P import x`` names the module ``P.x`` when ``modules`` holds it, else ``P``; relative
    imports resolve against the module's package.
    """
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[:len(parts) - node.level + 1] + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            subs = {f"{base}.{a.name}" for a in node.names} & modules
            out.update(subs or {base})
    return out


def import_graph(packages: dict[str, Path]) -> dict[str, set[str]]:
    """Module -> every module it imports (outside ones included: the checks tell them apart)."""
    files = module_files(packages)
    return {m: imports_of(m, f, set(files)) for m, f in files.items()}


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The groups of modules that import each other (strongly connected, Tarjan), each sorted; self-imports too."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v] & graph.keys()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1 or v in graph[v]:
                out.append(sorted(group))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(out)


def layering_violations(graph: dict[str, set[str]], adapters=ADAPTERS, domain=DOMAIN_LIBRARIES,
                        allowed=MAY_IMPORT_ADAPTERS) -> list[str]:
    """``core -> imported`` for every import of an adapter or a domain library by a core module not in ``allowed``."""
    def is_adapter(m: str) -> bool:
        return any(m == a or m.startswith(a + ".") for a in adapters)

    return [f"{m} -> {i}" for m in sorted(graph) if not is_adapter(m) and m not in allowed
            for i in sorted(graph[m]) if is_adapter(i) or i.split(".")[0] in domain]


def test_every_import_is_seen_function_level_ones_included() -> None:
    graph = import_graph(package_dirs(ROOT))
    assert {"mtrl_arch.cli", "mtrl_arch.search.conal", "mtrl_arch.agents.sac", "mtrl_arch.envs.supervised"} <= set(graph)
    assert "mtrl_arch.agents.rl_loop" in graph["mtrl_arch.agents.sac"]  # imported inside MTSAC.learn
    assert "mtrl_arch.envs.metaworld" in graph["mtrl_arch.cli"]  # inside _preflight
    assert "mtrl_arch.search.base" in graph["mtrl_arch.search.conal"]  # relative, one level
    assert "mtrl_arch.tree" in graph["mtrl_arch.search.conal"]  # relative, two levels
    assert "mtrl_arch.distributed" in graph["mtrl_arch.agents.sac"]  # `from mtrl_arch import distributed`


def test_core_imports_no_adapter_outside_the_composition_root_and_cli() -> None:
    graph = import_graph(package_dirs(ROOT))
    bad = layering_violations(graph)
    assert not bad, "core modules import adapters or domain libraries:\n  " + "\n  ".join(bad)
    assert set(MAY_IMPORT_ADAPTERS) <= set(graph)  # the allow-list names real modules


def test_no_import_cycles() -> None:
    graph = import_graph(package_dirs(ROOT))
    cycles = import_cycles(graph)
    assert not cycles, "modules that import each other (directly or round a loop):\n" + "\n".join(
        "  " + "; ".join(f"{m} -> {', '.join(sorted(graph[m] & set(c)))}" for m in c) for c in cycles)


def _write(root: Path, files: dict[str, str]) -> None:
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)


@pytest.fixture
def synthetic(tmp_path) -> tuple[Path, dict[str, Path]]:
    """A clean two-package layout: core ``pkg`` and its adapter ``pkg.ad`` (in another folder, as agents/ is)."""
    _write(tmp_path, {
        "pkg/__init__.py": "",
        "pkg/base.py": "import os\n",
        "pkg/top.py": "from .base import os\n\ndef f():\n    from pkg import base\n",
        "pkg/root.py": "def build():\n    from .ad.impl import g\n",  # the synthetic composition root
        "ad/__init__.py": "",
        "ad/impl.py": "from pkg.base import os\nfrom . import helper\n\ndef g():\n    import gymnasium\n",
        "ad/helper.py": "from ..base import os\n",
    })
    return tmp_path, {"pkg": tmp_path / "pkg", "pkg.ad": tmp_path / "ad"}


def _check(packages: dict[str, Path]) -> tuple[list[list[str]], list[str]]:
    graph = import_graph(packages)
    return import_cycles(graph), layering_violations(graph, ("pkg.ad",), DOMAIN_LIBRARIES, {"pkg.root": "root"})


def test_the_detector_passes_a_clean_layout(synthetic) -> None:
    root, packages = synthetic
    graph = import_graph(packages)
    assert graph["pkg.ad.helper"] == {"pkg.base"} and graph["pkg.ad.impl"] >= {"pkg.base", "pkg.ad.helper", "gymnasium"}
    assert _check(packages) == ([], [])


def test_the_detector_finds_a_cycle_through_a_function_level_import(synthetic) -> None:
    root, packages = synthetic
    _write(root, {"pkg/base.py": "import os\n\ndef late():\n    from .top import f\n"})
    assert _check(packages) == ([["pkg.base", "pkg.top"]], [])
    _write(root, {"pkg/base.py": "import os\n", "ad/helper.py": "def h():\n    from pkg.ad import impl\n"})
    assert _check(packages) == ([["pkg.ad.helper", "pkg.ad.impl"]], [])


def test_the_detector_finds_core_imports_of_adapters_and_domain_libraries(synthetic) -> None:
    root, packages = synthetic
    _write(root, {"pkg/top.py": "def f():\n    from .ad import impl\n",
                  "pkg/base.py": "import os\n\ndef env():\n    import metaworld.env_dict\n"})
    assert _check(packages)[1] == ["pkg.base -> metaworld.env_dict", "pkg.top -> pkg.ad.impl"]
    # the allow-listed root may import the adapter; an adapter may import the core and domain libraries
    _write(root, {"pkg/top.py": "", "pkg/base.py": "import os\n"})
    assert _check(packages) == ([], [])
