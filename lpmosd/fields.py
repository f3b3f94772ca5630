"""Strict reading and writing of JSON documents: the field-validation engine.

:class:`Fields` reads one JSON object strictly (unknown and missing fields, wrong types and
out-of-range values raise :class:`~lpmosd.errors.ValidationError` naming the full field path);
:class:`Document` gives a dataclass ``to_json``/``from_json`` on top of its ``to_dict`` and
``from_dict``. Also the text rules every stored string follows (:func:`sanitize_text`).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Iterable, Mapping
from datetime import datetime
from enum import StrEnum
from json.encoder import encode_basestring
from typing import Any, Final, Self, TypeVar

from lpmosd.errors import ValidationError
from lpmosd.timestamps import parse_ts

__all__ = [
    "CONTROL_RE",
    "SURROGATE_RE",
    "Document",
    "Fields",
    "bounded_number",
    "dump_json",
    "json_len",
    "load_json",
    "sanitize_text",
]

# C0/C1 controls (tab kept), line/paragraph separators, and lone surrogates (which cannot
# be encoded as UTF-8 and would make to_json() fail later).
_STRIP_RE: Final = re.compile("[\x00-\x08\x0a-\x1f\x7f-\x9f\u2028\u2029\ud800-\udfff]")
#: What single-line identifiers refuse: all of the above and tab too.
CONTROL_RE: Final = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\ud800-\udfff]")
SURROGATE_RE: Final = re.compile("[\ud800-\udfff]")

# ------------------------------------------------------------------------- text


def sanitize_text(text: str, max_chars: int) -> str:
    """Remove control characters (tab kept) and truncate to ``max_chars`` (ending in '…')."""
    text = _STRIP_RE.sub("", text)
    if len(text) > max_chars:
        text = text[: max_chars - 1] + "…"
    return text


def bounded_number(value: object, lo: float, hi: float, *, lo_open: bool = False) -> float:
    """``value`` as a float in ``[lo, hi]`` (``(lo, hi]`` with ``lo_open``); else ValueError
    saying the rule ("must be a number", "must be 1..86400", "must be > 0 and ≤ 60")."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError("must be a number")
    number = float(value)
    if not math.isfinite(number) or number > hi or number < lo or (lo_open and number == lo):
        expected = f"> {lo:g} and ≤ {hi:g}" if lo_open else f"{lo:g}..{hi:g}"
        raise ValueError(f"must be {expected}")
    return number


def json_len(text: str) -> int:
    """Bytes ``text`` takes as a JSON string (quotes included) in our UTF-8 output."""
    return len(encode_basestring(text).encode())


# ------------------------------------------------------------------ strict reading

_MISSING: Final[Any] = object()
_T = TypeVar("_T")
_E = TypeVar("_E", bound=StrEnum)


