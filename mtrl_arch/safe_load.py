"""Reading files that may come from elsewhere (shared models, copied runs, requeued jobs) without running code.

A pickle can call any function it names, so opening a ``torch.save`` file with ``weights_only=False`` runs
whatever its author put there; a checkpoint's SHA-256 guards against damage only, since anyone can compute it
over a payload of their own. Every load therefore goes through :func:`torch_load` (``weights_only=True``:
tensors, numbers, strings, lists, tuples, dicts, and what torch itself allows for optimiser and scheduler
state) or :func:`restricted_unpickle` (plain pickles inside another library's format), each with an explicit
allow-list of the few extra types an older mtrl-arch wrote. A file that needs anything else is refused with
:class:`UntrustedFileError` (one line: the file, the type it asked for, and the opt-in). The opt-in,
``--trust-file`` on the CLI and ``trust_file=True`` in the API, loads with full pickle, for a file the user
made or trusts.
"""
from __future__ import annotations

import io
import pickle
import re
from pathlib import Path
from typing import Any, BinaryIO, Callable

import numpy as np
import torch

from .errors import ConfigError

try:  # numpy 2 names its pickling helpers numpy._core.*, numpy 1 numpy.core.* (the same functions)
    from numpy._core import multiarray as np_multiarray, numeric as np_numeric
except ImportError:  # pragma: no cover - numpy < 1.26
    from numpy.core import multiarray as np_multiarray, numeric as np_numeric

TRUST_FLAG = "--trust-file"

# numpy's array reconstruction, as checkpoints of format version 1 hold it (the legacy numpy RNG state's uint32 key,
# episode actions and SB3 replay arrays in float32/float64): the module path is numpy 2's (numpy._core) or numpy 1's
# (numpy.core); the dtypes those arrays have (their classes: what torch's unpickler checks a dtype's state against)
NUMPY_ARRAY_GLOBALS: list[Callable | tuple[Callable, str]] = [
    np.ndarray, np.dtype, np_multiarray._reconstruct, np_multiarray.scalar,
    (np_multiarray._reconstruct, "numpy.core.multiarray._reconstruct"), (np_multiarray.scalar, "numpy.core.multiarray.scalar"),
    *(type(np.dtype(t)) for t in (np.uint32, np.float32, np.float64, np.int64, np.bool_)),
]


class UntrustedFileError(ConfigError):
    """A file that would need code run (types outside the allow-list) to be read; refused unopened."""


def refusal(path: str | Path, what: str) -> UntrustedFileError:
    """The one-line refusal for ``path``; ``what``: the type or construct it asked for."""
    return UntrustedFileError(
        f"{path} is not a file mtrl-arch wrote: it holds {what}, outside the types mtrl-arch reads, and loading it "
        f"could run code; if you made or trust this file, pass {TRUST_FLAG} (Python: trust_file=True)")


def _named_global(message: str) -> str:
    """What torch's weights-only unpickler refused, from its message ("GLOBAL os.system", "got <class 'X'>")."""
    m = re.search(r"GLOBAL ([\w.]+)", message) or re.search(r"got <class '([\w.]+)'>", message)
    return f"the global {m.group(1)}" if m else "a pickle construct that is not plain data"


def torch_load(source: str | Path | BinaryIO, path: str | Path, *, trust_file: bool = False,
               allow: list[Callable | tuple[Callable, str]] = ()) -> Any:
    """``torch.load(source)`` on the CPU with ``weights_only=True`` plus the globals ``allow``
    (e.g. :data:`NUMPY_ARRAY_GLOBALS` for an older format); ``path`` names the file in the refusal.
    ``trust_file=True``: full pickle (the user's opt-in for a file they trust)."""
    if trust_file:
        return torch.load(source, map_location="cpu", weights_only=False)
    try:
        with torch.serialization.safe_globals(list(allow)):
            return torch.load(source, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise weights_only_refusal(e, path) from None


def weights_only_refusal(e: pickle.UnpicklingError, path: str | Path) -> UntrustedFileError:
    """The refusal for what torch's weights-only unpickler stopped at (the first global outside its list,
    before calling anything): also for libraries that load with ``weights_only=True`` themselves."""
    return refusal(path, _named_global(str(e)))


class _Restricted(pickle.Unpickler):
    def __init__(self, data: bytes, allowed: dict[str, Any], path: str | Path):
        super().__init__(io.BytesIO(data))
        self.allowed, self.path = allowed, path

    def find_class(self, module: str, name: str) -> Any:
        key = f"{module}.{name}"
        if key not in self.allowed:
            raise refusal(self.path, f"the global {key}")
        return self.allowed[key]

    def persistent_load(self, pid: Any) -> Any:
        raise refusal(self.path, "a persistent reference")


def restricted_unpickle(data: bytes, allowed: dict[str, Any], path: str | Path) -> Any:
    """A plain pickle whose globals must be among ``allowed`` (full name -> object); nothing else is looked up.

    For pickles inside another library's file (e.g. the arrays in a stable-baselines3 zip). Only globals can
    run code in a pickle, so a pickle limited to array and container constructors is data."""
    try:
        return _Restricted(data, allowed, path).load()
    except UntrustedFileError:
        raise
    except Exception as e:  # noqa: BLE001 - a malformed pickle: as foreign as one with a bad global
        raise refusal(path, f"an unreadable pickle ({type(e).__name__})") from None
