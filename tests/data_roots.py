"""Where the tests find MNIST, Fashion-MNIST and GLUE.

The real files (``MTRL_ARCH_DATA``, default ``../shared/data``) when they are there; otherwise
the real-data subset in ``tests/fixtures/data`` (the first items and rows of the same files,
same formats; see tests/fixtures/make_fixtures.py), so a fresh CI machine still runs every
loader and pipeline test. Tests that check the full data sets' known counts ask for
:func:`real_root` and skip without it.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest

SUBSET = Path(__file__).resolve().parent / "fixtures" / "data"


def real_data_root() -> Path:
    env = os.environ.get("MTRL_ARCH_DATA")
    return Path(env) if env else Path(__file__).resolve().parents[1].parent / "shared" / "data"


def data_root(*kinds: str) -> Path:
    """The real root when it holds every folder in ``kinds``, else the subset (which holds all)."""
    real = real_data_root()
    return real if all((real / k).is_dir() for k in kinds) else SUBSET


def is_subset(root: Path) -> bool:
    return Path(root) == SUBSET


def data_overrides(*kinds: str) -> list[str]:
    """Config overrides that point a run at :func:`data_root`; the subset needs its counts accepted."""
    root = data_root(*kinds)
    idx = is_subset(root) and any(k in ("mnist", "fashion_mnist") for k in kinds)  # only the IDX loader counts
    counts = ["data.options.check_counts=false"] if idx else []
    return [f"data.root={root}", *counts]


def real_root(*kinds: str) -> Path:
    """The real root, or skip the calling test (it checks the full data set's known answers)."""
    real = real_data_root()
    missing = [k for k in kinds if not (real / k).is_dir()]
    if missing:
        pytest.skip(f"{', '.join(missing)} not found under {real} (set MTRL_ARCH_DATA); "
                    f"this test checks the full data set")
    return real
