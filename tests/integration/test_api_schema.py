"""Schemathesis against the live API of the real stack: generated requests for every
operation (a bounded number each), no 5xx, and every response as the OpenAPI document
says (status codes, content types, schemas, headers)."""

from __future__ import annotations

from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from tests.harness import Stack

pytestmark = pytest.mark.integration

EXAMPLES = 12  # per operation: bounded, so that `make test` stays quick


CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
    response_headers_conformance,
]


def test_the_live_api_keeps_its_contract(stack: Stack) -> None:
    document = httpx.get(stack.url + "/openapi.json", timeout=10).json()
    assert document["openapi"].startswith("3.1")
    schema = schemathesis.openapi.from_url(stack.url + "/openapi.json")
    headers = {"Authorization": f"Bearer {stack.tenant()}"}
    tried: list[str] = []
    for found in schema.get_all_operations():
        operation = found.ok()
        tried.append(operation.label)

        @given(case=operation.as_strategy())
        @settings(
            max_examples=EXAMPLES,
            deadline=None,
            suppress_health_check=list(HealthCheck),
            derandomize=True,
            database=None,
        )
        def keeps_contract(case: Any) -> None:
            if case.path.endswith("/events"):
                case.path_parameters = {"run_id": "run_" + "0" * 24}  # a stream of nothing
            case.call_and_validate(headers=headers, checks=CHECKS, timeout=30)

        keeps_contract()
    assert len(tried) == len(
        [m for path in document["paths"].values() for m in path if m != "parameters"]
    )
    assert len(tried) >= 20, tried
