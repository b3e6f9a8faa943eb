"""Files never run code (issue 25): every loader refuses a file whose pickle would run code, in one line.

Each test plants a pickle that creates a marker file when unpickled with full pickle, where a loader reads:
``eval``'s ``model.pt`` (MT-SAC, the SB3 baseline, supervised), ``train --resume``'s checkpoint (a valid
header and checksum over the payload), ``MTSAC.load``, and the SB3 zips inside checkpoints and models
(a cloudpickled value in SB3's JSON ``data``). The load must be refused (exit 2 with one line naming the file
and ``--trust-file``, or :class:`UntrustedFileError`) and the marker must not exist. Where cheap, the same
payload loaded with the opt-in does create the marker: the payload is live, so its absence means something.

Also: format 1 checkpoints (numpy arrays in the payload) load under the allow-list, which format 2 refuses;
a checkpoint written by mtrl-arch at b42022a (``tests/fixtures/checkpoint_v1``: MT-SAC on reach-v3, 8x8
networks, stopped mid-episode at env step 75) resumes without any flag. About 40 s on one core.
"""
from __future__ import annotations

import base64
import contextlib
import io
import json
import pickle
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

import mtrl_arch.checkpoint as C
from mtrl_arch.cli import main
from mtrl_arch.config import load_config
from mtrl_arch.run import resume_key, write_run_info
from mtrl_arch.safe_load import UntrustedFileError, restricted_unpickle, torch_load

FIXTURE_V1 = Path(__file__).resolve().parent / "fixtures" / "checkpoint_v1"
RL = ["mt10_quick", "env.tasks=[reach-v3]", "env.max_episode_steps=50", "model.hidden=[8,8]", "agent.buffer_size=100",
      "train.warmup_steps=50", "train.total_env_steps=100", "eval.every_env_steps=0", "eval.final_episodes_per_task=1",
      "wandb.mode=disabled", "device=cpu"]
SB3 = ["mt10_stl_sb3", "env.tasks=[reach-v3]", "env.max_episode_steps=50", "model.hidden=[8,8]", "agent.buffer_size=100",
       "train.warmup_steps=50", "train.total_env_steps=100", "agent.batch_per_task=8", "wandb.mode=disabled", "device=cpu"]

pytestmark = pytest.mark.usefixtures("one_thread")


class Payload:
    """Unpickled with full pickle, creates ``marker`` (as a real attack would run any command)."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


@pytest.fixture
def marker(tmp_path) -> Path:
    return tmp_path / "MARKER"


def run_dir_of(tmp_path: Path, overrides: list[str], name: str = "run") -> Path:
    """A run directory with the config.yaml that `mtrl-arch train` writes for ``overrides``, and nothing else."""
    d = tmp_path / name
    write_run_info(d, load_config(overrides[0], overrides[1:]))
    return d


def refused(capsys, rc: int, path: Path | str) -> str:
    """Exit 2 and one line naming ``path``, saying the file is not mtrl-arch's, naming the opt-in."""
    err = capsys.readouterr().err
    assert rc == 2, err
    assert err.count("\n") == 1 and err.startswith("error: ") and "Traceback" not in err, err
    assert str(path) in err and "is not a file mtrl-arch wrote" in err and "--trust-file" in err, err
    return err


def sb3_zip(**serialized) -> bytes:
    """A stable-baselines3 SAC zip of the reach-v3 baseline, with ``serialized`` put cloudpickled into its data."""
    import cloudpickle
    from stable_baselines3 import SAC

    from mtrl_arch.agents.sb3_baseline import _sac_kwargs, _zip
    from mtrl_arch.envs.metaworld import make_task_env

    cfg = load_config(SB3[0], SB3[1:])
    env = make_task_env("MT10", "reach-v3", 0, 50)
    z = _zip(SAC("MlpPolicy", env, **_sac_kwargs(cfg, 1, "cpu")))
    env.close()
    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(z)) as src, zipfile.ZipFile(out, "w") as dst:
        for item in src.namelist():
            raw = src.read(item)
            if item == "data":
                data = json.loads(raw)
                for k, v in serialized.items():
                    data[k] = {":type:": "<class 'object'>", ":serialized:": base64.b64encode(cloudpickle.dumps(v)).decode()}
                raw = json.dumps(data).encode()
            dst.writestr(item, raw)
    return out.getvalue()


# ---- the loaders ------------------------------------------------------------------------------------------
def test_eval_refuses_a_model_whose_pickle_runs_code(tmp_path, marker, capsys):
    d = run_dir_of(tmp_path, RL)
    torch.save({"format": "mtrl-arch/mtsac", "version": 1, "state": Payload(marker)}, d / "model.pt")
    refused(capsys, main(["eval", str(d)]), d / "model.pt")
    assert not marker.exists()
    assert (d / "model.pt").is_file()  # the file is kept, for the user to inspect


