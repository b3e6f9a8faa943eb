"""Killing CLI runs and comparing them with uninterrupted ones: shared by tests/test_faults.py,
tests/test_sb3_baseline.py, tests/test_soak.py and benchmarks/soak.py.

A killed run is a subprocess started through :data:`BOOT`, which hands it the MT10 benchmark object
pickled (its construction takes 10-15 s per process; :func:`pickle_benchmark`). Runs compared for exact
resume use one torch thread (:func:`child_env` for subprocesses); comparisons drop the ``time/*``
metrics, which measure wall-clock speed (:data:`WALL_CLOCK`).
"""
from __future__ import annotations

import base64
import io
import json
import os
import pickle
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any

import torch

# argv: [pickled benchmark or "-", mtrl-arch arguments...]
BOOT = ("import pickle, sys; import mtrl_arch.envs.metaworld as m; "
        "sys.argv[1] == '-' or m._BENCHMARK_CACHE.__setitem__(('MT10', 0), pickle.load(open(sys.argv[1], 'rb'))); "
        "from mtrl_arch.cli import main; sys.exit(main(sys.argv[2:]))")

WALL_CLOCK = ("time/",)  # metrics that measure wall-clock speed: excluded from exact comparisons


def pickle_benchmark(path: Path) -> Path:
    """MT10 (seed 0) pickled at ``path``, for :data:`BOOT`."""
    from mtrl_arch.envs.metaworld import make_benchmark

    path.write_bytes(pickle.dumps(make_benchmark("MT10", 0)))
    return path


def child_env() -> dict:
    """A subprocess's environment: one thread (numerics then do not depend on the thread count), no warnings."""
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


def cli_command(bench: Path | str, *argv: str) -> list[str]:
    """``mtrl-arch ARGV`` as a subprocess command line (``bench``: a pickled benchmark, or "-" for none)."""
    return [sys.executable, "-c", BOOT, str(bench), *argv]


def start(bench: Path, *argv: str) -> subprocess.Popen:
    return subprocess.Popen(cli_command(bench, *argv), env=child_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def metric_lines(run_dir: Path) -> list[dict]:
    """metrics.jsonl's records less their ``time/*`` metrics; a torn or garbled line raises."""
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    recs = [json.loads(line) for line in lines]
    return [{k: v for k, v in r.items() if not k.startswith(WALL_CLOCK)} for r in recs]


def load_model(run_dir: Path) -> dict:
    """model.pt as saved (our own file: a full unpickle is fine here)."""
    return torch.load(run_dir / "model.pt", map_location="cpu", weights_only=False)


def final_state(run_dir: Path) -> dict:
    return load_model(run_dir)["state"]


def assert_same_state(a, b, path: str = "") -> None:
    """``a`` and ``b`` equal all the way down, tensors bit for bit; a zip archive (an SB3 model) member by member
    (:func:`zip_members`: what records the process rather than the training may differ), and SB3's episode
    records (``sb3_state/<task>/ep_info_buffer``) less their wall-clock ``t``."""
    if isinstance(a, dict):
        assert set(a) == set(b), path
        for k in a:
            if k == "t" and "/ep_info_buffer/" in path:  # an SB3 episode's wall-clock seconds, as in zip_members
                continue
            assert_same_state(a[k], b[k], f"{path}/{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same_state(x, y, f"{path}/{i}")
    elif isinstance(a, torch.Tensor):
        assert torch.equal(a, b), f"{path} differs"
    elif isinstance(a, bytes) and a[:4] == b"PK\x03\x04" and isinstance(b, bytes):
        assert zip_members(a) == zip_members(b), f"{path} (zip) differs"
    else:
        assert a == b, path


def zip_members(blob: bytes) -> dict[str, Any]:
    """A zip archive's members' bytes; an SB3 model's ``data`` (JSON) less what records the process rather than
    the training: the zip's file times (never read), ``start_time`` and each finished episode's ``t`` (wall-clock
    seconds), and the repr beside each pickled class (it prints its functions' memory addresses)."""
    with zipfile.ZipFile(io.BytesIO(blob)) as z:
        out: dict[str, Any] = {n: z.read(n) for n in z.namelist()}
    if isinstance(out.get("data"), bytes) and out["data"][:1] == b"{":
        d = json.loads(out["data"])
        d.pop("start_time", None)
        for k, v in d.items():
            if isinstance(v, dict) and ":serialized:" in v:
                d[k] = v[":serialized:"]
        if isinstance(d.get("ep_info_buffer"), str):  # a pickled deque of {"r": return, "l": length, "t": seconds}
            eps = pickle.loads(base64.b64decode(d["ep_info_buffer"]))  # noqa: S301 - a file this test run wrote
            d["ep_info_buffer"] = [{k: v for k, v in e.items() if k != "t"} for e in eps]
        out["data"] = d
    return out


def compare_runs(got: Path, want: Path) -> dict[str, Any]:
    """How a finished run matches ``want``: ``metrics`` (metrics.jsonl less ``time/*``), ``model`` ("bytes":
    model.pt bit-identical; "content": every tensor bit for bit and every other field equal (SB3's zips as
    :func:`zip_members` reads them), the bytes not: a pickle shares an object the other holds twice, or an SB3
    model records wall times; False), ``arch`` (arch.json's text, or both absent), and ``identical`` (all three).
    A difference is named in ``why``."""
    out: dict[str, Any] = {"metrics": metric_lines(got) == metric_lines(want)}
    if (got / "model.pt").read_bytes() == (want / "model.pt").read_bytes():
        out["model"] = "bytes"
    else:
        try:
            assert_same_state(load_model(got), load_model(want))
            out["model"] = "content"
        except AssertionError as e:
            out["model"], out["why"] = False, f"model.pt: {e}"
    arch = [p.read_text() if p.is_file() else None for p in (got / "arch.json", want / "arch.json")]
    out["arch"] = arch[0] == arch[1]
    if not out["metrics"]:
        out["why"] = "metrics.jsonl differs"
    elif not out["arch"]:
        out["why"] = "arch.json differs"
    out["identical"] = bool(out["metrics"] and out["model"] and out["arch"])
    return out
