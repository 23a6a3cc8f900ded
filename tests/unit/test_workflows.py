"""Workflows: loading refuses what cannot run, with the node and field named; templates."""

from __future__ import annotations

from pathlib import Path

import pytest

from control.errors import UsageError
from control.orchestration.workflows import (
    TemplateError,
    coerce_inputs,
    escape,
    load_workflow,
    parse_workflow,
    render,
    single_call,
)

REPO = Path(__file__).resolve().parents[2]

GOOD = """
name: review
inputs:
  query: {type: string}
  n: {type: integer, default: 3}
nodes:
  - id: search
    tool: search_docs
    args: {query: "${inputs.query}", top_k: "${inputs.n}"}
  - id: read
    tool: read_repo_file
    args: {path: "src/${inputs.query}.py"}
  - id: lint
    tool: lint_python
    needs: [search, read]
    args: {code: "${nodes.read.result.content}", select: ["${nodes.search.result.hits.0.title}"]}
"""


def test_shipped_repo_review_loads() -> None:
    spec = load_workflow(REPO / "workflows", "repo-review")
    assert [n.id for n in spec.nodes] == ["search", "read", "lint"]
    assert spec.node("lint").needs == ("search", "read")
    assert set(spec.inputs) == {"query", "path"}


def test_a_good_workflow_renders() -> None:
    spec = parse_workflow(GOOD, source="review.yaml")
    inputs = coerce_inputs(spec, {"query": "app"})
    assert inputs == {"query": "app", "n": 3}
    search = render(spec.node("search").args, inputs, {}, where="search")
    assert search == {"query": "app", "top_k": 3}  # a whole template keeps its type
    assert render(spec.node("read").args, inputs, {}, where="read") == {"path": "src/app.py"}
    results = {"read": {"content": "x = 1\n"}, "search": {"hits": [{"title": "E501"}]}}
    lint = render(spec.node("lint").args, inputs, results, where="lint")
    assert lint == {"code": "x = 1\n", "select": ["E501"]}


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("name: x\nnodes: []\n", "nodes: Tuple should have at least 1 item"),
        ("name: X!\nnodes: [{id: a, tool: t}]\n", "name: String should match pattern"),
        ("name: x\nnodes: [{id: a, tool: t, bogus: 1}]\n", "nodes.0.bogus: Extra inputs"),
        (
            "name: x\nnodes: [{id: a, tool: t}, {id: a, tool: t}]\n",
            "node ids must be unique: a repeated",
        ),
        ("name: x\nnodes: [{id: a, tool: t, needs: [b]}]\n", "node a: needs unknown node 'b'"),
        ("name: x\nnodes: [{id: a, tool: t, needs: [a]}]\n", "node a: needs itself"),
        (
            "name: x\nnodes:\n - {id: a, tool: t, needs: [c]}\n - {id: b, tool: t, needs: [a]}\n"
            " - {id: c, tool: t, needs: [b]}\n",
            "needs form a cycle: a -> c -> b -> a",
        ),
        (
            'name: x\nnodes: [{id: a, tool: t, args: {q: "${inputs.nope}"}}]\n',
            "node a: args.q: ${inputs.nope} names no declared input (inputs: none)",
        ),
        (
            'name: x\nnodes:\n - {id: a, tool: t}\n - {id: b, tool: t, args: {q: "${nodes.a.result}"}}\n',
            "uses node 'a', which b does not need (add it to needs)",
        ),
        (
            'name: x\nnodes: [{id: a, tool: t, args: {q: "${whatever}"}}]\n',
            "must be ${inputs.NAME} or ${nodes.ID.result[.FIELD...]}",
        ),
        ("name: x\nname: y\nnodes: [{id: a, tool: t}]\n", "duplicate key 'name'"),
        ("- a\n- b\n", "must be a mapping"),
        (
            "name: x\nnodes: [{id: a, tool: t, args: &big {k: 1}}, {id: b, tool: t, args: *big}]\n",
            "aliases (*name) are not accepted",
        ),
        (
            "name: x\nnodes: [{id: a, tool: t, args: {when: 2026-11-28}}]\n",
            "node a: args.when: date is not a JSON value",
        ),
        ("name: x\nnodes: [{id: a, tool: t, args: {n: .nan}}]\n", "NaN and infinity are not JSON"),
        (
            "name: x\nnodes: [{id: a, tool: t, args: {n: 18014398509481985}}]\n",
            "integer beyond 2**53",
        ),
        (
            "name: x\nnodes: [{id: a, tool: t, args: " + "[" * 5000 + "]" * 5000 + "}]\n",
            "nested too deeply",
        ),
        ("name: [unclosed\n", "not valid YAML"),
        (
            "name: x\ninputs: {n: {type: integer, default: two}}\nnodes: [{id: a, tool: t}]\n",
            "default must be of type integer",
        ),
    ],
)
def test_bad_workflows_are_refused_at_load(text: str, expected: str) -> None:
    with pytest.raises(UsageError) as caught:
        parse_workflow(text, source="wf.yaml")
    assert expected in str(caught.value)
    assert str(caught.value).startswith("wf.yaml: ")


