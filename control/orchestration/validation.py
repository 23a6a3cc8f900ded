"""Checks of what a caller gives: labels, and a call's arguments against the tool's schema."""

from __future__ import annotations

from typing import Any

from jsonschema import Draft202012Validator, validators

from control.errors import UsageError
from toolplane.canonical import CanonicalJSONError, canonical_json, check_json_value, contains_nul

__all__ = ["NAME_RULE", "check_json", "check_label", "validate_args"]

NAME_RULE = "1-40 characters of a-z, 0-9, '-' or '_'"

# JSON Schema counts 3.0 as an integer; the tools' strict models do not.
StrictValidator = validators.extend(
    Draft202012Validator,
    type_checker=Draft202012Validator.TYPE_CHECKER.redefine(
        "integer", lambda _checker, value: isinstance(value, int) and not isinstance(value, bool)
    ),
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


def validate_args(manifest: dict[str, Any], args: dict[str, Any]) -> None:
    """Check the call's arguments against the tool's announced JSON Schema."""
    try:
        check_json_value(args)
    except CanonicalJSONError as e:
        raise UsageError(str(e), field="--arg") from e
    for key, value in args.items():
        if contains_nul(key) or contains_nul(value):
            raise UsageError("NUL characters are not accepted", field=f"--arg {key}")
    validator = StrictValidator(manifest["args_schema"])
    errors = sorted(validator.iter_errors(args), key=lambda e: list(e.path))
    if not errors:
        return
    error = errors[0]
    if error.validator == "additionalProperties":
        extra = sorted(set(args) - set(manifest["args_schema"].get("properties", {})))
        raise UsageError(
            "unexpected field: this tool takes "
            + ", ".join(sorted(manifest["args_schema"].get("properties", {}))),
            field=f"--arg {', '.join(extra)}",
        )
    field = ".".join(str(p) for p in error.path) or (
        error.message.split("'")[1] if error.validator == "required" else "args"
    )
    raise UsageError(error.message, field=f"--arg {field}")
