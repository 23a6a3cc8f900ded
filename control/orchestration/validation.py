"""Checks of what a caller gives: labels, and a call's arguments against the tool's schema.

A tool's argument schema comes from a worker (through an approved manifest), and the
control evaluates it, so nothing in it may stall the control: every regular expression
(``pattern``, ``patternProperties``, ``format: regex``) is matched by RE2, whose time is
linear in the input (no backtracking), and a schema is checked before it is approved
(:func:`check_args_schema`): its size, its depth, each pattern's length, that RE2
compiles each pattern (no backreferences, no lookaround), and no keyword that would
match with Python's backtracking ``re`` (``unevaluatedProperties``) or fetch a schema
from elsewhere (a ``$ref`` outside the schema, ``$id``, ``$dynamicRef``).
"""

from __future__ import annotations

from collections.abc import Iterator
from functools import lru_cache
from typing import Any
from urllib.parse import unquote

import re2
from jsonschema import Draft202012Validator, FormatChecker, ValidationError, validators
from jsonschema.exceptions import SchemaError

from control.errors import UsageError
from toolplane.canonical import CanonicalJSONError, canonical_json, check_json_value, contains_nul

__all__ = [
    "MAX_EXPANDED",
    "MAX_PATTERN_CHARS",
    "MAX_SCHEMA_BYTES",
    "MAX_SCHEMA_DEPTH",
    "NAME_RULE",
    "SchemaRefused",
    "check_args_schema",
    "check_json",
    "check_label",
    "validate_args",
]

NAME_RULE = "1-40 characters of a-z, 0-9, '-' or '_'"
MAX_SCHEMA_BYTES = 64 * 1024  # canonical JSON of one tool's argument schema
MAX_SCHEMA_DEPTH = 32  # nesting of objects and arrays in it
MAX_PATTERN_CHARS = 1000
MAX_EXPANDED = 5000  # subschemas once every $ref is replaced by what it points to
RE2_MAX_MEM = 8 << 20  # what RE2 may spend on one compiled pattern
REFUSED_KEYWORDS = {
    "unevaluatedProperties": "it matches patternProperties with Python's backtracking re",
    "$id": "a schema identifies no other resource here",
    "$anchor": "a schema identifies no other resource here",
    "$dynamicRef": "only local $ref is resolved",
    "$dynamicAnchor": "only local $ref is resolved",
}
DIALECT = "https://json-schema.org/draft/2020-12/schema"


class SchemaRefused(UsageError):
    """A tool's argument schema the control will not evaluate (the rule it breaks)."""


def _options() -> re2.Options:
    options = re2.Options()
    options.log_errors = False  # the problem is raised, not written to stderr
    options.max_mem = RE2_MAX_MEM
    return options


@lru_cache(maxsize=1024)
def compile_pattern(pattern: str) -> Any:
    """The RE2 program of a JSON Schema pattern; re2.error if RE2 cannot compile it."""
    return re2.compile(pattern, _options())


def _why(error: Exception) -> str:
    text = error.args[0] if error.args else error
    return text.decode(errors="replace") if isinstance(text, bytes) else str(text)


def _search(pattern: str, text: str) -> bool:
    try:
        return compile_pattern(pattern).search(text) is not None
    except re2.error as e:  # refused at approval; a schema from before that is still refused
        raise SchemaRefused(f"RE2 cannot compile {pattern!r}: {_why(e)}", field="pattern") from e


def _pattern(validator: Any, pattern: str, instance: Any, schema: Any) -> Iterator[ValidationError]:
    if validator.is_type(instance, "string") and not _search(pattern, instance):
        shown = repr(instance) if len(instance) <= 80 else repr(instance[:80]) + "..."
        yield ValidationError(f"{shown} does not match {pattern!r}")


