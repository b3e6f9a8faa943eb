"""Issue 16: the main config and every options block (method, weighting, data, model, bench) follow one set
of value rules (:mod:`mtrl_arch.options`), checked through the real entry points before anything runs."""
from __future__ import annotations

import dataclasses
from typing import Literal

import pytest

from mtrl_arch import bench
from mtrl_arch.cli import main
from mtrl_arch.config import ConfigError
from mtrl_arch.options import coerce, parse_options

# block -> (argv with an integer option set to {v}, that option's name in errors, a misspelt key, its fix)
BLOCKS = {
    "config": (["train", "multi_fashion_mnist_hps", "--dry-run", "train.epochs={v}"], "train.epochs",
               "train.epoch=1", "did you mean train.epochs?"),
    "arch.options": (["train", "mt10_conal", "--dry-run", "arch.options.arch_every={v}"], "arch.options.arch_every",
                     "arch.options.arch_evry=1", "did you mean arch.options.arch_every?"),
    "weighting.options": (["train", "mt10_quick", "--dry-run", "weighting=cagrad", "weighting.options.rescale={v}"],
                          "weighting.options.rescale", "weighting.options.rescal=1", "did you mean weighting.options.rescale?"),
    "data.options": (["train", "multi_fashion_mnist_hps", "--dry-run", "data.options.train_subset={v}"],
                     "data.options.train_subset", "data.options.train_subsett=1", "did you mean data.options.train_subset?"),
    "model.options": (["train", "multi_fashion_mnist_hps", "--dry-run", "model.options.width={v}"], "model.options.width",
                      "model.options.widht=1", "did you mean model.options.width?"),
    "bench": (["bench", "trunk", "reps={v}"], "bench trunk reps", "rep=1", "did you mean reps?"),
}


def _run(capsys, argv: list[str], tmp_path) -> tuple[int, list[str]]:
    if argv[0] == "train":
        argv = [*argv, f"run_dir={tmp_path / 'run'}"]
    rc = main(argv)
    return rc, capsys.readouterr().err.strip().splitlines()


@pytest.mark.parametrize("value, got", [("2.5", "2.5"), ("true", "True"), ("abc", "'abc'"), ("[2]", "[2]")])
@pytest.mark.parametrize("block", list(BLOCKS))
def test_an_integer_option_refuses_a_non_integer_in_one_line_exit_2(block, value, got, capsys, tmp_path) -> None:
    argv, key, _, _ = BLOCKS[block]
    rc, err = _run(capsys, [a.format(v=value) for a in argv], tmp_path)
    assert rc == 2 and err == [f"error: {key} must be an integer; got {got}"]
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("block", list(BLOCKS))
def test_an_unknown_option_names_the_block_the_nearest_key_and_the_valid_ones(block, capsys, tmp_path) -> None:
    argv, _, typo, hint = BLOCKS[block]
    rc, err = _run(capsys, [*(a for a in argv if "{v}" not in a), typo], tmp_path)
    assert rc == 2 and len(err) == 1 and err[0].startswith("error: unknown ")
    assert hint in err[0] and "(valid here: " in err[0] and "Traceback" not in err[0]


@pytest.mark.parametrize("block", [b for b in BLOCKS if b != "bench"])
def test_an_integer_option_takes_an_int_or_an_integral_float(block, capsys, tmp_path) -> None:
    argv, _, _, _ = BLOCKS[block]
    for value in ("2", "2.0"):
        rc, err = _run(capsys, [a.format(v=value) for a in argv], tmp_path)
        assert rc == 0, err


def test_bench_options_are_coerced_before_the_benchmark_runs() -> None:
    seen = []
    probe = {"probe": (bench.TrunkOptions, lambda o: seen.append(o) or {"options": dataclasses.asdict(o)})}
    bench.main("probe", True, ["reps=3.0", "width=8", "pro=false", "pro_tasks=4"], probe)
    assert seen[0].reps == 3 and type(seen[0].reps) is int and seen[0].pro is False and seen[0].pro_tasks == [4]
    with pytest.raises(ConfigError, match="^bench probe options are key=value; got 'reps'$"):
        bench.main("probe", True, ["reps"], probe)
    assert len(seen) == 1  # nothing ran for the refused options


@dataclasses.dataclass
class _Every:
    n: int = 0
    x: float = 0.0
    flag: bool = False
    name: str = ""
    sizes: list = dataclasses.field(default_factory=list)
    pair: tuple = (0, 0)
    mode: Literal["a", "b"] = "a"
    either: bool | Literal["auto"] = "auto"


RULES = {  # field: [(value, coerced)] accepted; then refused values
    "n": ([(2, 2), (2.0, 2), (1e6, 1_000_000)], [2.5, True, "2", None]),
    "x": ([(1, 1.0), (3e-4, 3e-4), (float("inf"), float("inf"))], [True, "0.1", None]),
    "flag": ([(True, True), (False, False)], [1, 0, "yes", None]),
    "name": ([("s", "s"), (2, "2")], [True, None, [1]]),
    "sizes": ([([1, 2], [1, 2]), (3, [3]), ((4,), [4]), (None, [])], []),
    "pair": ([([1, 2], (1, 2)), (3, (3,))], []),
    "mode": ([("b", "b")], ["c", None]),
    "either": ([(True, True), ("auto", "auto")], ["yes", 1.5]),
}


@pytest.mark.parametrize("name", list(RULES))
def test_the_value_rules(name) -> None:
    ok, bad = RULES[name]
    for value, want in ok:
        got = getattr(parse_options(_Every, {name: value}, "x.options"), name)
        assert got == want and type(got) is type(want), (value, got)
    for value in bad:
        with pytest.raises(ConfigError, match=rf"^x\.options\.{name} (must be|has the wrong type)"):
            parse_options(_Every, {name: value}, "x.options")


def test_the_main_config_uses_the_same_coercion() -> None:
    from mtrl_arch import config

    assert config.coerce is coerce and config.parse_options is parse_options
    assert parse_options(_Every, None, "x.options") == _Every()
    with pytest.raises(ConfigError, match="^x.options must be a mapping of options; got 3$"):
        parse_options(_Every, 3, "x.options")
