"""The one set of value rules, for the main config and every options block.

:func:`parse_options` reads ``arch.options`` (a method's ``Options``), ``weighting.options``
(a weighting's keyword arguments), ``data.options`` and ``model.options`` (the supervised
benchmark's and backbone's option classes) and ``mtrl-arch bench WHAT key=value``;
:mod:`mtrl_arch.config` coerces its own fields with :func:`coerce`. The rules, by a field's type:

* ``int``: an int, or a float with an integral value (``2.0``, ``1e6``); ``2.5``, bools and
  strings are refused;
* ``float``: an int or any float literal (``3e-4``, ``.5``, ``inf``); bools and strings refused;
* ``bool``: true or false only (not 0/1, not ``"yes"``);
* ``str``: a string, or a number (kept as its text); bools refused;
* ``list`` / ``tuple``: a sequence, or one value (a one-element list); None is empty;
* ``dict``: a mapping; ``Literal[...]``: one of its values; ``A | B``: the first that fits.

Every refusal is a :class:`ConfigError` with one line naming the key and what is valid. A leaf
module (it imports only :mod:`.errors`): the config validates through the method and weighting
registries, which parse their options here, so this cannot live in config.py without an import loop.
"""
from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from collections.abc import Mapping
from typing import Any, Literal, TypeVar, get_args, get_origin

from .errors import ConfigError

T = TypeVar("T")


def coerce(value: Any, tp: Any, key: str) -> Any:
    """``value`` as type ``tp`` by the rules above; ``key`` names it in the error."""
    origin = get_origin(tp)
    if origin is Literal:
        choices = get_args(tp)
        if value not in choices:
            raise ConfigError(f"{key} must be one of {', '.join(map(str, choices))}; got {value!r}")
        return value
    if origin in (typing.Union, types.UnionType):
        for a in get_args(tp):
            try:
                return coerce(value, a, key)
            except ConfigError:
                pass
        raise ConfigError(f"{key} has the wrong type: {value!r}")
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key} must be true or false; got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or (isinstance(value, float) and not value.is_integer()):
            raise ConfigError(f"{key} must be an integer; got {value!r}")
        return int(value)
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key} must be a number; got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError(f"{key} must be a string; got {value!r}")
        return str(value)
    if tp in (list, tuple) or origin in (list, tuple):
        seq = [] if value is None else list(value) if isinstance(value, (list, tuple)) else [value]
        return tuple(seq) if (origin or tp) is tuple else seq
    if tp is dict or origin is dict:
        if value is None:
            return {}
        if not isinstance(value, Mapping):
            raise ConfigError(f"{key} must be a mapping; got {value!r}")
        return dict(value)
    return value


def _key(where: str, k: str) -> str:
    # a config block ("data.options") prefixes its keys as they are typed (data.options.x=1); a named block
    # with a space ("bench trunk") takes bare keys on the command line
    return f"{where} {k}" if " " in where else f"{where}.{k}" if where else k


def unknown_key(where: str, k: str, valid) -> ConfigError:
    """One line: the unknown key, the nearest valid one, and every valid one."""
    near = difflib.get_close_matches(k, list(valid), n=1)
    bare = " " in where
    what = f"{where} option {k!r}" if bare else f"config key {_key(where, k)!r}"
    hint = f"; did you mean {near[0] if bare else _key(where, near[0])}?" if near else ""
    return ConfigError(f"unknown {what}{hint} (valid here: {', '.join(sorted(valid)) or 'none'})")


def parse_options(cls: type[T], raw: Mapping[str, Any] | None, where: str) -> T:
    """An instance of the dataclass ``cls`` from ``raw`` (None: all defaults), every value coerced by the rules
    above; ``where`` names the block in errors (``arch.options``; ``bench trunk`` for bare command-line keys)."""
    if raw is None:
        raw = {}
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{where} must be a mapping of options; got {raw!r}")
    fields = {f.name for f in dataclasses.fields(cls) if f.init}
    hints = typing.get_type_hints(cls)
    out = {}
    for k, v in raw.items():
        if k not in fields:
            raise unknown_key(where, str(k), fields)
        out[k] = coerce(v, hints[k], _key(where, k))
    return cls(**out)