def _pattern_properties(
    validator: Any, patterns: dict[str, Any], instance: Any, schema: Any
) -> Iterator[ValidationError]:
    if not validator.is_type(instance, "object"):
        return
    for pattern, subschema in patterns.items():
        for key, value in instance.items():
            if _search(pattern, key):
                yield from validator.descend(value, subschema, path=key, schema_path=pattern)


def _additional_properties(
    validator: Any, additional: Any, instance: Any, schema: Any
) -> Iterator[ValidationError]:
    """jsonschema's own, with the keys that patternProperties cover found by RE2."""
    if not validator.is_type(instance, "object"):
        return
    properties = schema.get("properties", {})
    patterns = list(schema.get("patternProperties", {}))
    extras = [
        key
        for key in instance
        if key not in properties and not any(_search(p, key) for p in patterns)
    ]
    if validator.is_type(additional, "object"):
        for extra in extras:
            yield from validator.descend(instance[extra], additional, path=extra)
    elif not additional and extras:
        listed = ", ".join(repr(e) for e in sorted(extras))
        yield ValidationError(f"Additional properties are not allowed ({listed} unexpected)")


def _same(value: Any) -> Any:
    """A hashable stand-in for a JSON value, equal for values JSON Schema calls equal
    (1 and 1.0 alike, true and 1 not, objects whatever their key order)."""
    if isinstance(value, bool) or value is None:
        return ("b", value)
    if isinstance(value, int | float):
        return ("n", value)
    if isinstance(value, str):
        return ("s", value)
    if isinstance(value, list):
        return ("l", tuple(_same(v) for v in value))
    if isinstance(value, dict):
        return ("o", frozenset((k, _same(v)) for k, v in value.items()))
    return ("?", repr(value))


def _unique_items(
    validator: Any, unique: Any, instance: Any, schema: Any
) -> Iterator[ValidationError]:
    """jsonschema's compares every pair of items that do not sort (objects, mixed types):
    quadratic in the array a caller sends. Here: one pass, hashing each item."""
    if not unique or not validator.is_type(instance, "array"):
        return
    seen: set[Any] = set()
    for index, item in enumerate(instance):
        key = _same(item)
        if key in seen:
            yield ValidationError(f"item {index} repeats an earlier one (uniqueItems)")
            return
        seen.add(key)


def _is_regex(instance: object) -> bool:
    if not isinstance(instance, str):
        return True
    compile_pattern(instance)  # re2.error: not a regex RE2 takes
    return True


FORMATS = FormatChecker(formats=())
FORMATS.checks("regex", raises=re2.error)(_is_regex)

# JSON Schema counts 3.0 as an integer; the tools' strict models do not. Every regular
# expression is RE2's.
StrictValidator = validators.extend(
    Draft202012Validator,
    validators={
        "pattern": _pattern,
        "patternProperties": _pattern_properties,
        "additionalProperties": _additional_properties,
        "uniqueItems": _unique_items,
    },
    type_checker=Draft202012Validator.TYPE_CHECKER.redefine(
        "integer", lambda _checker, value: isinstance(value, int) and not isinstance(value, bool)
    ),
    format_checker=FORMATS,
)


def check_label(value: str, field: str) -> None:
    if not (0 < len(value) <= 40) or not all(c.isalnum() or c in "-_" for c in value):
        raise UsageError(f"must be {NAME_RULE}", field=field)


def check_json(value: Any, field: str) -> None:
    """Refuse what canonical JSON cannot carry (nested over 64 levels, a lone surrogate,
    an integer past 2**53, NaN) before anything walks it: a caller's arguments and inputs
    are checked at the API, so nothing deeper can reach recursive code."""
    try:
        canonical_json(value)
    except CanonicalJSONError as e:
        raise UsageError(str(e), field=field) from e


