"""Width matching (``model.match_params``, ``agent.critic_match_params``): HPS made wider or STL narrower to a
trunk of N parameters. Known answers: closed-form MLP trunks against the pick, ties to the narrower width,
and per backbone (MLP, LeNet, ResNet-18, transformer) the picked width closer to N than its neighbours."""
from __future__ import annotations

import pytest
import yaml

from envs.backbones import classification_heads, lenet_sizes, lenet_stages, resnet18_stages, transformer_stages
from mtrl_arch.agents.sac import actor_spec, critic_spec
from mtrl_arch.build import match_rl_widths
from mtrl_arch.cli import main
from mtrl_arch.config import ConfigError, load_config
from mtrl_arch.search import TrunkSpec
from mtrl_arch.search.width import fixed_trunk_params, match_width

TASKS = ("reach-v3", "push-v3", "pick-place-v3")
OBS, ACT = 39 + len(TASKS), 4


def mlp_trunk(n_in: int, widths: list[int]) -> int:
    """One MLP trunk: sum over layers of in*out + out."""
    dims = [n_in, *widths]
    return sum(dims[i] * dims[i + 1] + dims[i + 1] for i in range(len(widths)))


def closest(count, target: int, widths) -> int:
    """Brute force: the width whose count is closest to target, ties to the smaller."""
    return min(widths, key=lambda w: (abs(count(w) - target), w))


@pytest.mark.parametrize("method, copies", [("hps", 1), ("stl", len(TASKS))])
@pytest.mark.parametrize("target", [1, 5_000, 123_456, 1_000_000])
def test_mlp_pick_is_the_closed_form_closest(method: str, copies: int, target: int) -> None:
    def closed(w: int) -> int:  # HPS: one trunk; STL: one per task
        return copies * mlp_trunk(OBS, [w, w, w])

    width, count = match_width(lambda w: fixed_trunk_params(method, actor_spec(TASKS, OBS, ACT, [w] * 3)), target,
                               "model.hidden")
    assert width == closest(closed, target, range(1, 2000)) and count == closed(width)


def test_ties_go_to_the_narrower_width_and_an_unreachable_target_is_refused() -> None:
    assert match_width(lambda w: 10 * w, 25, "w") == (2, 20)  # 20 and 30 are both 5 away
    assert match_width(lambda w: 10 * w, 26, "w") == (3, 30)
    assert match_width(lambda w: 10 * w, 3, "w") == (1, 10)   # the narrowest width when it is already above
    assert match_width(lambda w: 10 * w, 60, "w", step=4) == (4, 40)  # widths 4, 8: 40 and 80 tie
    assert match_width(lambda w: 10 * w, 61, "w", step=4) == (8, 80)
    with pytest.raises(ConfigError, match="no w up to") as e:
        match_width(lambda w: min(w, 100), 1000, "w")
    assert "\n" not in str(e.value)


def neighbours_are_farther(count, target: int, width: int, step: int = 1) -> None:
    own = abs(count(width) - target)
    assert own <= abs(count(width + step) - target)
    if width > step:
        assert own < abs(count(width - step) - target)  # strictly: ties go to the narrower


@pytest.mark.parametrize("backbone", ["mlp_critic_stl", "lenet", "resnet18", "transformer"])
def test_each_backbone_picks_the_width_closest_to_the_target(backbone: str) -> None:
    tasks = ("a", "b")
    if backbone == "mlp_critic_stl":  # both members of the twin critic, one trunk per task
        def count(w): return fixed_trunk_params("stl", critic_spec(tasks, OBS, ACT, [w, w]))
        target, step = 200_000, 1
        assert count(50) == 2 * 2 * mlp_trunk(OBS + ACT, [50, 50])
    elif backbone == "lenet":
        def count(w): return fixed_trunk_params("hps", TrunkSpec(tasks, lenet_stages(w), classification_heads(lenet_sizes(w)[2], 10)))
        target, step = 40_000, 0.1  # between width 1 (30,890) and width 2 (121,780): tenths of the multiplier
    elif backbone == "resnet18":
        def count(w): return fixed_trunk_params("stl", TrunkSpec(tasks, resnet18_stages(1, w), classification_heads(100, 10)))
        target, step = 3_000_000, 1
    else:  # d_model in multiples of the 4 heads
        def count(w): return fixed_trunk_params("hps", TrunkSpec(tasks, transformer_stages(500, w, 4, 256, 2),
                                                                 classification_heads(w, 2)))
        target, step = 300_000, 4
    width, n = match_width(count, target, "width", step)
    assert abs(width / step - round(width / step)) < 1e-9 and n == count(width)
    neighbours_are_farther(count, target, width, step)


