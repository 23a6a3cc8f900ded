"""``--arg K=V``, ``up --workers`` and ``worker --autoscale`` parsing, and the intake's check
of arguments against a tool's manifest."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from control.cli.support import parse_args, parse_autoscale, parse_worker_counts
from control.errors import EXIT_USAGE, UsageError
from control.orchestration.validation import validate_args
from sandbox_tasks.tools.read_repo_file import TOOL as READ_REPO_FILE

MANIFEST = READ_REPO_FILE.manifest()

# -- parse_args --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("pair", "value"),
    [
        ("k=v", "v"),
        ("n=3", 3),
        ("n=-3", -3),
        ("f=2.5", 2.5),
        ('o={"a":1}', {"a": 1}),
        ("l=[1,2]", [1, 2]),
        ("b=true", True),
        ("z=null", None),
        ('s="3"', "3"),
        ("x=", ""),
        ("k=a=b", "a=b"),
        ("p=src/app.py", "src/app.py"),
        ("k= spaced ", " spaced "),
        ("k=NaN", "NaN"),  # not JSON we accept: kept as text
        ('d={"a":1,"a":2}', '{"a":1,"a":2}'),  # duplicate keys: kept as text
        ("big=9007199254740993", "9007199254740993"),  # unsafe integer: kept as text
    ],
)
def test_values_are_json_where_they_parse_else_text(pair, value):
    key = pair.partition("=")[0]
    parsed = parse_args([pair])
    assert parsed == {key: value}
    assert type(parsed[key]) is type(value)


def test_several_pairs():
    assert parse_args(["path=README.md", "start_line=2", "end_line=9"]) == {
        "path": "README.md",
        "start_line": 2,
        "end_line": 9,
    }
    assert parse_args([]) == {}


@pytest.mark.parametrize("pair", ["bad", "", "=v", "=", "novalue:3"])
def test_a_pair_without_key_and_equals_is_a_usage_error(pair):
    with pytest.raises(UsageError, match="not of the form K=V") as info:
        parse_args(["ok=1", pair])
    assert info.value.field == "--arg"
    assert str(info.value).startswith("--arg: ")
    assert info.value.exit_code == EXIT_USAGE


def test_a_duplicated_key_is_a_usage_error():
    with pytest.raises(UsageError, match="'k' given twice") as info:
        parse_args(["k=1", "other=2", "k=1"])
    assert info.value.field == "--arg"


@settings(deadline=None, max_examples=200)
@given(
    key=st.text(min_size=1, max_size=10).filter(lambda k: "=" not in k),
    raw=st.text(max_size=40),
)
def test_parse_args_never_crashes_and_keeps_the_text_when_not_json(key, raw):
    parsed = parse_args([f"{key}={raw}"])
    assert list(parsed) == [key]
    if isinstance(parsed[key], str) and not raw.strip().startswith('"'):
        assert parsed[key] == raw


# -- up --workers and worker --autoscale ---------------------------------------------

TOOLS = ["lint_python", "read_repo_file", "search_docs"]


@pytest.mark.parametrize(
    ("text", "counts"),
    [
        ("", {"lint_python": 1, "read_repo_file": 1, "search_docs": 1}),
        ("lint_python=3,search_docs=1", {"lint_python": 3, "read_repo_file": 1, "search_docs": 1}),
        (" lint_python = 3 , ", {"lint_python": 3, "read_repo_file": 1, "search_docs": 1}),
        (
            "read_repo_file=0,search_docs=64",
            {"lint_python": 1, "read_repo_file": 0, "search_docs": 64},
        ),
    ],
)
def test_worker_counts_default_to_one_per_tool(text, counts):
    assert parse_worker_counts(text, TOOLS) == counts


@pytest.mark.parametrize(
    ("text", "rule"),
    [
        ("bogus=2", "unknown tool 'bogus' (known: lint_python, read_repo_file, search_docs)"),
        ("=2", "unknown tool ''"),
        ("lint_python", "'lint_python' is not of the form TOOL=N"),
        ("lint_python=", "N must be a whole number from 0 to 64"),
        ("lint_python=x", "N must be a whole number from 0 to 64"),
        ("lint_python=-1", "N must be a whole number from 0 to 64"),
        ("lint_python=1.5", "N must be a whole number from 0 to 64"),
        ("lint_python=65", "N must be a whole number from 0 to 64"),
        ("lint_python=\u00b3", "N must be a whole number from 0 to 64"),  # isdigit() says yes
        ("lint_python=1,lint_python=2", "'lint_python' given twice"),
    ],
)
def test_bad_worker_counts_name_the_option_and_the_rule(text, rule):
    with pytest.raises(UsageError) as info:
        parse_worker_counts(text, TOOLS)
    assert info.value.field == "--workers"
    assert str(info.value).startswith("--workers: ")
    assert rule in str(info.value)
    assert info.value.exit_code == EXIT_USAGE


@pytest.mark.parametrize(
    ("text", "bounds"), [("4,1", (4, 1)), ("8,0", (8, 0)), ("3,3", (3, 3)), (" 2, 1", (2, 1))]
)
def test_autoscale_is_max_then_min(text, bounds):
    assert parse_autoscale(text) == bounds


@pytest.mark.parametrize(
    ("text", "rule"),
    [
        ("2,4", "MIN (4) must not be above MAX (2)"),
        ("0,0", "MAX must be from 1 to 256, not 0"),
        ("300,1", "MAX must be from 1 to 256, not 300"),
        ("4", "'4' is not of the form MAX,MIN"),
        ("4,1,0", "is not of the form MAX,MIN"),
        ("a,b", "is not of the form MAX,MIN"),
        ("4,-1", "is not of the form MAX,MIN"),
        ("", "is not of the form MAX,MIN"),
        ("\u00b3,1", "is not of the form MAX,MIN"),
    ],
)
def test_bad_autoscale_names_the_option_and_the_rule(text, rule):
    with pytest.raises(UsageError) as info:
        parse_autoscale(text)
    assert info.value.field == "--autoscale"
    assert str(info.value).startswith("--autoscale: ")
    assert rule in str(info.value)


# -- validate_args -----------------------------------------------------------------


def usage_error(args: dict) -> UsageError:
    with pytest.raises(UsageError) as info:
        validate_args(MANIFEST, args)
    return info.value


@pytest.mark.parametrize(
    "args",
    [
        {"path": "README.md"},
        {"path": "a.py", "start_line": 1, "end_line": 10, "max_bytes": 1000},
        {"path": "a.py", "start_line": None},
    ],
)
def test_valid_args_pass(args):
    assert validate_args(MANIFEST, args) is None


@pytest.mark.parametrize(
    ("args", "field"),
    [
        ({"path": 3}, "--arg path"),
        ({"path": ["a"]}, "--arg path"),
        ({"path": "a", "start_line": "2"}, "--arg start_line"),
        ({"path": "a", "max_bytes": True}, "--arg max_bytes"),
        ({"path": "a", "start_line": 0}, "--arg start_line"),
        ({"path": "a", "max_bytes": 2_000_000}, "--arg max_bytes"),
        ({"path": ""}, "--arg path"),
    ],
)
def test_wrong_values_name_the_field(args, field):
    error = usage_error(args)
    assert error.field == field
    assert str(error).startswith(f"{field}: ")


def test_an_extra_field_is_named():
    error = usage_error({"path": "a", "bogus": 1})
    assert error.field == "--arg bogus"
    assert "unexpected field" in str(error)
    assert "path" in str(error)  # says what the tool does take


def test_several_extra_fields_are_named():
    assert usage_error({"path": "a", "zz": 1, "aa": 2}).field == "--arg aa, zz"


def test_a_missing_required_field_is_named():
    error = usage_error({})
    assert error.field == "--arg path"
    assert "required" in str(error)
    assert usage_error({"start_line": 1}).field == "--arg path"


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf, 2**53, -(2**53), 10**30])
def test_unrepresentable_values_are_refused(value):
    error = usage_error({"path": "a", "max_bytes": value})
    assert error.field == "--arg"
    assert "$.max_bytes" in str(error)


def test_values_from_parse_args_flow_into_validation():
    validate_args(MANIFEST, parse_args(["path=README.md", "start_line=3"]))
    assert usage_error(parse_args(["path=README.md", "start_line=three"])).field == (
        "--arg start_line"
    )


@pytest.mark.parametrize(
    "raw",
    ["1" * 5000, "[" * 100_000, "[" * 100 + "]" * 100],
    ids=["5000-digits", "100000-deep-unterminated", "100-deep"],
)
def test_values_the_strict_parser_refuses_stay_text(raw):
    assert parse_args([f"n={raw}"]) == {"n": raw}
