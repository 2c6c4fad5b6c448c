"""Typed configs whose fields carry their command-line flag, help text and valid range.

A run config is a tree of dataclasses, one per component, with defaults that run. A field a user
may set is declared with :func:`param`, which keeps its flag, help and valid range beside it, so:

* every config refuses a bad value when it is built (:class:`Config` validates in
  ``__post_init__``), with one line that names the flag and the valid range
  (``--tau must be > 0, got -1.0``). 0 is a value like any other, never a request for a default;
* entry points build their parsers from the same declarations (:func:`add_flags`,
  :func:`given_flags`), so a flag cannot drift from the field it sets;
* configs round-trip through JSON (:func:`to_dict`, :func:`from_dict`), and a key that no field
  has is refused rather than ignored.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import types
import typing
from dataclasses import MISSING, dataclass, field
from typing import Any, Literal


class ConfigError(ValueError):
    """A value the config refuses. ``str()`` is one line: the flag (or key), the valid range, the value."""


@dataclass(frozen=True)
class Bounds:
    gt: float | None = None
    ge: float | None = None
    lt: float | None = None
    le: float | None = None

    def ok(self, v: float) -> bool:
        return ((self.gt is None or v > self.gt) and (self.ge is None or v >= self.ge)
                and (self.lt is None or v < self.lt) and (self.le is None or v <= self.le))

    def text(self) -> str:
        def num(v: float) -> str:
            return str(int(v)) if float(v).is_integer() else f"{v:g}"

        lo = f"({num(self.gt)}" if self.gt is not None else f"[{num(self.ge)}" if self.ge is not None else None
        hi = f"{num(self.lt)})" if self.lt is not None else f"{num(self.le)}]" if self.le is not None else None
        if lo and hi:
            return f"in {lo}, {hi}"
        if lo:
            return f"{'>' if lo[0] == '(' else '>='} {lo[1:]}"
        return f"{'<' if hi[-1] == ')' else '<='} {hi[:-1]}"

    def __bool__(self) -> bool:
        return any(v is not None for v in (self.gt, self.ge, self.lt, self.le))


def param(default: Any = MISSING, *, flag: str | None = None, help: str = "", gt: float | None = None,
          ge: float | None = None, lt: float | None = None, le: float | None = None, empty: bool = False,
          default_factory: Any = MISSING) -> Any:
    """A dataclass field with its flag (``--frames``), help and valid range (numbers: ``gt``/``ge``/
    ``lt``/``le``; ``Literal`` choices come from the type). ``None`` is valid only where the type
    allows it, and an empty string only with ``empty=True`` ("" is never a quiet "unset")."""
    meta = {"flag": flag, "help": help, "bounds": Bounds(gt, ge, lt, le), "empty": empty}
    if default_factory is not MISSING:
        return field(default_factory=default_factory, metadata=meta)
    return field(default=default, metadata=meta)


def refuse(where: str, message: str) -> typing.NoReturn:
    raise ConfigError(f"{where} {message}")


# -- types -------------------------------------------------------------------------------------
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _split_optional(tp: Any) -> tuple[Any, bool]:
    """(the type without None, whether None is allowed)."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        optional = len(args) < len(typing.get_args(tp))
        return (args[0] if len(args) == 1 else typing.Union[tuple(args)]), optional
    return tp, False


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if typing.get_origin(tp) is tuple:
        return f"a list of {len(typing.get_args(tp))} numbers"
    if dataclasses.is_dataclass(tp):
        return f"a {tp.__name__} section"
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false"}.get(tp, str(tp))


