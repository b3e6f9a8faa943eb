"""Architecture methods, by name. One file per method; see base.py for the interface."""
from __future__ import annotations

import difflib

from ..errors import ConfigError
from ..options import parse_options
from .base import ArchMethod, Phase, TrunkSpec
from .adashare import AdaShare
from .conal import Conal
from .conal_pro import ConalPro
from .derive import DeriveRule
from .fixed import HPS, STL, Manual
from .ltb import LTB
from .random import RandomArch
from .recon import Recon

REGISTRY: dict[str, type[ArchMethod]] = {m.name: m for m in (HPS, STL, Manual, RandomArch, Conal, ConalPro, LTB, AdaShare,
                                                              Recon)}


def get_method(name: str) -> type[ArchMethod]:
    if name not in REGISTRY:
        near = difflib.get_close_matches(name, REGISTRY, n=1)
        hint = f" (did you mean {near[0]!r}?)" if near else ""
        raise ConfigError(f"unknown arch.method {name!r}{hint}; choose from {', '.join(sorted(REGISTRY))}")
    return REGISTRY[name]


def make_method(name: str, spec: TrunkSpec, options: dict | None = None, seed: int = 0, derive=None) -> ArchMethod:
    """``derive``: a :class:`DeriveRule`, the run's ``cfg.arch`` (its derive fields are read), or None (argmax)."""
    cls = get_method(name)
    method = cls(spec, parse_options(cls.Options, options, "arch.options"), seed=seed)
    method.set_derive_rule(DeriveRule.of(derive))
    return method


__all__ = ["ArchMethod", "DeriveRule", "Phase", "TrunkSpec", "REGISTRY", "get_method", "make_method"]
