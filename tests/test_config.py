"""Configs: overrides are parsed as users type them, and checked before anything runs."""
from __future__ import annotations

import pytest

from mtrl_arch.config import ConfigError, load_config, parse_value


@pytest.mark.parametrize("text, value", [("3e-4", 3e-4), ("1e20", 1e20), ("1.0e20", 1e20), ("-2E-3", -2e-3), (".5", 0.5),
                                         ("1.0e+20", 1e20), ("2.5", 2.5), ("1_000.5", 1000.5), ("5", 5), ("[1e-3, 2]", [1e-3, 2])])
def test_every_python_float_literal_is_a_number(text, value) -> None:
    got = parse_value(text)
    assert got == value and type(got) is type(value)


@pytest.mark.parametrize("text", ["1e", "e5", "abc", "3e-4x", "1.2.3"])
def test_words_that_are_not_numbers_stay_strings(text) -> None:
    assert parse_value(text) == text


def test_rl_users_type_3e_minus_4() -> None:
    c = load_config("mt10_hps", ["agent.lr=3e-4", "agent.adam_eps=1e-8", "train.total_env_steps=4e5"])
    assert (c.agent.lr, c.agent.adam_eps, c.train.total_env_steps) == (3e-4, 1e-8, 400_000)
    with pytest.raises(ConfigError, match="agent.adam_eps must be positive"):
        load_config("mt10_hps", ["agent.adam_eps=0"])
    with pytest.raises(ConfigError, match="model.init must be one of torch, he_uniform"):
        load_config("mt10_hps", ["model.init=xavier"])
