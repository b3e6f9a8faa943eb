"""Bad input, generated (Hypothesis): the override parser, the YAML loader and the CLI's arguments.

Whatever the input: a valid config (``train --dry-run``: exit 0), or exit code 2 with exactly one line on
stderr (``error: ...``) and no traceback; never a run directory or any other file left behind. An accepted
config also round-trips through the YAML a run's config.yaml holds, and its seed seeds every generator.

Example counts: the ``default`` profile (about 30 s on 2 busy cores); ``HYPOTHESIS_PROFILE=soak`` runs
twenty times as many (``pytest tests/test_properties.py --hypothesis-show-statistics`` prints the counts).
The cases found so far are pinned in ``FOUND`` (each was a traceback).
"""
from __future__ import annotations

import contextlib
import dataclasses
import io
import os
import subprocess
import sys
import tempfile
import typing
from pathlib import Path
from unittest import mock

import pytest
import yaml

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, event, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from mtrl_arch import sweep  # noqa: E402
from mtrl_arch.cli import main  # noqa: E402
from mtrl_arch.config import Config, ConfigError, config_from_dict, load_config, load_yaml_text, to_yaml  # noqa: E402
from mtrl_arch.run import seed_everything  # noqa: E402

settings.register_profile("default", max_examples=25, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("soak", max_examples=500, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
PROFILE = os.environ.get("HYPOTHESIS_PROFILE", "default")
N = settings.get_profile(PROFILE).max_examples


def _keys(obj, prefix: str = "") -> list[str]:
    out = []
    for f in dataclasses.fields(obj):
        v = getattr(obj, f.name)
        out += _keys(v, f"{prefix}{f.name}.") if dataclasses.is_dataclass(v) else [f"{prefix}{f.name}"]
    return out


REAL_KEYS = _keys(Config()) + ["arch", "weighting", "arch.options.lr", "arch.options.total_steps",
                               "arch.options.steps_per_stage", "arch.options.leave_init", "arch.options.derive",
                               "weighting.options.alpha", "data.options.cache_dir", "model.options.width", "base"]
SECTIONS = [f.name for f in dataclasses.fields(Config)]
# the fast configs (a dry run of each takes well under a second): MT-SAC, SB3, GLUE
CONFIGS = ["mt10_quick", "mt10_stl_sb3", "glue_hps", "glue_conal", "glue_stl"]

YAMLISH = st.sampled_from([
    "", " ", "~", "null", "true", "no", "on", "0", "-1", "1e400", "-1e400", ".inf", ".nan", "0x1f", "0o17", "1_000",
    "3e-4", "2**70", "9" * 30, "[]", "{}", "[1, [2, [3]]]", "{a: 1}", "{a: {b: [c]}}", "[a,b", "a]", "{a: 1",
    "&a [*a]", "!!python/object/apply:os.system [ls]", "!!binary aGk=", "'quoted'", '"\\x00"', "a: b: c", "- x",
    "%YAML 1.1", "---", "...", "#", "|", ">", "@", "`", "=", "==", "a=b", "[reach-v3,push-v3]", "reach-v3",
    "conal", "hps", "pcgrad", "offline", "cpu", "cuda", "[8, 8]", "[0]", "[-1]", "[1.5]", "[100000000000]",
])
NESTED = st.integers(1, 60).flatmap(lambda n: st.sampled_from(["[" * n + "]" * n, "[" * n, "{a: " * n + "1" + "}" * n,
                                                               "]" * n, "[" * n + "1" + "]" * (n - 1)]))
VALUE = st.one_of(YAMLISH, NESTED, st.integers(-2**70, 2**70).map(str),
                  st.floats(allow_nan=True, allow_infinity=True).map(repr), st.text(max_size=30),
                  st.lists(st.sampled_from(["a", "1", "-2", "reach-v3", "x y", "[", "]", ","]), max_size=5)
                  .map(lambda xs: "[" + ",".join(xs) + "]"))
KEY = st.one_of(st.sampled_from(REAL_KEYS), st.text(max_size=20),
                st.lists(st.sampled_from([*SECTIONS, "lr", "options", "x", "", "é", "ü"]), min_size=1, max_size=4)
                .map(".".join))


def _plausible(key: str):
    """Values of the field's own type (most of them valid): so that accepted configs are generated too."""
    obj, hint = Config(), None
    for part in key.split("."):
        hint, obj = typing.get_type_hints(type(obj))[part], getattr(obj, part)
    if typing.get_origin(hint) is typing.Literal:
        return st.sampled_from([str(c) for c in typing.get_args(hint)])
    if isinstance(obj, bool):
        return st.sampled_from(["true", "false"])
    if isinstance(obj, int):
        return st.integers(0, 200).map(str)
    if isinstance(obj, float):
        return st.floats(1e-4, 1.0).map(repr)
    if isinstance(obj, list):
        return st.sampled_from(["[]", "[8]", "[8, 8]", "[reach-v3, push-v3]", "[a]"])
    return st.sampled_from([repr(obj) if isinstance(obj, str) else "{}", "x"])


PLAIN_KEYS = [k for k in _keys(Config()) if k not in ("arch.method", "weighting.method", "domain")]
PLAUSIBLE = st.sampled_from(PLAIN_KEYS).flatmap(lambda k: _plausible(k).map(lambda v: f"{k}={v}"))
OVERRIDE = st.one_of(PLAUSIBLE, PLAUSIBLE,
                     st.tuples(KEY, VALUE).map(lambda kv: f"{kv[0]}={kv[1]}"),  # key=value
                     st.text(max_size=30),                                      # anything, '='-less included
                     st.sampled_from(["", "=", "==", "=1", " =1", "train.lr", "train.lr==1", ".=1", "..=1"]))


def _one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert "Traceback" not in err, err
    assert len(lines) == 1, err
    assert lines[0].startswith("error: "), err
    return lines[0]


def _accepted(cfg: Config) -> None:
    """What an accepted config must also do: round-trip through config.yaml's YAML, seed every generator."""
    assert config_from_dict(load_yaml_text(to_yaml(cfg))) == cfg
    seed_everything(cfg.seed)


@contextlib.contextmanager
def _empty_cwd():
    """A fresh temporary working directory; on exit, what the code under test left in it."""
    old = os.getcwd()
    with tempfile.TemporaryDirectory() as d:
        os.chdir(d)
        try:
            yield Path(d)
        finally:
            os.chdir(old)


def _files(d: Path) -> set[str]:
    return {str(p.relative_to(d)) for p in d.rglob("*")}


# ---- the override parser ------------------------------------------------------------------------------
@settings(settings.get_profile(PROFILE), max_examples=N * 5)
@given(config=st.sampled_from(CONFIGS), overrides=st.lists(OVERRIDE, max_size=4))
def test_generated_overrides_give_a_config_or_one_line(config, overrides):
    try:
        cfg = load_config(config, overrides)
    except ConfigError as e:
        assert str(e).strip(), "an empty error message"
        event("refused")
        return
    _accepted(cfg)
    event("accepted")


# ---- the YAML loader ----------------------------------------------------------------------------------
SECTION_BODY = st.dictionaries(st.one_of(st.sampled_from([k.split(".", 1)[1] for k in REAL_KEYS if "." in k]),
                                         st.text(max_size=8)),
                               VALUE.map(lambda v: _yaml_value(v)), max_size=4)


def _yaml_value(text: str):
    try:
        return load_yaml_text(text) if text.strip() else ""
    except (yaml.YAMLError, RecursionError):
        return text


MAPPING = st.dictionaries(st.one_of(st.sampled_from(SECTIONS + ["name", "seed", "domain", "device", "run_dir"]),
                                    st.text(max_size=8)),
                          st.one_of(SECTION_BODY, VALUE.map(_yaml_value)), max_size=5)


def _dump(d) -> str:
    try:
        return yaml.safe_dump(d, sort_keys=False, allow_unicode=True)
    except yaml.YAMLError:
        return str(d)


FILE_TEXT = st.one_of(MAPPING.map(_dump), st.text(max_size=200), YAMLISH, NESTED,
                      st.binary(max_size=60).map(lambda b: b.decode("latin-1")))
# base: another generated file, itself, a shipped config, a missing one, or not a name at all
BASE = st.one_of(st.none(), st.sampled_from(["@next", "@self", "mt10_quick", "glue_hps", "mt10_quik", "missing.yaml"]),
                 st.integers(), st.lists(st.text(max_size=3), max_size=2), st.just({"a": 1}))


@settings(settings.get_profile(PROFILE), max_examples=N * 3)
@given(texts=st.lists(st.tuples(FILE_TEXT, BASE), min_size=1, max_size=3), as_bytes=st.booleans())
def test_generated_yaml_files_give_a_config_or_one_line(texts, as_bytes):
    with _empty_cwd() as d:
        paths = [d / f"c{i}.yaml" for i in range(len(texts))]
        for i, (text, base) in enumerate(texts):
            if base is not None:
                ref = {"@next": f"./{paths[(i + 1) % len(paths)].name}", "@self": f"./{paths[i].name}"}.get(base, base) \
                    if isinstance(base, str) else base
                text = _dump({"base": ref}) + text if not text.lstrip().startswith(("-", "[", "{", "%", "!")) else text
            paths[i].write_bytes(text.encode("latin-1" if as_bytes else "utf-8", "surrogatepass" if not as_bytes
                                             else "replace"))
        before = _files(d)
        try:
            cfg = load_config(str(paths[0]))
        except ConfigError as e:
            assert str(e).strip()
            event("refused")
        else:
            _accepted(cfg)
            event("accepted")
        assert _files(d) == before


# ---- the CLI's arguments ------------------------------------------------------------------------------
class _WouldRun(Exception):
    """A sweep that passed every check: the test stops it before any trial starts."""


def _cli(argv: list[str]) -> tuple[int | str, str]:
    """``mtrl-arch ARGV`` in this process: its exit code ("ran" for a sweep that would start) and stderr."""
    err, out = io.StringIO(), io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out), \
            mock.patch.object(sweep, "_Local", side_effect=_WouldRun), mock.patch.object(sweep, "_Ray", side_effect=_WouldRun):
        try:
            rc: int | str = main(argv)
        except SystemExit as e:
            rc = e.code if isinstance(e.code, int) else 2
        except _WouldRun:
            rc = "ran"
    return rc, err.getvalue()


FLAG = st.sampled_from(["--no-progress", "--dry-run", "--resume", "--debug", "--json", "--episodes", "--seeds",
                        "--out", "--runner", "--trial-timeout", "--cpus-per-trial", "-h", "--", "-x", "--bogus"])
PATHISH = st.one_of(st.sampled_from(["run", "nowhere", ".", "..", "c.yaml", "run/../run", "", "-"]),
                    st.text(max_size=12))
CONFIG_ARG = st.one_of(st.sampled_from(CONFIGS), st.sampled_from(["mt10_quik", "c.yaml", "missing.yaml", "."]),
                       st.text(max_size=10))


@st.composite
def cli_argv(draw) -> tuple[str, list[str]]:
    verb = draw(st.sampled_from(["train", "eval", "arch", "report", "sweep"]))
    if verb == "train":
        head = ["train", "--dry-run", draw(CONFIG_ARG)]
        tail = draw(st.lists(st.one_of(OVERRIDE, FLAG), max_size=4))
        if draw(st.booleans()):
            tail.append("run_dir=run")
        if draw(st.booleans()):  # shrink any MT-SAC or GLUE network (a later override wins)
            tail.append("model.hidden=[8]")
        argv = head + tail
    elif verb == "sweep":
        grid = draw(st.lists(st.one_of(st.tuples(st.sampled_from(REAL_KEYS), st.lists(VALUE, min_size=1, max_size=3))
                                       .map(lambda kv: f"{kv[0]}={','.join(kv[1])}"), OVERRIDE), max_size=3))
        argv = ["sweep", draw(CONFIG_ARG), *grid, *draw(st.lists(st.one_of(FLAG, PATHISH), max_size=3)),
                "--out", "sweep-out"]
    else:
        argv = [verb, draw(PATHISH), *draw(st.lists(st.one_of(FLAG, PATHISH, st.integers(-3, 3).map(str)), max_size=3))]
    if draw(st.integers(0, 9)) == 0:
        argv = draw(st.permutations(argv))
    return verb, argv


@settings(settings.get_profile(PROFILE), max_examples=N * 2)
@given(verb_argv=cli_argv(), run_yaml=st.one_of(st.none(), FILE_TEXT, MAPPING.map(_dump)), config_yaml=FILE_TEXT)
def test_generated_cli_arguments_exit_0_or_2_with_one_line(verb_argv, run_yaml, config_yaml):
    verb, argv = verb_argv
    with _empty_cwd() as d:
        (d / "c.yaml").write_text(config_yaml, encoding="utf-8", errors="surrogatepass")
        if run_yaml is not None:  # a run directory whose config.yaml is generated
            (d / "run").mkdir()
            (d / "run" / "config.yaml").write_text(run_yaml, encoding="utf-8", errors="surrogatepass")
        before = _files(d)
        rc, err = _cli(argv)
        event(f"{verb}: exit {rc}")
        if rc == 2:
            _one_error_line(err)
        else:
            assert rc in (0, "ran"), (rc, err)
            assert "Traceback" not in err
        assert _files(d) == before, f"{argv} left {sorted(_files(d) - before)}"


# ---- what the generators found (each was a traceback), and the same in a fresh process -----------------
FOUND = {
    "usage error": (["train", "--bogus"], "unrecognized arguments: --bogus"),
    "usage error, subcommand": (["eval"], "the following arguments are required: run_dir"),
    "base cycle": (["train", "--dry-run", "self.yaml"], "extends itself"),
    "base not a name": (["train", "--dry-run", "list.yaml"], "base must be a config name or YAML path"),
    "not UTF-8": (["train", "--dry-run", "latin1.yaml"], "is not a text file"),
    "nested too deeply": (["train", "--dry-run", "mt10_quick", "train.lr=" + "[" * 3000 + "]" * 3000], "nests too deeply"),
    "unknown activation": (["train", "--dry-run", "mt10_quick", "model.activation=foo"], "model.activation must be one of"),
    "huge width": (["train", "--dry-run", "mt10_quick", "model.hidden=[100000000000]"], "at most 32768"),
    "seed numpy cannot take": (["train", "--dry-run", "mt10_quick", "seed=-1"], "seed must be in [0, 2^32)"),
    "long run_dir": (["train", "--dry-run", "mt10_quick", "run_dir=" + "b" * 300], "longer than a file name"),
    "method option range": (["train", "--dry-run", "mt10_ltb", "arch.options.total_steps=0"],
                            "arch.options.total_steps and arch.options.epochs must be >= 1"),
}


def _found_files(d: Path) -> None:
    (d / "self.yaml").write_text("base: ./self.yaml\n")
    (d / "list.yaml").write_text("base: [a]\n")
    (d / "latin1.yaml").write_bytes("name: caf\xe9\n".encode("latin-1"))


@pytest.mark.parametrize("case", list(FOUND))
def test_found_cases_exit_2_one_line(case):
    argv, expected = FOUND[case]
    with _empty_cwd() as d:
        _found_files(d)
        before = _files(d)
        rc, err = _cli(argv)
        assert rc == 2 and expected in _one_error_line(err), err
        assert _files(d) == before


@pytest.mark.parametrize("case", ["usage error, subcommand", "base cycle", "seed numpy cannot take"])
def test_found_cases_in_a_fresh_process(case):
    argv, expected = FOUND[case]
    with _empty_cwd() as d:
        _found_files(d)
        r = subprocess.run([sys.executable, "-m", "mtrl_arch.cli", *argv], capture_output=True, text=True, timeout=120,
                           env={**os.environ, "PYTHONWARNINGS": "ignore"})
        assert r.returncode == 2, r.stderr
        assert r.stderr.strip().splitlines() == [_one_error_line(r.stderr)] and expected in r.stderr
        assert _files(d) == {"self.yaml", "list.yaml", "latin1.yaml"}
