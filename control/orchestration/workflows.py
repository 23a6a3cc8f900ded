"""Workflows: named DAGs of tool calls, read from YAML files in the workflows directory.

A workflow names its inputs and its nodes; each node calls one tool with
arguments that may be templated from the run's inputs and from the results of
the nodes it ``needs``::

    name: repo-review
    inputs:
      query: {type: string}
    nodes:
      - id: read
        tool: read_repo_file
        args: {path: "${inputs.path}"}
      - id: lint
        tool: lint_python
        needs: [read]
        args: {code: "${nodes.read.result.content}"}

A template that is a whole string (``"${inputs.n}"``) takes the referenced
value with its JSON type; one inside a longer string is interpolated and must
be a string, number or boolean. ``$$`` is a literal ``$``. A workflow is
checked when it is loaded: unknown fields, duplicate ids, unknown or cyclic
``needs``, and templates that reference an input that is not declared or a
node that is not needed, are refused with the node and field named.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from control.errors import UsageError
from toolplane.canonical import CanonicalJSONError, check_json_value, digest
from toolplane.errors import first_problem

__all__ = [
    "NODE_ID",
    "WORKFLOW_NAME",
    "NodeSpec",
    "Reference",
    "TemplateError",
    "WorkflowSpec",
    "coerce_inputs",
    "escape",
    "list_workflows",
    "load_workflow",
    "parse_workflow",
    "render",
    "single_call",
]

WORKFLOW_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")
NODE_ID = re.compile(r"^[a-z][a-z0-9_-]{0,62}$")
MAX_NODES = 100
MAX_FILE_BYTES = 256_000
_MARKER = re.compile(r"\$\$|\$\{([^{}]*)\}")
_REF = re.compile(
    r"^(inputs)\.([A-Za-z_][A-Za-z0-9_]*)$|^nodes\.([a-z][a-z0-9_-]*)\.result((?:\.[^.]+)*)$"
)
_TYPES: dict[str, tuple[type, ...]] = {
    "string": (str,),
    "integer": (int,),
    "number": (int, float),
    "boolean": (bool,),
}


class TemplateError(UsageError):
    """A template that cannot be rendered (at load: what it references; at run: its value)."""


@dataclass(frozen=True)
class Reference:
    """What one ``${...}`` names: an input, or a path into a needed node's result."""

    text: str
    input: str | None = None
    node: str | None = None
    path: tuple[str, ...] = ()

    @classmethod
    def parse(cls, text: str, *, where: str) -> Reference:
        match = _REF.match(text.strip())
        if match is None:
            raise TemplateError(
                f"${{{text}}} must be ${{inputs.NAME}} or ${{nodes.ID.result[.FIELD...]}}",
                field=where,
            )
        if match.group(1):
            return cls(text, input=match.group(2))
        path = tuple(p for p in (match.group(4) or "").split(".") if p)
        return cls(text, node=match.group(3), path=path)


def _references(value: Any, where: str) -> list[tuple[Reference, str]]:
    """Every reference in a (nested) argument value, with where it is."""
    found: list[tuple[Reference, str]] = []
    if isinstance(value, str):
        for m in _MARKER.finditer(value):
            if m.group(0) != "$$":
                found.append((Reference.parse(m.group(1), where=where), where))
    elif isinstance(value, dict):
        for k, v in value.items():
            found += _references(v, f"{where}.{k}")
    elif isinstance(value, list):
        for i, v in enumerate(value):
            found += _references(v, f"{where}.{i}")
    return found


class InputSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    type: Literal["string", "integer", "number", "boolean"] = "string"
    description: str = ""
    default: Any = None

    @model_validator(mode="after")
    def _default_has_type(self) -> InputSpec:
        if self.default is not None and not _is(self.default, self.type):
            raise ValueError(f"default must be of type {self.type}")
        return self


class NodeSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    id: str = Field(pattern=NODE_ID.pattern)
    tool: str = Field(pattern=r"^[a-z][a-z0-9_]{0,62}$")
    needs: tuple[str, ...] = ()
    args: dict[str, Any] = Field(default_factory=dict)


class WorkflowSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    name: str = Field(pattern=WORKFLOW_NAME.pattern)
    description: str = ""
    inputs: dict[str, InputSpec] = Field(default_factory=dict)
    nodes: tuple[NodeSpec, ...] = Field(min_length=1, max_length=MAX_NODES)

    @model_validator(mode="after")
    def _graph(self) -> WorkflowSpec:
        ids = [n.id for n in self.nodes]
        dupes = sorted({i for i in ids if ids.count(i) > 1})
        if dupes:
            raise ValueError(f"node ids must be unique: {', '.join(dupes)} repeated")
        known = set(ids)
        for name, declared in self.inputs.items():
            _json_only(declared.default, f"inputs.{name}.default")
        for node in self.nodes:
            _json_only(node.args, f"node {node.id}: args")
            for need in node.needs:
                if need not in known:
                    raise ValueError(f"node {node.id}: needs unknown node {need!r}")
                if need == node.id:
                    raise ValueError(f"node {node.id}: needs itself")
            try:
                references = _references(node.args, f"node {node.id}: args")
            except TemplateError as e:
                raise ValueError(str(e)) from e
            for ref, where in references:
                if ref.input is not None and ref.input not in self.inputs:
                    declared = ", ".join(sorted(self.inputs)) or "none"
                    raise ValueError(
                        f"{where}: ${{{ref.text}}} names no declared input (inputs: {declared})"
                    )
                if ref.node is not None and ref.node not in node.needs:
                    raise ValueError(
                        f"{where}: ${{{ref.text}}} uses node {ref.node!r}, "
                        f"which {node.id} does not need (add it to needs)"
                    )
        cycle = _find_cycle({n.id: n.needs for n in self.nodes})
        if cycle:
            raise ValueError(f"needs form a cycle: {' -> '.join(cycle)}")
        return self

    @property
    def sha256(self) -> str:
        return digest(self.model_dump(mode="json"))

    def node(self, node_id: str) -> NodeSpec:
        return next(n for n in self.nodes if n.id == node_id)


def _json_only(value: Any, where: str) -> None:
    """What YAML can say but canonical JSON cannot carry (dates, NaN, huge integers)."""
    try:
        check_json_value(value, path=where)
    except CanonicalJSONError as e:
        raise ValueError(str(e)) from e


def _find_cycle(needs: Mapping[str, tuple[str, ...]]) -> list[str]:
    """A cycle in the ``needs`` graph, as the path that closes it, or []."""
    state: dict[str, int] = {}  # 1 visiting, 2 done
    path: list[str] = []

    def visit(node: str) -> list[str]:
        state[node] = 1
        path.append(node)
        for need in needs.get(node, ()):
            if state.get(need) == 1:
                return [*path[path.index(need) :], need]
            if need not in state and (found := visit(need)):
                return found
        path.pop()
        state[node] = 2
        return []

    for node in needs:
        if node not in state and (found := visit(node)):
            return found
    return []