def test_resume_refuses_a_checkpoint_with_a_valid_checksum_whose_pickle_runs_code(tmp_path, marker, capsys):
    """The SHA-256 holds (anyone can compute it): the checkpoint is refused, neither run nor skipped as damaged."""
    d = run_dir_of(tmp_path, RL)
    cfg = load_config(RL[0], RL[1:])
    path = C.save_checkpoint(d / "checkpoints", 50, {"agent": Payload(marker), "meta": resume_key(cfg)},
                             meta=resume_key(cfg))
    C.read_header(path)  # a valid header
    refused(capsys, main(["train", "--resume", str(d), "--no-progress"]), path)
    assert not marker.exists()
    assert path.is_file() and not list(d.glob("checkpoints/*.damaged"))  # not quarantined as damaged: kept as it was
    refused(capsys, main(["eval", str(d)]), path)  # eval reads the checkpoint when there is no model.pt
    assert not marker.exists()
    with pytest.raises(UntrustedFileError):
        C.load_latest(d / "checkpoints")
    # the opt-in loads it with full pickle: the payload is live
    C.read_checkpoint(path, trust_file=True)
    assert marker.exists()


def test_mtsac_load_refuses_and_trust_file_opts_in(tmp_path, marker):
    from mtrl_arch.agents.sac import MTSAC

    path = tmp_path / "model.pt"
    torch.save({"format": "mtrl-arch/mtsac", "version": 1, "tasks": [Payload(marker)]}, path)
    with pytest.raises(UntrustedFileError, match="io.open") as e:
        MTSAC.load(str(path))
    assert "\n" not in str(e.value) and str(path) in str(e.value)
    assert not marker.exists()
    with contextlib.suppress(Exception):  # what it holds is no agent; it was unpickled all the same
        MTSAC.load(str(path), trust_file=True)
    assert marker.exists()


def test_mtsac_round_trip_loads_without_the_opt_in(tmp_path):
    """What MTSAC.save writes is plain data: it loads weights-only, and the agent acts as the saved one."""
    from mtrl_arch.agents.sac import MTSAC

    cfg = load_config(RL[0], RL[1:])
    a = MTSAC(("reach-v3",), 40, 4, cfg, "cpu")
    a.save(str(tmp_path / "m.pt"))
    b = MTSAC.load(str(tmp_path / "m.pt"))
    obs = np.random.default_rng(0).standard_normal((1, 40)).astype(np.float32)
    assert np.array_equal(a.act(obs, deterministic=True), b.act(obs, deterministic=True))


def test_sb3_resume_refuses_cloudpickled_values_in_the_checkpoints_zip(tmp_path, marker, capsys):
    """The baseline's resume: a checkpoint (valid checksum) whose SB3 zip cloudpickles a payload, as the last
    observation (read, in format 1, with numpy's array types alone) or as a value mtrl-arch does not know."""
    d = run_dir_of(tmp_path, SB3)
    cfg = load_config(SB3[0], SB3[1:])
    for key in ("_last_obs", "something_else"):
        agent = {"zip": sb3_zip(**{key: Payload(marker)}), "rng": C.rng_state(), "action_space_rng": {},
                 "env": {"at_reset": None, "actions": None, "rng": []}}
        state = {"algo": "sb3_stl", "tasks": ["reach-v3"], "pos": 0, "last_eval": {}, "rng": C.rng_state(),
                 "agents": {"reach-v3": agent}, "meta": resume_key(cfg)}
        path = C.save_checkpoint(d / "checkpoints", 50, state, meta=resume_key(cfg))
        err = refused(capsys, main(["train", "--resume", str(d), "--no-progress"]), path)
        assert "io.open" in err or key in err
        assert not marker.exists()


def test_sb3_eval_refuses_cloudpickled_values_in_model_zips(tmp_path, marker, capsys):
    from mtrl_arch.agents.sb3_baseline import MODEL_FORMAT

    d = run_dir_of(tmp_path, SB3)
    z = sb3_zip(ep_info_buffer=Payload(marker))
    torch.save({"format": MODEL_FORMAT, "version": 1, "models": {"reach-v3": z}}, d / "model.pt")
    # eval needs no episode statistics: the state values are not even read; an unknown one is refused
    assert main(["eval", str(d), "--episodes", "1"]) == 0
    assert not marker.exists()
    torch.save({"format": MODEL_FORMAT, "version": 1, "models": {"reach-v3": sb3_zip(extra=Payload(marker))}},
               d / "model.pt")
    refused(capsys, main(["eval", str(d), "--episodes", "1"]), d / "model.pt")
    assert not marker.exists()
    torch.save({"format": MODEL_FORMAT, "models": Payload(marker)}, d / "model.pt")  # the model file itself
    refused(capsys, main(["eval", str(d), "--episodes", "1"]), d / "model.pt")
    assert not marker.exists()


def test_sb3_code_bearing_values_are_rebuilt_never_read(marker):
    """SB3's policy class, spaces and schedules are rebuilt from the config: a payload there never runs,
    while SB3's own loading (the opt-in) runs it."""
    from stable_baselines3 import SAC
    from stable_baselines3.sac.policies import SACPolicy

    from mtrl_arch.agents.sb3_baseline import _load_sb3, _sac_kwargs, _sb3_structure
    from mtrl_arch.envs.metaworld import make_task_env

    z = sb3_zip(policy_class=Payload(marker))
    env = make_task_env("MT10", "reach-v3", 0, 50)
    template = SAC("MlpPolicy", env, **{**_sac_kwargs(load_config(SB3[0], SB3[1:]), 1, "cpu"), "buffer_size": 1})
    m = _load_sb3(z, "test zip", _sb3_structure(template), False, buffer_size=1)
    assert m.policy_class is SACPolicy and not marker.exists()
    with contextlib.suppress(Exception):
        _load_sb3(z, "test zip", _sb3_structure(template), True, buffer_size=1)
    env.close()
    assert marker.exists()


