"""Every Kubernetes manifest of docker/k8s is valid, strictly, for the versions it names.

kubernetes-validate carries the OpenAPI schemas of each Kubernetes release; strict mode
refuses any field the schema does not know (a typo such as `readOnlyRootFilesytem`
would otherwise be dropped by the API server without a word). KEDA's ScaledObject and
TriggerAuthentication are custom resources whose schema is not bundled: they are checked
against the openAPIV3Schema of KEDA's own CRDs (tests/fixtures/k8s, see its README), with
what the API server adds to JSON Schema emulated here: a field a structural schema does
not declare is pruned, so it is an error; `x-kubernetes-int-or-string`; and the CEL rules
of `x-kubernetes-validations`, each evaluated by hand (a rule not known here fails).
Their metadata, which a CRD leaves to the API server, is checked as ObjectMeta.
"""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate as kv
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "docker" / "k8s"
CUSTOM = {"keda.sh/v1alpha1"}
FIXTURES = ROOT / "tests" / "fixtures" / "k8s"


def named_versions() -> list[str]:
    """The Kubernetes versions 00-namespace.yaml says the manifests are written for."""
    text = (K8S / "00-namespace.yaml").read_text()
    m = re.search(r"Kubernetes (\d+\.\d+) to (\d+\.\d+)", text)
    assert m, "00-namespace.yaml names no Kubernetes versions"
    return [f"{m.group(1)}.0", f"{m.group(2)}.0"]