def _is(value: Any, kind: str) -> bool:
    if isinstance(value, bool) and kind != "boolean":
        return False
    return isinstance(value, _TYPES[kind])


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a mapping that repeats a key (YAML keeps the last) and
    aliases (``*name``: a few hundred bytes of them expand to millions of values)."""

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise yaml.composer.ComposerError(
                None, None, "aliases (*name) are not accepted", event.start_mark
            )
        return super().compose_node(parent, index)


def _mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode) -> dict[Any, Any]:
    seen: set[Any] = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node)  # type: ignore[no-untyped-call]
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r}", key_node.start_mark
            )
        seen.add(key)
    return loader.construct_mapping(node)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping)


def parse_workflow(text: str, *, source: str) -> WorkflowSpec:
    """A workflow from YAML text; UsageError naming ``source`` and the field otherwise."""
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as e:
        raise UsageError(f"not valid YAML: {' '.join(str(e).split())}", field=source) from e
    except RecursionError as e:
        raise UsageError("nested too deeply", field=source) from e
    if not isinstance(data, dict):
        raise UsageError("must be a mapping with name, inputs and nodes", field=source)
    try:
        return WorkflowSpec.model_validate(data)
    except ValidationError as e:
        where, rule = first_problem(e, where="workflow")
        rule = rule.removeprefix("Value error, ")
        raise UsageError(rule if where == "workflow" else f"{where}: {rule}", field=source) from e


def load_workflow(directory: Path, name: str) -> WorkflowSpec:
    """The workflow ``name`` from ``directory/name.yaml`` (or ``.yml``)."""
    if not WORKFLOW_NAME.match(name):
        raise UsageError(f"must match {WORKFLOW_NAME.pattern}", field="WORKFLOW")
    for suffix in (".yaml", ".yml"):
        path = directory / f"{name}{suffix}"
        if path.is_file():
            break
    else:
        known = ", ".join(list_workflows(directory)) or "none"
        # the directory is the server's business: callers get only the names
        raise UsageError(f"no workflow {name!r} (known: {known})", field="WORKFLOW")
    raw = path.read_bytes()
    if len(raw) > MAX_FILE_BYTES:
        raise UsageError(f"larger than {MAX_FILE_BYTES} bytes", field=path.name)
    spec = parse_workflow(raw.decode("utf-8", errors="replace"), source=path.name)
    if spec.name != name:
        raise UsageError(f"declares name {spec.name!r}; the file is {name!r}", field=path.name)
    return spec


def list_workflows(directory: Path) -> list[str]:
    if not directory.is_dir():
        return []
    names = {p.stem for p in directory.iterdir() if p.suffix in (".yaml", ".yml")}
    return sorted(n for n in names if WORKFLOW_NAME.match(n))


def single_call(tool: str, args: dict[str, Any]) -> WorkflowSpec:
    """`toolplane call`: a workflow of one node named after its tool, with literal args."""
    return WorkflowSpec(name="call", nodes=(NodeSpec(id=tool, tool=tool, args=escape(args)),))


def escape(value: Any) -> Any:
    """``value`` with every ``$`` in its strings doubled: rendered, it is itself again."""
    if isinstance(value, str):
        return value.replace("$", "$$")
    if isinstance(value, dict):
        return {k: escape(v) for k, v in value.items()}
    if isinstance(value, list):
        return [escape(v) for v in value]
    return value


def coerce_inputs(spec: WorkflowSpec, given: Mapping[str, Any]) -> dict[str, Any]:
    """The run's inputs: each declared, typed, and present (or defaulted).

    A string given for a non-string input (as from ``--input n=3``) is read as JSON.
    """
    unknown = sorted(set(given) - set(spec.inputs))
    if unknown:
        takes = ", ".join(sorted(spec.inputs)) or "no inputs"
        raise UsageError(f"{spec.name} takes {takes}", field=f"--input {', '.join(unknown)}")
    values: dict[str, Any] = {}
    for name, declared in spec.inputs.items():
        if name not in given:
            if declared.default is None:
                raise UsageError(f"{spec.name} needs this input", field=f"--input {name}")
            values[name] = declared.default
            continue
        value = given[name]
        if isinstance(value, str) and declared.type != "string":
            try:
                value = json.loads(value)
            except ValueError:
                pass
        if not _is(value, declared.type):
            raise UsageError(f"must be of type {declared.type}", field=f"--input {name}")
        try:
            check_json_value(value)
        except CanonicalJSONError as e:
            raise UsageError(str(e).removeprefix("$: "), field=f"--input {name}") from e
        values[name] = value
    return values


def render(args: Any, inputs: Mapping[str, Any], results: Mapping[str, Any], *, where: str) -> Any:
    """``args`` with every template replaced by what it references."""
    if isinstance(args, dict):
        return {k: render(v, inputs, results, where=f"{where}.{k}") for k, v in args.items()}
    if isinstance(args, list):
        return [render(v, inputs, results, where=f"{where}.{i}") for i, v in enumerate(args)]
    if not isinstance(args, str):
        return args
    whole = _MARKER.fullmatch(args)
    if whole is not None and whole.group(0) != "$$":
        return _resolve(Reference.parse(whole.group(1), where=where), inputs, results, where)

    def substitute(m: re.Match[str]) -> str:
        if m.group(0) == "$$":
            return "$"
        value = _resolve(Reference.parse(m.group(1), where=where), inputs, results, where)
        if isinstance(value, bool):
            return "true" if value else "false"
        if isinstance(value, str | int | float):
            return str(value)
        raise TemplateError(
            f"${{{m.group(1)}}} is a {type(value).__name__}; only strings, numbers and "
            "booleans go inside a longer string",
            field=where,
        )

    return _MARKER.sub(substitute, args)


def _resolve(
    ref: Reference, inputs: Mapping[str, Any], results: Mapping[str, Any], where: str
) -> Any:
    if ref.input is not None:
        return inputs[ref.input]
    assert ref.node is not None
    value: Any = results.get(ref.node)
    walked = f"nodes.{ref.node}.result"
    for step in ref.path:
        if isinstance(value, dict) and step in value:
            value = value[step]
        elif isinstance(value, list) and step.isdigit() and int(step) < len(value):
            value = value[int(step)]
        else:
            raise TemplateError(f"${{{ref.text}}}: {walked} has no {step!r}", field=where)
        walked += f".{step}"
    return value