def test_supervised_eval_refuses_a_model_whose_pickle_runs_code(tmp_path, marker, capsys):
    fixtures = Path(__file__).resolve().parent / "fixtures" / "nyuv2"
    d = run_dir_of(tmp_path, ["nyuv2_hps", f"data.root={fixtures}", "model.options.width=4",
                              "model.options.out_features=8", "eval.batch_size=2", "eval.limit_batches=1",
                              "data.num_workers=0", "wandb.mode=disabled"])
    torch.save({"format": "mtrl-arch/supervised", "net": Payload(marker)}, d / "model.pt")
    refused(capsys, main(["eval", str(d)]), d / "model.pt")
    assert not marker.exists()


def test_restricted_unpickle_reads_arrays_and_refuses_the_rest(tmp_path, marker):
    from mtrl_arch.agents.sb3_baseline import SB3_STATE_GLOBALS

    a = np.arange(6, dtype=np.float64).reshape(2, 3)
    assert np.array_equal(restricted_unpickle(pickle.dumps(a, protocol=5), SB3_STATE_GLOBALS, "x"), a)
    with pytest.raises(UntrustedFileError, match="io.open"):
        restricted_unpickle(pickle.dumps(Payload(marker)), SB3_STATE_GLOBALS, "x")
    assert not marker.exists()


# ---- formats ----------------------------------------------------------------------------------------------
def test_format_1_numpy_arrays_load_under_the_allow_list_format_2_holds_none(tmp_path, monkeypatch, marker):
    """Format 1 held numpy's legacy RNG tuple and arrays: read with numpy's array types allowed, and only there
    (a format 2 header with the same payload is refused); a payload is refused in either. Format 2's own
    state round-trips the process's random streams exactly, with no numpy object in it."""
    legacy = {"rng": {"numpy": np.random.get_state()}, "episode_actions": np.ones((3, 4), np.float32)}
    monkeypatch.setattr(C, "VERSION", 1)
    v1 = C.save_checkpoint(tmp_path / "v1", 10, legacy)
    bad = C.save_checkpoint(tmp_path / "v1bad", 10, {**legacy, "x": Payload(marker)})
    monkeypatch.undo()
    h, state = C.read_checkpoint(v1)
    assert h["version"] == 1 and np.array_equal(state["episode_actions"], legacy["episode_actions"])
    with pytest.raises(UntrustedFileError):
        C.read_checkpoint(bad)
    assert not marker.exists()
    with pytest.raises(UntrustedFileError, match="numpy"):
        C.read_checkpoint(C.save_checkpoint(tmp_path / "v2", 10, legacy))

    np.random.seed(1), np.random.randn()  # a cached Gaussian is part of numpy's state
    path = C.save_checkpoint(tmp_path / "v2ok", 10, {"rng": C.rng_state()})
    want = np.random.randn(3), np.random.rand(), torch.rand(2)
    assert C.read_header(path)["version"] == C.VERSION == 2
    assert torch.serialization.get_unsafe_globals_in_checkpoint(io.BytesIO(path.read_bytes()[C.HEADER_SIZE:])) == []
    C.set_rng_state(pickle.loads(pickle.dumps(C.read_checkpoint(path)[1]["rng"])))  # ranks share it pickled
    got = np.random.randn(3), np.random.rand(), torch.rand(2)
    assert np.array_equal(want[0], got[0]) and want[1] == got[1] and torch.equal(want[2], got[2])


def test_a_checkpoint_written_before_this_change_resumes_without_a_flag(tmp_path, capsys):
    """tests/fixtures/checkpoint_v1: written by mtrl-arch at b42022a (format 1: numpy RNG state, the episode's
    actions as an array, mid-episode at env step 75); resumed to 100 steps with no flag."""
    d = tmp_path / "run"
    shutil.copytree(FIXTURE_V1, d)
    h, state = C.read_checkpoint(d / "checkpoints" / "ckpt-75.pt")
    assert h["version"] == 1 and isinstance(state["rng"]["numpy"], tuple)
    assert isinstance(state["episode_actions"], np.ndarray) and len(state["episode_actions"]) == 25
    assert main(["train", "--resume", str(d), "train.total_env_steps=100", "--no-progress"]) == 0
    assert "resumed from" in capsys.readouterr().err
    assert C.read_header(d / "checkpoints" / "ckpt-100.pt")["version"] == 2
    assert torch_load(d / "model.pt", d / "model.pt")["format"] == "mtrl-arch/mtsac"


def test_trust_file_needs_resume(capsys):
    assert main(["train", *RL, "--trust-file"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--resume" in err