def _depth(node: Any) -> int:
    """How deeply objects and arrays nest in ``node`` (iteratively: the schema may be deep)."""
    deepest, stack = 0, [(node, 0)]
    while stack:
        item, depth = stack.pop()
        deepest = max(deepest, depth)
        if depth > MAX_SCHEMA_DEPTH:
            break
        children = (
            item.values() if isinstance(item, dict) else item if isinstance(item, list) else ()
        )
        stack.extend((child, depth + 1) for child in children)
    return deepest


SUBSCHEMA: tuple[str, ...] = (
    "items",
    "additionalProperties",
    "not",
    "if",
    "then",
    "else",
    "contains",
)
SUBSCHEMA += ("propertyNames", "unevaluatedItems", "additionalItems")
SUBSCHEMA_LISTS = ("allOf", "anyOf", "oneOf", "prefixItems")
SUBSCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")


def _schemas(node: Any, path: str) -> Iterator[tuple[str, dict[str, Any]]]:
    """Every (sub)schema in ``node`` with where it is; not the values of enum, const or
    default, which are data."""
    if not isinstance(node, dict):
        return
    yield path, node
    for key in SUBSCHEMA:
        yield from _schemas(node.get(key), f"{path}.{key}")
    for key in SUBSCHEMA_LISTS:
        if isinstance(node.get(key), list):
            for index, sub in enumerate(node[key]):
                yield from _schemas(sub, f"{path}.{key}[{index}]")
    for key in SUBSCHEMA_MAPS:
        if isinstance(node.get(key), dict):
            for name, sub in node[key].items():
                yield from _schemas(sub, f"{path}.{key}.{name}")


def _check_pattern(pattern: Any, where: str) -> None:
    if not isinstance(pattern, str):
        raise SchemaRefused("a pattern must be a string", field=where)
    if len(pattern) > MAX_PATTERN_CHARS:
        raise SchemaRefused(
            f"a pattern may have at most {MAX_PATTERN_CHARS} characters, not {len(pattern)}",
            field=where,
        )
    try:
        compile_pattern(pattern)
    except re2.error as e:
        raise SchemaRefused(
            f"RE2 cannot compile {pattern!r} ({_why(e)}): patterns are matched by RE2, "
            "which has no backreferences or lookaround",
            field=where,
        ) from e


def _pointed(schema: dict[str, Any], ref: str, where: str) -> Any:
    """What a local ``$ref`` (``#`` or ``#/a/b``) points to in ``schema``."""
    if ref != "#" and not ref.startswith("#/"):
        raise SchemaRefused(f"$ref {ref[:80]!r} must be '#' or a '#/...' pointer", field=where)
    node: Any = schema
    for part in ref[2:].split("/") if ref != "#" else []:
        key = unquote(part).replace("~1", "/").replace("~0", "~")
        if isinstance(node, dict) and key in node:
            node = node[key]
        elif isinstance(node, list) and key.isdigit() and int(key) < len(node):
            node = node[int(key)]
        else:
            raise SchemaRefused(f"$ref {ref[:80]!r} points to nothing", field=where)
    return node


def _check_expansion(schema: dict[str, Any], where: str) -> None:
    """Refuse a schema whose ``$ref``s refer back to themselves, or that grows past
    ``MAX_EXPANDED`` subschemas once each ``$ref`` is replaced by its target: twenty
    definitions that each refer twice to the next are 2 KB, and 2**20 checks of every
    argument."""
    sizes: dict[str, int] = {}

    def size(node: Any, base: str, refs: tuple[str, ...]) -> int:
        total = 0
        for path, sub in _schemas(node, base):
            total += 1
            ref = sub.get("$ref")
            if isinstance(ref, str):
                if ref in refs:
                    raise SchemaRefused(
                        f"$ref {ref[:80]!r} refers to itself: recursive schemas are not accepted",
                        field=path,
                    )
                if len(refs) >= MAX_SCHEMA_DEPTH:
                    raise SchemaRefused(
                        f"$refs chain deeper than {MAX_SCHEMA_DEPTH} levels", field=path
                    )
                if ref not in sizes:
                    target = _pointed(schema, ref, path)
                    sizes[ref] = size(target, where + ref[1:].replace("/", "."), (*refs, ref))
                total += sizes[ref]
            if total > MAX_EXPANDED:
                raise SchemaRefused(
                    f"expands to more than {MAX_EXPANDED} subschemas once each $ref is "
                    "replaced by what it points to",
                    field=path,
                )
        return total

    size(schema, where, ())