def documents() -> list[tuple[str, dict[str, Any]]]:
    found = []
    for path in sorted(K8S.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                found.append((f"{path.name}:{doc['kind']}/{doc['metadata']['name']}", doc))
    return found


def core(doc: dict[str, Any]) -> dict[str, Any]:
    """What kubernetes-validate checks of `doc`: all of it, or a custom resource's ObjectMeta.

    A CRD's schema leaves `metadata` to the API server, which takes it as ObjectMeta;
    its spec is checked against KEDA's CRD below."""
    if doc["apiVersion"] not in CUSTOM:
        return doc
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": doc["metadata"]}


@pytest.mark.parametrize("version", named_versions())
def test_every_manifest_is_valid_for_the_named_versions(version: str) -> None:
    checked, problems = 0, {}
    for name, doc in documents():
        try:
            kv.validate(core(doc), version, strict=True)
            checked += 1
        except (kv.ValidationError, kv.SchemaNotFoundError) as e:
            problems[name] = str(e).splitlines()[0]
    assert problems == {}
    assert checked >= 30


def test_a_misspelt_field_fails_the_check() -> None:
    name, doc = next((n, d) for n, d in documents() if d["kind"] == "Deployment")
    container = doc["spec"]["template"]["spec"]["containers"][0]
    container["securityContext"]["readOnlyRootFilesytem"] = True
    with pytest.raises(kv.ValidationError):
        kv.validate(doc, named_versions()[0], strict=True)


def test_a_misspelt_field_in_a_keda_resources_metadata_fails_the_check() -> None:
    name, doc = next((n, d) for n, d in documents() if d["kind"] == "ScaledObject")
    doc["metadata"]["lables"] = doc["metadata"].pop("labels")
    with pytest.raises(kv.ValidationError):
        kv.validate(core(doc), named_versions()[0], strict=True)


# KEDA's custom resources against KEDA's CRD schemas.


def keda_major() -> str:
    """The KEDA major version 00-namespace.yaml says the manifests are written for."""
    m = re.search(r"KEDA (\d+)\.x", (K8S / "00-namespace.yaml").read_text())
    assert m, "00-namespace.yaml names no KEDA version"
    return m.group(1)


def keda_schema(kind: str) -> dict[str, Any]:
    """The openAPIV3Schema of KEDA's CRD for `kind`, for the major version named."""
    found = sorted(FIXTURES.glob(f"keda-{keda_major()}.*-{kind.lower()}.schema.json"))
    assert len(found) == 1, f"one schema of KEDA {keda_major()}.x for {kind}: {found}"
    return json.loads(found[0].read_text())


def _min_le_max(spec: dict[str, Any]) -> bool:
    if "minReplicaCount" not in spec:
        return True
    low, high = spec["minReplicaCount"], spec.get("maxReplicaCount", 100)
    if not (isinstance(low, int) and isinstance(high, int)):
        return True  # the types are refused on their own, and CEL is not reached
    return low <= high


# The CEL rules of the schemas, each as the API server would evaluate it.
CEL: dict[str, Callable[[dict[str, Any]], bool]] = {
    "!has(self.minReplicaCount) || self.minReplicaCount <= "
    "(has(self.maxReplicaCount) ? self.maxReplicaCount : 100)": _min_le_max,
}


def _declared(
    validator: Any, properties: dict[str, Any], instance: Any, schema: dict[str, Any]
) -> Iterator[jsonschema.ValidationError]:
    """`properties`, and the pruning of a structural schema: an undeclared field is dropped."""
    yield from jsonschema.Draft4Validator.VALIDATORS["properties"](
        validator, properties, instance, schema
    )
    if not validator.is_type(instance, "object") or "additionalProperties" in schema:
        return
    if schema.get("x-kubernetes-preserve-unknown-fields"):
        return
    for field in sorted(instance.keys() - properties.keys()):
        yield jsonschema.ValidationError(
            f"{field!r} is not in the schema (the API server drops it)"
        )


def _int_or_string(
    validator: Any, on: bool, instance: Any, schema: dict[str, Any]
) -> Iterator[jsonschema.ValidationError]:
    if on and not (validator.is_type(instance, "integer") or validator.is_type(instance, "string")):
        yield jsonschema.ValidationError(f"{instance!r} is neither an integer nor a string")


def _cel(
    validator: Any, rules: list[dict[str, str]], instance: Any, schema: dict[str, Any]
) -> Iterator[jsonschema.ValidationError]:
    for rule in rules:
        check = CEL.get(rule["rule"])
        if check is None:
            yield jsonschema.ValidationError(f"CEL rule not evaluated here: {rule['rule']}")
        elif not check(instance):
            yield jsonschema.ValidationError(rule["message"])


def _list_type(
    validator: Any, list_type: str, instance: Any, schema: dict[str, Any]
) -> Iterator[jsonschema.ValidationError]:
    if list_type != "atomic":  # set and map lists' uniqueness is not emulated
        yield jsonschema.ValidationError(f"x-kubernetes-list-type {list_type} not checked here")


# OpenAPI 3.0's schema object is a subset of JSON Schema draft 4 (wright-00).
CRDValidator = jsonschema.validators.extend(
    jsonschema.Draft4Validator,
    {
        "properties": _declared,
        "x-kubernetes-int-or-string": _int_or_string,
        "x-kubernetes-validations": _cel,
        "x-kubernetes-list-type": _list_type,
    },
)
FORMATS = jsonschema.FormatChecker()
FORMATS.checks("int32")(lambda n: not isinstance(n, int) or -(2**31) <= n < 2**31)
FORMATS.checks("int64")(lambda n: not isinstance(n, int) or -(2**63) <= n < 2**63)


def crd_problems(doc: dict[str, Any]) -> list[str]:
    """What the API server would refuse or drop in `doc`, by KEDA's CRD schema of its kind."""
    validator = CRDValidator(keda_schema(doc["kind"]), format_checker=FORMATS)
    errors = sorted(validator.iter_errors(doc), key=lambda e: list(map(str, e.absolute_path)))
    return [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in errors]


def keda_documents() -> list[tuple[str, dict[str, Any]]]:
    return [(n, d) for n, d in documents() if d["apiVersion"] in CUSTOM]


def test_every_keda_resource_is_valid_for_kedas_crd_schema() -> None:
    assert {d["apiVersion"] for _, d in keda_documents()} == {"keda.sh/v1alpha1"}
    problems = {name: crd_problems(doc) for name, doc in keda_documents()}
    assert problems == {name: [] for name in problems}
    kinds = sorted(d["kind"] for _, d in keda_documents())
    assert kinds == ["ScaledObject"] * 3 + ["TriggerAuthentication"]


def _set(path: str, value: Any) -> Callable[[dict[str, Any]], None]:
    """A change to a document: `value` at the dotted `path` (a number indexes a list)."""

    def change(doc: dict[str, Any]) -> None:
        *parents, last = [int(k) if k.isdigit() else k for k in path.split(".")]
        node = doc
        for key in parents:
            node = node[key]
        node[last] = value

    return change


@pytest.mark.parametrize(
    ("kind", "change", "refused"),
    [
        ("ScaledObject", _set("spec.pollingInterva", 5), "spec: 'pollingInterva' is not in"),
        ("ScaledObject", _set("spec.scaleTargetRef.nmae", "x"), "spec.scaleTargetRef: 'nmae'"),
        ("ScaledObject", _set("spec.triggers.0.authenticationRef.kind", "Secret"), "is not one of"),
        ("ScaledObject", _set("spec.minReplicaCount", "1"), "spec.minReplicaCount: '1' is not of"),
        ("ScaledObject", _set("spec.maxReplicaCount", 2**31), "is not a 'int32'"),
        ("ScaledObject", _set("spec.triggers.0.metadata.listLength", 4), "listLength: 4 is not of"),
        ("ScaledObject", _set("spec.minReplicaCount", 9), "spec: minReplicaCount must be less"),
        (
            "ScaledObject",
            _set(
                "spec.advanced",
                {"horizontalPodAutoscalerConfig": {"behavior": {"scaleDown": {"tolerance": 0.1}}}},
            ),
            "tolerance: 0.1 is neither an integer nor a string",
        ),
        (
            "TriggerAuthentication",
            _set("spec.secretTargetRef.0.paramter", "x"),
            "'paramter' is not in",
        ),
        ("TriggerAuthentication", _set("spec.secretTargetRef.0.key", None), "None is not of type"),
    ],
)
def test_a_wrong_keda_resource_fails_the_check(
    kind: str, change: Callable[[dict[str, Any]], None], refused: str
) -> None:
    doc = copy.deepcopy(next(d for _, d in keda_documents() if d["kind"] == kind))
    assert crd_problems(doc) == []
    change(doc)
    problems = crd_problems(doc)
    assert any(refused in p for p in problems), problems


def test_each_keda_schema_names_its_source() -> None:
    readme = (FIXTURES / "README.md").read_text()
    schemas = sorted(FIXTURES.glob("keda-*.schema.json"))
    assert len(schemas) == 2
    for schema in schemas:
        version = schema.name.split("-")[1]
        assert f"`{schema.name}`" in readme and f"tag `v{version}`" in readme
    assert "Apache License 2.0" in readme


def test_a_cel_rule_not_evaluated_here_fails_the_check() -> None:
    schema = keda_schema("ScaledObject")
    schema["properties"]["spec"]["x-kubernetes-validations"].append(
        {"rule": "self.pollingInterval < 60", "message": "short polls"}
    )
    doc = next(d for _, d in keda_documents() if d["kind"] == "ScaledObject")
    errors = [e.message for e in CRDValidator(schema).iter_errors(doc)]
    assert errors == ["CEL rule not evaluated here: self.pollingInterval < 60"]
