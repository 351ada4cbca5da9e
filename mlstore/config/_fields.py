"""What one setting is, and the parsers that check a setting's value.

A config class declares each of its settings with :func:`setting`, which stores a
:class:`Setting` (environment variable, parser, default) in the metadata of the
dataclass field. The class is then the only table of its settings: resolution
(:mod:`mlstore.config._sources`), :data:`~mlstore.config.ENV_VARS` and
``mlstore config`` all walk ``dataclasses.fields()``.

A parser takes the raw value and a label naming the field and where the value came
from (``"CacheConfig.ttl (environment variable MLSTORE_TTL)"``). It returns the
checked value, or raises :class:`~mlstore.errors.ConfigError` with that label in the
message, so every bad value names its field and its source. The parsers here are the
generic ones; a rule that belongs to one class lives beside that class.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass
from fractions import Fraction
from typing import Any, TypeVar

from mlstore.errors import ConfigError

__all__ = [
    "UNSET",
    "GiB",
    "MiB",
    "Parser",
    "Setting",
    "choice",
    "directory",
    "flag",
    "nonneg",
    "optional",
    "parse_size",
    "positive",
    "refuse_unknown",
    "seconds",
    "setting",
    "settings",
    "size",
    "strings",
    "whole",
]

MiB = 1024 * 1024
GiB = 1024 * MiB

_T = TypeVar("_T")

#: Checks a raw value; the second argument labels the field and the value's source.
Parser = Callable[[object, str], _T]


class _Unset:
    """Marker for a constructor argument that was not given."""

    def __repr__(self) -> str:
        return "UNSET"


#: The default of every setting field: "not given, look in the environment and file".
#: Typed ``Any`` so that it can stand as the default of a field of any type.
UNSET: Any = _Unset()


@dataclass(frozen=True)
class Setting:
    """Where one field's value may come from when no argument gives it.

    Attributes:
        env: the ``MLSTORE_*`` environment variable, or ``None`` for a field that only
            an argument or the config file can set.
        parse: checks a raw value from any source (argument, environment, file).
        default: the raw value used when no source gives one; it goes through
            ``parse`` like any other, so a mapping default comes out as a fresh dict.
    """

    env: str | None
    parse: Parser[Any]
    default: object


_METADATA_KEY = "mlstore.setting"


def setting(env: str | None, parse: Parser[_T], default: object) -> _T:
    """Declare a dataclass field as a setting.

    The field defaults to :data:`UNSET`; the class's ``__post_init__`` fills it from
    the environment, the config file or ``default``. The return type is the parser's,
    so mypy checks the parser against the field's annotation.
    """
    spec = Setting(env, parse, default)
    out: _T = dataclasses.field(default=UNSET, metadata={_METADATA_KEY: spec})
    return out


def settings(cls: type[Any]) -> Iterator[tuple[str, Setting]]:
    """``(field name, Setting)`` for each setting field of ``cls``, in field order."""
    for f in dataclasses.fields(cls):
        spec = f.metadata.get(_METADATA_KEY)
        if spec is not None:
            yield f.name, spec


def refuse_unknown(
    given: Collection[object], known: Collection[str], where: str, what: str
) -> None:
    """Raise :class:`ConfigError` if ``given`` has a name that is not in ``known``.

    A misspelt setting is an error, never silently ignored; the message lists the names
    ``where`` (a file, a section, a field) does know, as ``what`` (``"key"``,
    ``"field"``, ``"section"``).
    """
    unknown = sorted(set(given) - set(known), key=str)
    if unknown:
        raise ConfigError(
            f"{where} has unknown {what}(s) {unknown}; known {what}s are {sorted(known)}"
        )


# ----------------------------------------------------------------------- scalars

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgtp]?)(i?)b?\s*$", re.IGNORECASE)
_POWERS = {"": 0, "k": 1, "m": 2, "g": 3, "t": 4, "p": 5}


def parse_size(value: object, *, name: str = "size") -> int:
    """Turn ``1024``, ``"64KiB"``, ``"1.5GB"`` or ``"10G"`` into a number of bytes.

    ``KiB``/``K`` style units are powers of 1024; ``KB`` style units powers of 1000.

    >>> parse_size("64KiB"), parse_size("1GB"), parse_size(5)
    (65536, 1000000000, 5)
    """
    if isinstance(value, bool):
        raise ConfigError(f"{name} must be a size in bytes, got {value!r}")
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str):
        m = _SIZE.match(value)
        if m:
            number, unit, binary = m.groups()
            unit = unit.lower()
            # "10G" and "10GiB" are binary; "10GB" is decimal.
            base = 1024 if (binary or (unit and not value.strip().lower().endswith("b"))) else 1000
            # Fraction, not float: "1.5GiB" must come out exact at any magnitude.
            return int(Fraction(number) * base ** _POWERS[unit])
    raise ConfigError(f"{name} must be a size such as 1048576, '512MiB' or '10GB', got {value!r}")


def size(value: object, name: str) -> int:
    """:func:`parse_size` in the shape of a parser."""
    return parse_size(value, name=name)


def _number(value: object, name: str, what: str, accept: Callable[[float], bool]) -> float:
    """``value`` as a float when ``accept`` takes it; otherwise it is not ``what``.

    A bool is refused although Python counts it as a number: ``ttl = true`` in a file
    is a mistake, not one second.
    """
    if not isinstance(value, bool):
        try:
            out = float(value)  # type: ignore[arg-type]
        except (TypeError, ValueError):
            pass
        else:
            if accept(out):
                return out
    raise ConfigError(f"{name} must be {what}, got {value!r}")


def seconds(value: object, name: str) -> float:
    """A duration in seconds (any number but NaN)."""
    return _number(value, name, "a number of seconds", lambda x: not math.isnan(x))


def whole(value: object, name: str) -> int:
    """A whole number; ``3.0`` and ``"3"`` count, ``2.5`` does not."""
    return int(_number(value, name, "a whole number", float.is_integer))


def flag(value: object, name: str) -> bool:
    """A bool, or one of the usual spellings of one in an environment variable."""
    if isinstance(value, bool):
        return value
    text = value.strip().lower() if isinstance(value, str) else None
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"{name} must be true or false, got {value!r}")


def strings(value: object, name: str) -> tuple[str, ...]:
    """A list of strings, or one comma separated string (as an environment variable)."""
    if isinstance(value, str):
        return tuple(v.strip() for v in value.split(",") if v.strip())
    if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        return tuple(value)
    raise ConfigError(f"{name} must be a list of strings, got {value!r}")


def directory(value: object, name: str) -> str | None:
    """A directory path with ``~`` expanded; ``None`` or empty for "not set"."""
    if value is None:
        return None
    if isinstance(value, os.PathLike):
        value = os.fspath(value)
    if isinstance(value, str):
        return os.path.expanduser(value) if value else None
    raise ConfigError(f"{name} must be a directory path, got {value!r}")


# -------------------------------------------------------------------- combinators


def choice(*choices: str) -> Parser[str]:
    """A parser taking one of ``choices``, in any letter case; returns it lower-cased."""

    def parse(value: object, name: str) -> str:
        if not isinstance(value, str) or value.lower() not in choices:
            raise ConfigError(f"{name} must be one of {list(choices)}, got {value!r}")
        return value.lower()

    return parse


_NONE = ("", "none", "off")


def optional(parse: Parser[_T]) -> Parser[_T | None]:
    """``parse``, with ``None``, ``""``, ``"none"`` and ``"off"`` meaning "not set".

    The strings are there because an environment variable cannot hold ``None``.
    """

    def parse_optional(value: object, name: str) -> _T | None:
        if value is None or (isinstance(value, str) and value.strip().lower() in _NONE):
            return None
        return parse(value, name)

    return parse_optional


def _bounded(parse: Parser[_T], rule: str, ok: Callable[[Any], bool]) -> Parser[_T]:
    def check(value: object, name: str) -> _T:
        out = parse(value, name)
        # None is "not set" (see optional()), which no bound applies to.
        if out is not None and not ok(out):
            raise ConfigError(f"{name} must {rule}, got {value!r}")
        return out

    return check


def nonneg(parse: Parser[_T]) -> Parser[_T]:
    """``parse``, refusing a result below zero."""
    return _bounded(parse, "not be negative", lambda n: n >= 0)


def positive(parse: Parser[_T]) -> Parser[_T]:
    """``parse``, refusing a result of zero or below."""
    return _bounded(parse, "be greater than zero", lambda n: n > 0)