def check_args_schema(schema: Any, where: str = "args_schema") -> None:
    """Refuse an argument schema the control will not evaluate (SchemaRefused, naming the
    place in the schema and the rule); a schema that passes is matched in linear time."""
    if not isinstance(schema, dict):
        raise SchemaRefused("must be a JSON Schema object", field=where)
    try:
        size = len(canonical_json(schema))
    except CanonicalJSONError as e:
        raise SchemaRefused(str(e), field=where) from e
    if size > MAX_SCHEMA_BYTES:
        raise SchemaRefused(
            f"may have at most {MAX_SCHEMA_BYTES} bytes of canonical JSON, not {size}", field=where
        )
    if _depth(schema) > MAX_SCHEMA_DEPTH:
        raise SchemaRefused(f"nests deeper than {MAX_SCHEMA_DEPTH} levels", field=where)
    for path, node in _schemas(schema, where):
        for keyword, why in REFUSED_KEYWORDS.items():
            if keyword in node:
                raise SchemaRefused(f"{keyword} is not accepted: {why}", field=path)
        if node.get("$schema", DIALECT) != DIALECT:
            raise SchemaRefused(f"$schema must be {DIALECT}", field=path)
        ref = node.get("$ref")
        if ref is not None and not (isinstance(ref, str) and ref.startswith("#")):
            raise SchemaRefused("$ref must point inside the schema (start with '#')", field=path)
        if "pattern" in node:
            _check_pattern(node["pattern"], f"{path}.pattern")
        if isinstance(node.get("patternProperties"), dict):
            for pattern in node["patternProperties"]:
                _check_pattern(pattern, f"{path}.patternProperties")
    _check_expansion(schema, where)
    try:
        StrictValidator.check_schema(schema, format_checker=FORMATS)
    except SchemaError as e:
        at = ".".join(str(p) for p in e.path)
        raise SchemaRefused(
            f"not a valid JSON Schema: {e.message}", field=f"{where}.{at}" if at else where
        ) from e


def validate_args(manifest: dict[str, Any], args: dict[str, Any]) -> None:
    """Check the call's arguments against the tool's approved JSON Schema."""
    try:
        check_json_value(args)
    except CanonicalJSONError as e:
        raise UsageError(str(e), field="--arg") from e
    for key, value in args.items():
        if contains_nul(key) or contains_nul(value):
            raise UsageError("NUL characters are not accepted", field=f"--arg {key}")
    validator = StrictValidator(manifest["args_schema"], format_checker=FORMATS)
    try:
        errors = sorted(validator.iter_errors(args), key=lambda e: list(e.path))
    except RecursionError as e:  # a $ref loop that consumes nothing: the schema's fault
        raise UsageError(
            f"the tool's argument schema refers to itself without end: {manifest.get('name')}",
            field="--arg",
        ) from e
    if not errors:
        return
    error = errors[0]
    if error.validator == "additionalProperties":
        extra = [
            key if len(key) <= 80 else key[:80] + "..."
            for key in sorted(set(args) - set(manifest["args_schema"].get("properties", {})))
        ]
        raise UsageError(
            "unexpected field: this tool takes "
            + ", ".join(sorted(manifest["args_schema"].get("properties", {}))),
            field=f"--arg {', '.join(extra)}",
        )
    field = ".".join(str(p) for p in error.path) or (
        error.message.split("'")[1] if error.validator == "required" else "args"
    )
    raise UsageError(error.message, field=f"--arg {field}")