def test_workflow_files(tmp_path: Path) -> None:
    (tmp_path / "good.yaml").write_text("name: good\nnodes: [{id: a, tool: t}]\n")
    (tmp_path / "liar.yaml").write_text("name: other\nnodes: [{id: a, tool: t}]\n")
    assert load_workflow(tmp_path, "good").name == "good"
    with pytest.raises(UsageError, match="declares name 'other'"):
        load_workflow(tmp_path, "liar")
    with pytest.raises(UsageError, match=r"no workflow 'nope' .*known: good, liar"):
        load_workflow(tmp_path, "nope")
    with pytest.raises(UsageError, match="WORKFLOW: must match"):
        load_workflow(tmp_path, "../etc/passwd")


def test_inputs_are_declared_typed_and_present() -> None:
    spec = parse_workflow(GOOD, source="review.yaml")
    with pytest.raises(UsageError, match=r"--input nope: review takes n, query"):
        coerce_inputs(spec, {"query": "a", "nope": 1})
    with pytest.raises(UsageError, match="--input query: review needs this input"):
        coerce_inputs(spec, {})
    with pytest.raises(UsageError, match="--input n: must be of type integer"):
        coerce_inputs(spec, {"query": "a", "n": "three"})
    with pytest.raises(UsageError, match="--input n: must be of type integer"):
        coerce_inputs(spec, {"query": "a", "n": True})
    assert coerce_inputs(spec, {"query": "7", "n": "7"}) == {"query": "7", "n": 7}
    with pytest.raises(UsageError, match="--input n: integer beyond 2"):
        coerce_inputs(spec, {"query": "a", "n": str(2**53 + 1)})


def test_rendering_failures_name_the_field() -> None:
    with pytest.raises(TemplateError, match=r"lint.code: \$\{nodes.read.result.body\}.*no 'body'"):
        render({"code": "${nodes.read.result.body}"}, {}, {"read": {"content": ""}}, where="lint")
    with pytest.raises(TemplateError, match="only strings, numbers and booleans"):
        render({"q": "see ${nodes.a.result}"}, {}, {"a": {"x": 1}}, where="n")
    assert render({"q": "$${inputs.x} costs $$5"}, {"x": 1}, {}, where="n") == {
        "q": "${inputs.x} costs $5"
    }


def test_a_direct_call_is_never_templated() -> None:
    args = {"path": "${inputs.secret}", "n": ["$$", {"k": "$"}], "x": 1}
    spec = single_call("read_repo_file", args)
    assert spec.name == "call" and spec.nodes[0].id == "read_repo_file"
    assert render(spec.nodes[0].args, {}, {}, where="--arg") == args
    assert escape("a$b") == "a$$b"
