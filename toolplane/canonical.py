"""The one place where bytes that get hashed or signed are produced.

Canonical JSON is RFC 8785 (JCS), through the ``rfc8785`` package. At the
boundary we refuse what JCS or JavaScript consumers cannot carry faithfully:
NaN and infinities, integers beyond 2**53, duplicate object keys, non-string keys.
"""

from __future__ import annotations

import hashlib
import json
import math
from typing import Any

import rfc8785

from toolplane.errors import CanonicalJSONError

MAX_SAFE_INTEGER = 2**53 - 1
MAX_DEPTH = 64

__all__ = [
    "canonical_json",
    "contains_nul",
    "sha256_hex",
    "digest",
    "parse_json_strict",
    "check_json_value",
    "MAX_SAFE_INTEGER",
]


class _Refused(Exception):
    """A value JCS cannot carry; ``steps`` is its path below the value checked, built on
    the way out (a path is written only for a value refused, not for every value)."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message
        self.steps: list[str] = []  # innermost step first


def _check(value: Any, path: str, depth: int) -> bool:
    """Raise on values JCS cannot carry; return True if the value is "simple".

    Simple means no floats and no object key outside the Basic Multilingual
    Plane: for such values Python's own encoder, with sorted keys, compact
    separators and no ASCII escaping, writes exactly the RFC 8785 bytes (same
    escapes, and code-point order equals UTF-16 order for BMP keys).
    """
    try:
        return _walk(value, depth)
    except _Refused as e:
        raise CanonicalJSONError(e.message, path=path + "".join(reversed(e.steps))) from None


def _walk(value: Any, depth: int) -> bool:
    if depth > MAX_DEPTH:
        raise _Refused(f"nested deeper than {MAX_DEPTH} levels")
    if value is None or isinstance(value, bool | str):
        return True
    if isinstance(value, int):
        if abs(value) > MAX_SAFE_INTEGER:
            raise _Refused("integer beyond 2**53 cannot be carried exactly")
        return True
    if isinstance(value, float):
        if math.isnan(value) or math.isinf(value):
            raise _Refused("NaN and infinity are not JSON")
        if abs(value) > MAX_SAFE_INTEGER:
            # JCS writes such a float as an integer literal, which would not parse back.
            raise _Refused("number beyond 2**53 cannot be carried exactly")
        return False
    if isinstance(value, dict):
        simple = True
        for key, item in value.items():
            if not isinstance(key, str):
                raise _Refused("object keys must be strings")
            # a key outside the BMP (ASCII, the usual key, is checked in constant time)
            if simple and not key.isascii() and max(key) > "\uffff":
                simple = False
            try:
                simple = _walk(item, depth + 1) and simple
            except _Refused as e:
                e.steps.append(f".{key}")
                raise
        return simple
    if isinstance(value, list | tuple):
        simple = True
        for index, item in enumerate(value):
            try:
                simple = _walk(item, depth + 1) and simple
            except _Refused as e:
                e.steps.append(f"[{index}]")
                raise
        return simple
    raise _Refused(f"{type(value).__name__} is not a JSON value")


def check_json_value(value: Any, path: str = "$", depth: int = 0) -> None:
    """Raise CanonicalJSONError if ``value`` is not safely representable as JCS JSON."""
    _check(value, path, depth)


def canonical_json(value: Any) -> bytes:
    """Return the RFC 8785 canonical encoding of ``value``."""
    if _check(value, "$", 0):
        try:
            return json.dumps(
                value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
            ).encode("utf-8")
        except UnicodeEncodeError:
            pass  # a lone surrogate: the reference encoder below refuses it properly
    try:
        return rfc8785.dumps(value)
    except (rfc8785.CanonicalizationError, TypeError, ValueError) as e:
        raise CanonicalJSONError(str(e)) from e


def contains_nul(value: Any) -> bool:
    """True if any string (or key) holds U+0000, which PostgreSQL's JSONB cannot store."""
    if isinstance(value, str):
        return "\x00" in value
    if isinstance(value, dict):
        return any("\x00" in k or contains_nul(v) for k, v in value.items())
    if isinstance(value, list | tuple):
        return any(contains_nul(v) for v in value)
    return False


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def digest(value: Any) -> str:
    """SHA-256 (hex) over the canonical JSON of ``value``."""
    return sha256_hex(canonical_json(value))


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, item in pairs:
        if key in result:
            raise CanonicalJSONError(f"duplicate key {key!r}")
        result[key] = item
    return result


def _no_constants(name: str) -> Any:
    raise CanonicalJSONError(f"{name} is not JSON")


def parse_json_strict(data: str | bytes) -> Any:
    """Parse JSON, refusing duplicate keys, NaN/Infinity, unsafe numbers and deep nesting."""
    try:
        text = data.decode("utf-8") if isinstance(data, bytes) else data
        value = json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_no_constants)
    except CanonicalJSONError:
        raise
    except json.JSONDecodeError as e:
        raise CanonicalJSONError(f"not valid JSON: {e.msg} at position {e.pos}") from e
    except UnicodeDecodeError as e:
        raise CanonicalJSONError(f"not UTF-8: {e.reason} at byte {e.start}") from e
    except RecursionError as e:
        raise CanonicalJSONError(f"nested deeper than {MAX_DEPTH} levels") from e
    except ValueError as e:  # e.g. an integer literal longer than int() accepts
        raise CanonicalJSONError(f"not valid JSON: {e}") from e
    check_json_value(value)
    return value