def _path(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key


class Fields:
    """Reads one JSON object strictly, naming the full field path in every error."""

    def __init__(
        self,
        obj: object,
        where: str,
        *,
        required: Iterable[str],
        optional: Iterable[str] = (),
    ) -> None:
        if not isinstance(obj, Mapping):
            what = where or "body"
            raise ValidationError(f"{what} must be a JSON object", field=where or None)
        required = tuple(required)
        known = set(required) | set(optional)
        for key in obj:
            if key not in known:
                name = key if isinstance(key, str) else repr(key)
                raise ValidationError(f"unknown field {name!r}", field=_path(where, name))
        for key in required:
            if key not in obj:
                raise ValidationError(f"missing field {key!r}", field=_path(where, key))
        self._obj: Mapping[Any, object] = obj
        self._where = where

    def path(self, key: str) -> str:
        return _path(self._where, key)

    def _absent(self, key: str, default: _T) -> _T:
        if default is _MISSING:
            raise ValidationError(f"missing field {key!r}", field=self.path(key))
        return default

    def has(self, key: str) -> bool:
        return key in self._obj

    def raw(self, key: str) -> object:
        return self._obj[key]

    def get_str(
        self,
        key: str,
        *,
        default: str = _MISSING,
        max_len: int | None = None,
        nonempty: bool = False,
        ident: bool = False,
    ) -> str:
        """A string; ``ident`` refuses control characters (for single-line names)."""
        if key not in self._obj:
            return self._absent(key, default)
        value = self._obj[key]
        p = self.path(key)
        if not isinstance(value, str):
            raise ValidationError(f"{p} must be a string", field=p)
        if max_len is not None and len(value) > max_len:
            raise ValidationError(f"{p} must be at most {max_len} characters", field=p)
        if nonempty and not value:
            raise ValidationError(f"{p} must not be empty", field=p)
        bad = CONTROL_RE if ident else SURROGATE_RE
        if bad.search(value):
            raise ValidationError(f"{p} contains forbidden characters", field=p)
        return value

    def get_opt_str(self, key: str, *, max_len: int | None = None) -> str | None:
        """A string or null (missing counts as null)."""
        if self._obj.get(key) is None:
            return None
        return self.get_str(key, max_len=max_len)

    def get_int(self, key: str, *, lo: int, hi: int, default: int = _MISSING) -> int:
        if key not in self._obj:
            return self._absent(key, default)
        value = self._obj[key]
        p = self.path(key)
        # bool is an int subclass; true is not 1 here.
        if not isinstance(value, int) or isinstance(value, bool):
            raise ValidationError(f"{p} must be an integer", field=p)
        if not lo <= value <= hi:
            raise ValidationError(f"{p} must be between {lo} and {hi}", field=p)
        return value

    def get_opt_int(self, key: str, *, lo: int, hi: int) -> int | None:
        if self._obj.get(key) is None:
            return None
        return self.get_int(key, lo=lo, hi=hi)

    def get_bool(self, key: str, *, default: bool = _MISSING) -> bool:
        if key not in self._obj:
            return self._absent(key, default)
        value = self._obj[key]
        if not isinstance(value, bool):
            raise ValidationError(f"{self.path(key)} must be true or false", field=self.path(key))
        return value

    def get_ts(self, key: str) -> datetime:
        value = self._obj[key]
        p = self.path(key)
        if not isinstance(value, str):
            raise ValidationError(f"{p} must be an RFC 3339 timestamp string", field=p)
        return parse_ts(value, p)

    def get_list(self, key: str, *, max_items: int | None = None) -> list[object]:
        value = self._obj[key]
        p = self.path(key)
        if not isinstance(value, list):
            raise ValidationError(f"{p} must be a list", field=p)
        if max_items is not None and len(value) > max_items:
            raise ValidationError(f"{p} must have at most {max_items} items", field=p)
        return value

    def get_choice(self, key: str, choices: type[_E]) -> _E:
        """One of the values of the string enum ``choices``."""
        value = self._obj[key]
        if isinstance(value, str):
            try:
                return choices(value)
            except ValueError:
                pass
        p = self.path(key)
        names = ", ".join(c.value for c in choices)
        raise ValidationError(f"{p} must be one of {names}", field=p)

    def rename(self, key: str, fn: Callable[[object], str]) -> str:
        """Run a schema validator on a field, re-labelling its error with our path."""
        try:
            return fn(self._obj[key])
        except ValidationError as exc:
            raise ValidationError(exc.message, field=self.path(key)) from None


def load_json(data: bytes | str) -> object:
    try:
        return json.loads(data)
    except (ValueError, RecursionError):
        # ValueError covers JSONDecodeError, bad UTF-8 and over-long integers.
        raise ValidationError("body is not valid JSON", field=None) from None


def dump_json(obj: object) -> bytes:
    # ensure_ascii=False: UTF-8 bytes, so sizes measured here are the stored sizes.
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()


class Document:
    """JSON (bytes) in and out for the document dataclasses."""

    __slots__ = ()

    def to_dict(self) -> dict[str, Any]:
        """The JSON-shaped dict of this document."""
        raise NotImplementedError

    @classmethod
    def from_dict(cls, obj: object) -> Self:
        """Parse a JSON-shaped object strictly; ValidationError names the bad field."""
        raise NotImplementedError

    def to_json(self) -> bytes:
        """Compact UTF-8 JSON."""
        return dump_json(self.to_dict())

    @classmethod
    def from_json(cls, data: bytes | str) -> Self:
        """Parse JSON text strictly (see :meth:`from_dict`)."""
        return cls.from_dict(load_json(data))
