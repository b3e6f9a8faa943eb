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
    c = load_config("mt10_hps", ["train.lr=3e-4", "agent.adam_eps=1e-8", "train.total_env_steps=4e5"])
    assert (c.train.lr, c.agent.adam_eps, c.train.total_env_steps) == (3e-4, 1e-8, 400_000)
    with pytest.raises(ConfigError, match="agent.adam_eps must be positive"):
        load_config("mt10_hps", ["agent.adam_eps=0"])
    with pytest.raises(ConfigError, match="model.init must be one of torch, he_uniform"):
        load_config("mt10_hps", ["model.init=xavier"])


# ---- one key per concern (issue 16) -------------------------------------------------------------
RENAMED = {"agent.lr=3e-4": "agent.lr was renamed train.lr",
           "agent.grad_clip=1.0": "agent.grad_clip was renamed train.grad_clip",
           "agent.amp=true": "agent.amp was renamed train.amp",
           "agent.compile=true": "agent.compile was renamed train.compile",
           "agent.compile_mode=default": "agent.compile_mode was renamed train.compile_mode",
           "train.checkpoint_every=5": "train.checkpoint_every was renamed: train.checkpoint_every_env_steps in RL "
                                       "runs, train.checkpoint_every_epochs in supervised runs"}


@pytest.mark.parametrize("override", list(RENAMED))
def test_old_keys_name_their_new_key_exit_2(override, tmp_path, capsys) -> None:
    from mtrl_arch.cli import main

    section, rest = override.split(".", 1)
    key, value = rest.split("=")
    as_file = tmp_path / "old.yaml"  # a config file with the old key says the same
    as_file.write_text(f"base: mt10_quick\n{section}:\n  {key}: {value}\n")
    for argv in (["mt10_quick", override], [str(as_file)]):
        assert main(["train", *argv, f"run_dir={tmp_path / 'run'}"]) == 2
        err = capsys.readouterr().err
        assert err == f"error: {RENAMED[override]}\n", err
    assert not (tmp_path / "run").exists()


def test_lr_and_grad_clip_default_per_domain(tmp_path) -> None:
    rl, sup = load_config(None, []), load_config(None, ["domain=supervised"])
    assert (rl.train.lr, rl.train.grad_clip, sup.train.lr, sup.train.grad_clip) == (3e-4, 1.0, 1e-4, 5.0)
    f = tmp_path / "sup.yaml"  # the domain may come from a file; a file's or override's value still wins
    f.write_text("domain: supervised\ntrain:\n  grad_clip: 0.5\n")
    c = load_config(str(f), ["train.lr=0.01"])
    assert (c.train.lr, c.train.grad_clip) == (0.01, 0.5)
    assert load_config(str(f), ["domain=rl"]).train.lr == 3e-4  # the last word on the domain picks the defaults


def test_checkpoint_cadence_of_the_other_domain_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"^train.checkpoint_every_epochs does not apply to rl runs; "
                                          r"set train.checkpoint_every_env_steps$"):
        load_config("mt10_quick", ["train.checkpoint_every_epochs=1"])
    with pytest.raises(ConfigError, match="train.checkpoint_every_env_steps does not apply to supervised runs"):
        load_config("multi_fashion_mnist_hps", ["train.checkpoint_every_env_steps=1000"])
    assert load_config("mt10_quick").train.checkpoint_every_env_steps == 20_000


def test_a_record_written_before_the_renames_reads_under_the_new_names() -> None:
    """A run's config.yaml (or a saved model) from before issue 16 still resumes and reports."""
    from mtrl_arch.config import config_from_dict

    rl = load_config("mt10_quick").to_dict()
    t = rl["train"]
    old_rl = {**rl, "train": {**{k: v for k, v in t.items() if not k.startswith("checkpoint_every")},
                              "lr": 1e-4, "grad_clip": 5.0, "checkpoint_every": 20_000},  # the unused supervised values
              "agent": {**rl["agent"], "lr": 1e-3, "grad_clip": 2.0, "amp": False, "compile": True,
                        "compile_mode": "default"}}
    c = config_from_dict(old_rl)
    assert (c.train.lr, c.train.grad_clip, c.train.compile, c.train.checkpoint_every_env_steps) == (1e-3, 2.0, True, 20_000)
    sup = load_config("multi_fashion_mnist_hps").to_dict()
    old_sup = {**sup, "train": {**{k: v for k, v in sup["train"].items() if not k.startswith("checkpoint_every")},
                                "checkpoint_every": 2},
               "agent": {**sup["agent"], "lr": 3e-4, "grad_clip": 1.0}}  # unused RL values: dropped
    c = config_from_dict(old_sup)
    assert (c.train.lr, c.train.grad_clip, c.train.checkpoint_every_epochs) == (0.1, 0.0, 2)


def test_a_run_written_before_alpha_update_existed_keeps_stepping_alpha_last() -> None:
    """Resuming an old run must not change its update order mid-run; new runs take the reference's order."""
    from mtrl_arch.config import config_from_dict
    d = load_config("mt10_quick").to_dict()
    assert d["agent"]["alpha_update"] == "first"
    del d["agent"]["alpha_update"]
    assert config_from_dict(d).agent.alpha_update == "last"