def test_rl_widths_are_written_to_the_config_and_shown_by_the_dry_run(capsys, tmp_path, monkeypatch) -> None:
    over = ["env.tasks=[reach-v3,push-v3,pick-place-v3]", "arch.critic.method=stl", "model.match_params=50000",
            "agent.critic_match_params=200000"]
    cfg = load_config("mt10_hps", over)
    match_rl_widths(cfg)
    actor = closest(lambda w: mlp_trunk(OBS, [w] * 3), 50_000, range(1, 500))
    critic = closest(lambda w: 2 * 3 * mlp_trunk(OBS + ACT, [w] * 3), 200_000, range(1, 500))
    assert cfg.model.hidden == [actor] * 3 and cfg.agent.critic_hidden == [critic] * 3
    monkeypatch.chdir(tmp_path)
    capsys.readouterr()
    assert main(["train", "mt10_hps", *over, "--dry-run"]) == 0
    cfg_doc, counts_doc = yaml.safe_load_all(capsys.readouterr().out)
    assert cfg_doc["model"]["hidden"] == [actor] * 3 and cfg_doc["agent"]["critic_hidden"] == [critic] * 3
    assert counts_doc["trees"]["actor"]["derive"]["params"]["trunk"] == mlp_trunk(OBS, [actor] * 3)
    assert counts_doc["trees"]["critic"]["derive"]["params"]["trunk"] == 6 * mlp_trunk(OBS + ACT, [critic] * 3)
    assert counts_doc["parameters"]["critic"]["specific"] == 6 * mlp_trunk(OBS + ACT, [critic] * 3)


def test_supervised_width_is_written_back_and_searching_methods_are_refused(capsys, tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    capsys.readouterr()
    base = ["model.backbone=lenet", "data.root=/nonexistent"]
    assert main(["train", "multi_fashion_mnist_stl", *base, "model.match_params=100000", "--dry-run"]) == 0
    cfg_doc, counts_doc = yaml.safe_load_all(capsys.readouterr().out)

    def stl(w): return fixed_trunk_params("stl", TrunkSpec(("a", "b"), lenet_stages(w), classification_heads(lenet_sizes(w)[2], 10)))

    width = cfg_doc["model"]["options"]["width"]
    assert width == closest(stl, 100_000, [k / 10 for k in range(1, 100)]) and counts_doc["trees"]["trunk"]["derive"]["params"]["trunk"] == stl(width)
    for argv, msg in [(["multi_fashion_mnist_conal", *base, "model.match_params=1000"],
                       "error: model.match_params sizes a network under a tree known before training"),
                      (["multi_fashion_mnist_hps", *base, "agent.critic_match_params=1000"],
                       "error: agent.critic_match_params applies to RL runs"),
                      (["multi_fashion_mnist_hps", *base, "model.match_params=-1"], "error: model.match_params must be >= 0")]:
        assert main(["train", *argv, "--dry-run"]) == 2
        err = capsys.readouterr().err
        assert err.startswith(msg) and err.count("\n") == 1
    assert list(tmp_path.iterdir()) == []


def test_glue_transformer_width_is_matched_once_the_vocabulary_is_known(tmp_path) -> None:
    """End to end on real GLUE text (tiny): config.yaml shows the matched d_model, arch.json its trunk count."""
    import json

    from data_roots import data_overrides

    from envs.supervised_common import _spec

    run = tmp_path / "run"
    over = [*data_overrides("glue"), "data.tasks=[CoLA,SST-2]", "data.options.train_subset=24",
            "data.options.eval_subset=8", "data.options.vocab_size=200", "data.options.max_len=16",
            "model.options.d_ff=32", "model.options.n_layers=1", "model.options.n_heads=2", "model.match_params=20000",
            "train.epochs=1", "train.limit_batches=1", "eval.limit_batches=1", "train.batch_size=4", "eval.batch_size=8",
            "wandb.mode=disabled", "data.num_workers=0"]
    assert main(["train", "glue_stl", *over, f"run_dir={run}", "--no-progress"]) == 0
    d_model = yaml.safe_load((run / "config.yaml").read_text())["model"]["options"]["d_model"]
    trunk = json.loads((run / "arch.json").read_text())["networks"]["trunk"]["derive"]["params"]["trunk"]
    vocab = yaml.safe_load((run / "config.yaml").read_text())["run"]["data"]["vocab_size"]
    cfg = load_config("glue_stl", over)

    def count(w):
        return fixed_trunk_params("stl", _spec(("CoLA", "SST-2"), transformer_stages(vocab, w, 2, 32, 1, 16, 0.1),
                                               classification_heads(w, 2), cfg))

    assert d_model % 2 == 0 and trunk == count(d_model)
    neighbours_are_farther(count, 20_000, d_model, 2)


def test_lenet_hps_matched_between_the_integer_widths_known_answer(capsys, tmp_path, monkeypatch) -> None:
    """HPS LeNet sized to 37,000: width 1.1 (conv 1->11, 11->22, fc 550->55) has 902 + 6,072 + 30,305 = 37,279
    trunk parameters; width 1.0 has 30,890 and 1.2 has 44,268, both farther."""
    monkeypatch.chdir(tmp_path)
    capsys.readouterr()
    assert main(["train", "multi_fashion_hps", "model.backbone=lenet", "data.root=/nonexistent", "model.match_params=37000",
                 "--dry-run"]) == 0
    cfg_doc, counts_doc = yaml.safe_load_all(capsys.readouterr().out)
    assert cfg_doc["model"]["options"]["width"] == 1.1
    assert counts_doc["trees"]["trunk"]["derive"]["params"]["trunk"] == 902 + 6_072 + 30_305