def _fits(v: Any, tp: Any) -> bool:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return any(v == a and type(v) is type(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return any(_fits(v, a) for a in typing.get_args(tp))
    if origin is tuple:
        args = typing.get_args(tp)
        return isinstance(v, tuple) and len(v) == len(args) and all(_fits(x, a) for x, a in zip(v, args))
    if origin is list:
        (arg,) = typing.get_args(tp)
        return isinstance(v, list) and all(_fits(x, arg) for x in v)
    if tp is type(None):
        return v is None
    if tp is bool:
        return isinstance(v, bool)
    if tp is int:
        return isinstance(v, int) and not isinstance(v, bool)
    if tp is float:
        return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    if dataclasses.is_dataclass(tp):
        return isinstance(v, tp)
    return isinstance(v, tp)


# -- validation --------------------------------------------------------------------------------
def _where(f: dataclasses.Field, path: str) -> str:
    flag = f.metadata.get("flag")
    return flag if flag else path


def validate(cfg: Any, path: str = "") -> None:
    """Check every field of ``cfg`` (not its sub-configs: each validated itself when built) against
    its type and range, then the config's own cross-field rules (``check()``)."""
    hints = _hints(type(cfg))
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        where = _where(f, f"{path or type(cfg).__name__}.{f.name}")
        tp, optional = _split_optional(hints[f.name])
        if v is None:
            if not optional:
                refuse(where, f"needs a value ({_type_name(tp)}), got None")
            continue
        if dataclasses.is_dataclass(tp) and isinstance(v, tp):
            continue
        if not _fits(v, tp):
            refuse(where, f"must be {_type_name(tp)}, got {v!r}")
        bounds: Bounds = f.metadata.get("bounds", Bounds())
        if bounds and isinstance(v, (int, float)) and not bounds.ok(v):
            refuse(where, f"must be {bounds.text()}, got {v!r}")
        if v == "" and not f.metadata.get("empty", False):
            refuse(where, "is empty: give a value, or leave the flag out")
    check = getattr(cfg, "check", None)
    if check is not None:
        check()


class Config:
    """Base of the config dataclasses: validated when built, so a bad value never gets further."""

    def __post_init__(self) -> None:
        validate(self)

    def check(self) -> None:
        """Rules between fields; raise :class:`ConfigError` (see :func:`refuse`)."""


# -- JSON --------------------------------------------------------------------------------------
def to_dict(cfg: Any) -> dict:
    """A JSON-ready dict of a (nested) dataclass config."""
    return json.loads(json.dumps(dataclasses.asdict(cfg), default=str))


def _convert(v: Any, tp: Any, key: str) -> Any:
    inner, optional = _split_optional(tp)
    if v is None:
        return None
    if dataclasses.is_dataclass(inner):
        if not isinstance(v, dict):
            raise ConfigError(f"{key} must be a mapping of {inner.__name__}'s fields, got {v!r}")
        return from_dict(inner, v, key)
    if typing.get_origin(inner) is tuple and isinstance(v, list):
        return tuple(v)
    if inner is float and isinstance(v, int) and not isinstance(v, bool):
        return float(v)
    return v


def from_dict(cls: type, data: dict, path: str = "") -> Any:
    """Build ``cls`` from a dict (a saved config), sub-configs included. Missing keys take the
    field's default; a key no field has is refused (a typo must not pass for a setting). A class
    with an ``upgrade_saved(dict) -> dict`` static method first brings an older saved form up to date."""
    if hasattr(cls, "upgrade_saved"):
        data = cls.upgrade_saved(dict(data))
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        where = f"{path}." if path else ""
        raise ConfigError(f"unknown config key{'s' if len(unknown) > 1 else ''} "
                          f"{', '.join(where + k for k in unknown)} (known: {', '.join(sorted(fields))})")
    hints = _hints(cls)
    kwargs = {k: _convert(v, hints[k], f"{path}.{k}" if path else k) for k, v in data.items()}
    return cls(**kwargs)


# -- command-line flags ------------------------------------------------------------------------
@dataclass(frozen=True)
class Flag:
    flag: str
    path: str  # dotted field path in the config tree, e.g. "data.temporal.num_frames"
    type: Any
    help: str


def iter_flags(cls: type, prefix: str = "") -> list[Flag]:
    """Every field with a flag in the config tree under ``cls``."""
    out = []
    hints = _hints(cls)
    for f in dataclasses.fields(cls):
        tp, _ = _split_optional(hints[f.name])
        path = f"{prefix}{f.name}"
        if f.metadata.get("flag"):
            out.append(Flag(f.metadata["flag"], path, tp, f.metadata.get("help", "")))
        if dataclasses.is_dataclass(tp):
            out += iter_flags(tp, path + ".")
    return out


def _pair(flag: str):
    """An argparse type for ``LO:HI`` (or one number, LO = HI): two floats, in one line if not."""
    def parse(text: str) -> tuple[float, float]:
        parts = text.split(":")
        try:
            values = [float(x) for x in parts]
        except ValueError:
            values = []
        if len(values) not in (1, 2):
            raise argparse.ArgumentTypeError(f"{flag} takes LO:HI (two numbers) or one number, got {text!r}")
        return (values[0], values[-1])
    return parse


def _shown(value: Any) -> str:
    """A config value as --help shows it (argparse formats help with %: escaped)."""
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, tuple) and len(value) == 2:
        return f"{value[0]:g}:{value[1]:g}"
    return (f"{value:g}" if isinstance(value, float) else str(value)).replace("%", "%%")


def add_flags(parser: argparse.ArgumentParser, cls: type, groups: dict[str, str] | None = None,
              shown: Any = None, label: str = "default") -> None:
    """Add every flag of the config tree under ``cls`` to ``parser``; a flag the user does not
    give is absent from the parsed namespace (``argparse.SUPPRESS``), so only given flags
    override. ``groups`` maps a top-level field name to an argument-group title. ``shown``: a
    config whose values --help prints after each flag's help, as ``(label: value)``."""
    groups = groups or {}
    made: dict[str, Any] = {}
    for fl in iter_flags(cls):
        top = fl.path.split(".")[0]
        target = parser
        if top in groups:
            target = made.setdefault(top, parser.add_argument_group(groups[top]))
        kw: dict[str, Any] = {"dest": fl.path, "default": argparse.SUPPRESS, "help": fl.help}
        if shown is not None:
            value = shown
            for part in fl.path.split("."):
                value = getattr(value, part, None)
            if value is not None:
                kw["help"] = f"{fl.help} ({label}: {_shown(value)})"
        if fl.type is bool:
            kw["action"] = argparse.BooleanOptionalAction
        elif typing.get_origin(fl.type) is Literal:
            choices = typing.get_args(fl.type)
            kw.update(type=type(choices[0]), choices=choices)
        elif fl.type in (int, float, str):
            kw.update(type=fl.type, metavar=fl.path.rsplit(".", 1)[-1].upper())
        elif typing.get_origin(fl.type) is tuple and typing.get_args(fl.type) == (float, float):
            kw.update(type=_pair(fl.flag), metavar="LO:HI")
        else:  # e.g. str | list[str]: given as one string on the command line
            kw.update(type=str, metavar=fl.path.rsplit(".", 1)[-1].upper())
        target.add_argument(fl.flag, **kw)


def given_flags(args: argparse.Namespace, cls: type) -> dict[str, Any]:
    """{dotted path: value} for the config flags present in ``args`` (those the user gave)."""
    return {fl.path: getattr(args, fl.path) for fl in iter_flags(cls) if hasattr(args, fl.path)}
