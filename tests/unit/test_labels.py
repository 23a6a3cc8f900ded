"""Data labels: they raise a call's classification, never lower it; bad files are refused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from policy.errors import BundleError
from policy.labels import load_labels

ORDER = ("public", "internal", "confidential", "restricted")


def labels(tmp_path: Path, rules: list[dict]) -> object:
    (tmp_path / "labels.json").write_text(json.dumps({"rules": rules}))
    return load_labels(tmp_path)


def test_a_matching_label_raises_the_classification(tmp_path: Path) -> None:
    found = labels(
        tmp_path,
        [
            {
                "tool": "read_repo_file",
                "arg": "path",
                "glob": "config/*",
                "classification": "confidential",
            },
            {
                "tool": "read_repo_file",
                "arg": "path",
                "glob": "secrets/*",
                "classification": "restricted",
            },
            {"tool": "search_docs", "classification": "confidential"},
        ],
    )
    classify = found.classify  # type: ignore[attr-defined]
    assert (
        classify("read_repo_file", {"path": "config/app.yaml"}, "public", ORDER) == "confidential"
    )
    assert classify("read_repo_file", {"path": "secrets/k"}, "confidential", ORDER) == "restricted"
    assert classify("read_repo_file", {"path": "src/app.py"}, "internal", ORDER) == "internal"
    assert classify("search_docs", {"query": "x"}, "internal", ORDER) == "confidential"
    # never lower: a run already restricted stays restricted
    assert classify("read_repo_file", {"path": "config/a"}, "restricted", ORDER) == "restricted"
    # a non-string argument matches no glob
    assert classify("read_repo_file", {"path": ["config/a"]}, "internal", ORDER) == "internal"


def test_a_label_on_a_named_root_applies_to_the_tools_that_declare_it(tmp_path: Path) -> None:
    from policy.labels import roots_of

    found = labels(
        tmp_path,
        [
            {"tool": "*", "root": "hr_records", "classification": "restricted"},
            {
                "tool": "*",
                "root": "repo",
                "arg": "path",
                "glob": "config/*",
                "classification": "confidential",
            },
        ],
    )
    classify = found.classify  # type: ignore[attr-defined]
    hr = roots_of({"data_roots": ["hr_records"]})
    assert classify("payroll", {}, "internal", ORDER, roots=hr) == "restricted"
    assert classify("payroll", {}, "internal", ORDER) == "internal"  # not its root
    repo = roots_of({"data_roots": ["repo"]})
    assert classify("read_repo_file", {"path": "config/a"}, "public", ORDER, roots=repo) == (
        "confidential"
    )
    assert classify("read_repo_file", {"path": "src/a"}, "public", ORDER, roots=repo) == "public"
    assert classify("other", {"path": "config/a"}, "public", ORDER, roots=("docs",)) == "public"
    assert roots_of(None) == () and roots_of({"data_roots": "repo"}) == ()


def test_a_label_the_order_does_not_know_is_the_strictest(tmp_path: Path) -> None:
    found = labels(tmp_path, [{"tool": "*", "classification": "top-secret"}])
    assert found.classify("lint_python", {}, "restricted", ORDER) == "top-secret"  # type: ignore[attr-defined]


def test_no_file_no_labels(tmp_path: Path) -> None:
    assert load_labels(tmp_path).classify("x", {}, "internal", ORDER) == "internal"


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        (
            {"rules": [{"tool": "x", "arg": "path", "classification": "public"}]},
            "arg and glob go together",
        ),
        ({"rules": [{"tool": "x", "classification": "public", "evil": 1}]}, "rules.0.evil"),
        ({"rules": [{"classification": "public"}]}, "rules.0.tool"),
        (
            {"rules": [{"tool": "*", "root": "Bad Root", "classification": "public"}]},
            "rules.0.root",
        ),
        ({"rules": "nope"}, "rules"),
    ],
)
def test_a_bad_labels_file_refuses_the_bundle(tmp_path: Path, content: dict, problem: str) -> None:
    (tmp_path / "labels.json").write_text(json.dumps(content))
    with pytest.raises(BundleError, match=problem):
        load_labels(tmp_path)
    (tmp_path / "labels.json").write_text("{not json")
    with pytest.raises(BundleError, match="labels.json"):
        load_labels(tmp_path)
