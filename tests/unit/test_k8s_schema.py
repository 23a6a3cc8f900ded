"""Every Kubernetes manifest of docker/k8s is valid, strictly, for the versions it names.

kubernetes-validate carries the OpenAPI schemas of each Kubernetes release; strict mode
refuses any field the schema does not know (a typo such as `readOnlyRootFilesytem`
would otherwise be dropped by the API server without a word). KEDA's ScaledObject and
TriggerAuthentication are custom resources whose schema is not bundled:
tests/unit/test_deployment.py checks their fields instead.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import kubernetes_validate as kv
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "docker" / "k8s"
CUSTOM = {"keda.sh/v1alpha1"}


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


@pytest.mark.parametrize("version", named_versions())
def test_every_manifest_is_valid_for_the_named_versions(version: str) -> None:
    checked, problems = 0, {}
    for name, doc in documents():
        if doc["apiVersion"] in CUSTOM:
            continue
        try:
            kv.validate(doc, version, strict=True)
            checked += 1
        except (kv.ValidationError, kv.SchemaNotFoundError) as e:
            problems[name] = str(e).splitlines()[0]
    assert problems == {}
    assert checked >= 25


def test_a_misspelt_field_fails_the_check() -> None:
    name, doc = next((n, d) for n, d in documents() if d["kind"] == "Deployment")
    container = doc["spec"]["template"]["spec"]["containers"][0]
    container["securityContext"]["readOnlyRootFilesytem"] = True
    with pytest.raises(kv.ValidationError):
        kv.validate(doc, named_versions()[0], strict=True)
