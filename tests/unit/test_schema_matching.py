"""Argument schemas come from workers: every pattern is RE2's, and a schema the control
would not evaluate safely is refused before it can be approved."""

from __future__ import annotations

import time
from typing import Any

import pytest

from control.errors import ManifestRefused, UsageError
from control.orchestration.manifests import check_manifest
from control.orchestration.validation import (
    MAX_PATTERN_CHARS,
    MAX_SCHEMA_BYTES,
    MAX_SCHEMA_DEPTH,
    SchemaRefused,
    check_args_schema,
    validate_args,
)

CATASTROPHIC = "^(.*?,){12}P"


def manifest(schema: dict[str, Any]) -> dict[str, Any]:
    return {
        "name": "t",
        "version": "1.0.0",
        "args_schema": schema,
        "limits": {"timeout_s": 5},
        "read_only": False,
        "max_attempts": 1,
    }


def test_the_pattern_that_python_re_backtracks_on_is_matched_by_re2_at_once() -> None:
    """Python's re takes 0.3 s on it at 22 commas, tripling every 2 more; RE2 is linear."""
    schema = {"type": "object", "properties": {"q": {"type": "string", "pattern": CATASTROPHIC}}}
    check_args_schema(schema)
    started = time.perf_counter()
    with pytest.raises(UsageError, match="does not match"):
        validate_args(manifest(schema), {"q": "," * 100_000})
    re2_100k = time.perf_counter() - started
    assert re2_100k < 0.5, f"RE2 took {re2_100k:.3f}s on 100,000 commas"
    validate_args(manifest(schema), {"q": "a," * 12 + "P"})


def test_pattern_properties_and_additional_properties_match_with_re2() -> None:
    schema = {
        "type": "object",
        "patternProperties": {CATASTROPHIC: {"type": "integer"}, "^x_": {"type": "integer"}},
        "additionalProperties": False,
    }
    check_args_schema(schema)
    started = time.perf_counter()
    with pytest.raises(UsageError, match="unexpected field") as caught:
        validate_args(manifest(schema), {"," * 50_000: 1})
    assert len(str(caught.value)) < 300
    assert time.perf_counter() - started < 0.5
    validate_args(manifest(schema), {"x_1": 1})
    with pytest.raises(UsageError, match="integer"):
        validate_args(manifest(schema), {"x_1": "no"})


def test_format_regex_is_judged_by_re2() -> None:
    schema = {"type": "object", "properties": {"r": {"type": "string", "format": "regex"}}}
    validate_args(manifest(schema), {"r": "^[a-z]+$"})
    with pytest.raises(UsageError, match="regex"):
        validate_args(manifest(schema), {"r": "(a)\\1"})


@pytest.mark.parametrize(
    ("schema", "message"),
    [
        ({"pattern": "(a)\\1"}, "RE2 cannot compile"),
        ({"pattern": "(?=a)b"}, "lookaround"),
        ({"properties": {"a": {"pattern": "(?<!a)b"}}}, "properties.a.pattern"),
        ({"patternProperties": {"(a)\\1": {}}}, "patternProperties"),
        ({"pattern": "a" * (MAX_PATTERN_CHARS + 1)}, "at most"),
        ({"$ref": "https://example.com/schema"}, "inside the schema"),
        ({"unevaluatedProperties": False}, "unevaluatedProperties"),
        ({"$id": "https://example.com/s"}, "$id"),
        ({"type": "strng"}, "not a valid JSON Schema"),
        ({"description": "x" * MAX_SCHEMA_BYTES}, "bytes"),
    ],
)
def test_schemas_the_control_will_not_evaluate_are_refused(
    schema: dict[str, Any], message: str
) -> None:
    with pytest.raises(SchemaRefused) as caught:
        check_args_schema(schema)
    assert message in str(caught.value)
    with pytest.raises(ManifestRefused, match="args_schema"):
        check_manifest(manifest(schema))


def test_a_deep_schema_is_refused_and_a_property_named_pattern_is_not_a_pattern() -> None:
    deep: dict[str, Any] = {}
    inner = deep
    for _ in range(MAX_SCHEMA_DEPTH + 1):
        inner["items"] = {}
        inner = inner["items"]
    with pytest.raises(SchemaRefused, match="deeper"):
        check_args_schema(deep)
    named = {
        "type": "object",
        "properties": {"pattern": {"type": "string"}, "$id": {"type": "string"}},
        "default": {"pattern": "(a)\\1"},
    }
    check_args_schema(named)
    validate_args(manifest(named), {"pattern": "(a)\\1"})


def test_a_self_referring_schema_is_a_clear_error_not_a_crash() -> None:
    with pytest.raises(UsageError, match="refers to itself"):
        validate_args(manifest({"$ref": "#"}), {})


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"version": ""}, "version"),
        ({"version": "x" * 41}, "version"),
        ({"limits": {"timeout_s": 0}}, "limits.timeout_s"),
        ({"limits": {}}, "limits.timeout_s"),
        ({"max_attempts": 11}, "max_attempts"),
        ({"read_only": "yes"}, "read_only"),
    ],
)
def test_a_manifest_the_control_cannot_use_is_refused(change: dict[str, Any], field: str) -> None:
    with pytest.raises(ManifestRefused) as caught:
        check_manifest(manifest({"type": "object"}) | change)
    assert caught.value.field == field
