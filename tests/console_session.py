"""Driving the review console over plain HTTP (httpx): sign in, read a form's CSRF token,
issue the tokens of the principals a test signs in as."""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from html import unescape

import httpx

CSRF = re.compile(r'name="csrf" value="([^"]*)"')


def csrf_of(page: str) -> str:
    found = CSRF.search(page)
    assert found is not None, page[:2000]
    return unescape(found.group(1))


@contextlib.contextmanager
def sign_in(base_url: str, token: str) -> Iterator[httpx.Client]:
    """A client with a console session for ``token`` (follows no redirects)."""
    with httpx.Client(base_url=base_url, timeout=30) as client:
        page = client.get("/console/sign-in")
        assert page.status_code == 200, page.text
        done = client.post("/console/sign-in", data={"csrf": csrf_of(page.text), "token": token})
        assert done.status_code == 303 and done.headers["location"] == "/console/inbox", done.text
        yield client


HELD = {"tool": "read_repo_file", "args": {"path": "README.md"}, "environment": "prod"}
"""A call the default policy holds for approval (prod)."""


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def issue(api: httpx.Client, admin: str, principal: str, role: str) -> str:
    """A new token for ``principal`` with ``role``, issued through the API by ``admin``."""
    done = api.post(
        "/v1/tokens", json={"principal": principal, "role": role}, headers=bearer(admin)
    )
    assert done.status_code == 201, done.text
    return str(done.json()["token"])
