"""Serializing a parsed body again without losing integers orjson cannot hold.

The gateway sends what it checked: a body parsed with orjson and serialized
again.  orjson reads an integer beyond 64 bits as a float (123456789012345678901234567890
becomes 1.2345678901234568e+29), and such a float prints with an exponent of 19 or
more.  So a serialized body without one lost nothing; one with it (also a float the
client wrote that way) is made again with the standard library from the parsed body,
each such float given back the integer the original bytes held at the same place.
"""
from __future__ import annotations

import json
import re
from typing import Any, Iterator

import orjson

_EXPONENT = re.compile(rb"e\+(?:1[89]|[2-9][0-9]|[0-9]{3})[,\]}]")
_MANTISSA = frozenset(b"0123456789.-")
_BEFORE_VALUE = frozenset(b":,[")
# Past these, orjson has read an integer as a float.
_INT_MIN, _INT_MAX = -(2 ** 63), 2 ** 64 - 1


def dumps(obj: Any, original: bytes) -> bytes:
    """`obj` (parsed from `original` by orjson, and maybe changed since) as JSON bytes."""
    out = orjson.dumps(obj)
    if b"+" not in out or not _big_exponent(out):     # a one-byte search first: memchr, ~20x cheaper per byte
        return out
    try:
        exact = json.loads(original)
    except (ValueError, RecursionError):
        return out
    restored, changed = _restore(obj, exact)
    restored, moved = _restore_moved(restored, exact)
    if not (changed or moved):
        return out
    return json.dumps(restored, ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode()


def _big_exponent(out: bytes) -> bool:
    """Whether `out` holds a JSON number with an exponent of 18 or more (`e+` and 18 to 99 or three digits, a
    value of its own: after `:`, `,` or `[`, before `,`, `]` or `}`): what orjson writes for a float it made
    of an integer beyond 64 bits (from -9.2e18 down, from 1.8e19 up).  The regular expression starts with a
    literal, which the engine finds as fast as `bytes.find`; the few places in code or base64 text that match
    it are told apart by what surrounds them."""
    for found in _EXPONENT.finditer(out):
        at = found.start() - 1
        while at >= 0 and out[at] in _MANTISSA:
            at -= 1
        if at >= 0 and at < found.start() - 1 and out[at] in _BEFORE_VALUE:
            return True
    return False


def _restore(ours: Any, theirs: Any) -> tuple[Any, bool]:
    """`ours` with each float that orjson made of a big integer replaced by that integer, as `theirs` (the same
    document parsed by the standard library) holds it at the same place; parts the gateway changed (another
    key set, another length) are kept as they are."""
    kind = type(ours)
    if kind is float:
        if type(theirs) is int and not _INT_MIN <= theirs <= _INT_MAX:
            try:
                if float(theirs) == ours:
                    return theirs, True
            except OverflowError:
                pass
        return ours, False
    if kind is dict and type(theirs) is dict:
        changed = False
        out = {}
        for key, value in ours.items():
            out[key], restored = _restore(value, theirs.get(key))
            changed = changed or restored
        return (out, True) if changed else (ours, False)
    if kind is list and type(theirs) is list and len(ours) == len(theirs):
        pairs = [_restore(a, b) for a, b in zip(ours, theirs)]
        if any(restored for _, restored in pairs):
            return [value for value, _ in pairs], True
    return ours, False


def _restore_moved(ours: Any, theirs: Any) -> tuple[Any, bool]:
    """Floats left in `ours` that stand for exactly one big integer of `theirs` (a part the gateway moved, such
    as an OpenAI-style response_format it translated): given that integer."""
    exact: dict[float, Any] = {}
    for value in _big_ints(theirs):
        as_float = float(value)
        exact[as_float] = value if exact.get(as_float, value) == value else None     # None: two integers, unsure
    if not exact:
        return ours, False
    return _replace(ours, exact)


def _big_ints(doc: Any) -> Iterator[int]:
    kind = type(doc)
    if kind is int and not _INT_MIN <= doc <= _INT_MAX:
        yield doc
    elif kind is dict:
        for value in doc.values():
            yield from _big_ints(value)
    elif kind is list:
        for value in doc:
            yield from _big_ints(value)


def _replace(doc: Any, exact: dict) -> tuple[Any, bool]:
    kind = type(doc)
    if kind is float:
        value = exact.get(doc)
        return (value, True) if value is not None else (doc, False)
    if kind is dict:
        pairs = {key: _replace(value, exact) for key, value in doc.items()}
        if any(changed for _, changed in pairs.values()):
            return {key: value for key, (value, _) in pairs.items()}, True
    elif kind is list:
        pairs = [_replace(value, exact) for value in doc]
        if any(changed for _, changed in pairs):
            return [value for value, _ in pairs], True
    return doc, False
