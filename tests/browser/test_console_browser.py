"""The review console in a real headless Chromium against the real stack (make
console-test): approve a held call and watch its run finish without a reload, the
submitter's disabled buttons, tenant scoping, CSRF, hostile output, signing out and
revocation. The screenshots in docs/console/ are taken here (`make screenshots`)."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.harness import Stack

pytestmark = [pytest.mark.integration, pytest.mark.browser]

playwright_api = pytest.importorskip("playwright.sync_api")

CHROMIUM = "/usr/bin/chromium"
# `make screenshots` writes them into docs/console/; any other run keeps the tree clean.
SHOTS = Path(
    os.environ.get("TOOLPLANE_SCREENSHOTS")
    or Path(tempfile.gettempdir()) / "toolplane-console-shots"
)
HOSTILE = (
    '<script>window.pwned = "script"</script>\n'
    '<img src="x" onerror="window.pwned = \'img\'">\n'
    "<b>not bold</b>\n"
)


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def issue(api: httpx.Client, admin: str, principal: str, role: str) -> str:
    done = api.post(
        "/v1/tokens", json={"principal": principal, "role": role}, headers=bearer(admin)
    )
    assert done.status_code == 201, done.text
    return str(done.json()["token"])


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    if shutil.which(CHROMIUM) is None:
        pytest.fail(f"{CHROMIUM} is missing: `make console-test` installs it (apt-get)")
    with playwright_api.sync_playwright() as p:
        launched = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        try:
            yield launched
        finally:
            launched.close()


@pytest.fixture
def api(stack: Stack) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=stack.url, timeout=30) as client:
        yield client


def signed_in(browser: Any, stack: Stack, token: str, *, width: int = 1280) -> Any:
    """A fresh browser context (its own cookies) signed in with ``token``; its page."""
    context = browser.new_context(viewport={"width": width, "height": 900})
    page = context.new_page()
    page.goto(f"{stack.url}/console/sign-in")
    page.fill("#token", token)
    page.click("#sign-in")
    page.wait_for_load_state()
    assert page.url.endswith("/console/inbox"), (page.url, page.inner_text("body"))
    return page


def shot(page: Any, name: str) -> None:
    SHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SHOTS / name), full_page=True)


def test_an_approver_decides_a_held_call_and_watches_its_run_finish(
    browser: Any, stack: Stack, api: httpx.Client
) -> None:
    admin = stack.tenant("acme")
    submitter = issue(api, admin, "release-agent", "submitter")
    approver = issue(api, admin, "alice", "approver")
    (Path(stack.env["TOOLPLANE_REPO_ROOT"]) / "page.html").write_text(HOSTILE)
    held = api.post(
        "/v1/calls",
        json={
            "tool": "read_repo_file",
            "args": {"path": "page.html"},
            "environment": "prod",
            "on_behalf_of": "user:dana",
        },
        headers=bearer(submitter),
    ).json()
    assert held["status"] == "awaiting_approval", held
    run_id = held["run_id"]

    inbox = signed_in(browser, stack, approver)
    card = inbox.locator("article.held").first
    assert card.locator(".policy-id").inner_text() == "prod-repo-reads-outside-src-need-approval"
    assert "waits for a human approval" in card.locator(".reason").inner_text()
    assert card.locator(".submitter").inner_text() == "release-agent"
    assert "user:dana" in card.inner_text()
    assert "expires in" in card.locator(".countdown").inner_text()
    shot(inbox, "inbox-1280.png")
    inbox.set_viewport_size({"width": 390, "height": 844})
    shot(inbox, "inbox-390.png")
    inbox.set_viewport_size({"width": 1280, "height": 900})

    # the run's page, open before the decision: it must finish there without a reload
    run_page = inbox.context.new_page()
    msgs: list[str] = []
    run_page.on("console", lambda m: msgs.append(m.text))
    run_page.goto(f"{stack.url}/console/runs/{run_id}")
    assert run_page.locator("#run-status").inner_text() == "awaiting_approval"
    run_page.evaluate("window.notReloaded = true")

    card.locator("input[name=reason]").fill("release check, read-only")
    card.locator("button.approve").click()
    inbox.wait_for_url(f"**/console/runs/{run_id}")

    run_page.locator("#run-status", has_text="completed").wait_for(timeout=60_000)
    run_page.locator("pre.result").wait_for(timeout=30_000)
    assert not [m for m in msgs if "run page" in m], msgs
    assert run_page.evaluate("window.notReloaded") is True
    result = run_page.locator("pre.result").inner_text()
    assert "<script>window.pwned = " in result and '<img src=\\"x\\"' in result  # as text
    assert run_page.locator("pre.result b").count() == 0  # no element made of it
    assert run_page.evaluate("typeof window.pwned") == "undefined"  # no script ran
    assert run_page.locator("g.box.status-completed").count() == 1
    assert "ed25519" in run_page.inner_text("body") or run_page.locator("dd code").count()
    shot(run_page, "run.png")

    run_page.click("#evidence-link")
    run_page.click("#verify")
    verdict = run_page.locator("#verdict")
    assert verdict.inner_text().startswith("Verified"), verdict.inner_text()
    kinds = run_page.locator(".timeline .kind").all_inner_texts()
    assert kinds[0] == "RunSubmitted" and "ApprovalGranted" in kinds
    assert "ToolCallCompleted" in kinds and kinds[-1] == "RunCompleted"
    assert run_page.locator(".event.outcome-broken").count() == 0
    shot(run_page, "evidence.png")
    with run_page.expect_download() as download:
        run_page.click("text=Download the offline bundle")
    assert download.value.suggested_filename == f"{run_id}.bundle.json"
    inbox.context.close()


def test_the_submitter_sees_the_buttons_disabled_with_the_rule(
    browser: Any, stack: Stack, api: httpx.Client
) -> None:
    admin = stack.tenant()
    submitter = issue(api, admin, "agent", "submitter")
    api.post(
        "/v1/calls",
        json={"tool": "read_repo_file", "args": {"path": "README.md"}, "environment": "prod"},
        headers=bearer(submitter),
    ).raise_for_status()
    page = signed_in(browser, stack, submitter)
    card = page.locator("article.held").first
    assert card.locator("button.approve").is_disabled()
    assert card.locator("button.reject").is_disabled()
    assert "no self-approval" in card.locator(".rule").inner_text()
    page.context.close()


def test_another_tenants_run_is_the_same_page_as_an_unknown_one(
    browser: Any, stack: Stack, api: httpx.Client
) -> None:
    mine, theirs = stack.tenant(), stack.tenant()
    run = api.post(
        "/v1/calls",
        json={"tool": "search_docs", "args": {"query": "release"}},
        headers=bearer(theirs),
    ).json()
    page = signed_in(browser, stack, mine)
    texts = []
    for run_id in (run["run_id"], "run_0000000000000000"):
        response = page.goto(f"{stack.url}/console/runs/{run_id}")
        assert response is not None and response.status == 404
        texts.append(page.inner_text("main"))
    assert texts[0] == texts[1] and "Not found" in texts[0]
    page.context.close()


def test_a_form_post_without_the_csrf_token_is_refused(
    browser: Any, stack: Stack, api: httpx.Client
) -> None:
    admin = stack.tenant()
    page = signed_in(browser, stack, admin)
    # a form as another page would build it: same fields, no CSRF token
    page.evaluate(
        """() => {
            const form = document.createElement("form");
            form.method = "post";
            form.action = "/console/sign-out";
            document.body.appendChild(form);
            form.submit();
        }"""
    )
    page.wait_for_load_state()
    assert "CSRF" in page.inner_text("main")
    response = page.goto(f"{stack.url}/console/inbox")
    assert response is not None and response.url.endswith("/console/inbox")  # still signed in
    page.context.close()


def test_signing_out_and_revoking_the_token_end_the_session(
    browser: Any, stack: Stack, api: httpx.Client
) -> None:
    admin = stack.tenant()
    page = signed_in(browser, stack, admin)
    page.click("#sign-out")
    page.wait_for_url("**/console/sign-in")
    page.goto(f"{stack.url}/console/runs")
    assert page.url.endswith("/console/sign-in")
    page.context.close()

    auditor = issue(api, admin, "reader", "auditor")
    page = signed_in(browser, stack, auditor)
    page.goto(f"{stack.url}/console/runs")
    assert page.url.endswith("/console/runs")
    token_id = next(
        t["token_id"]
        for t in api.get("/v1/tokens", headers=bearer(admin)).json()
        if t["principal"] == "reader"
    )
    assert api.delete(f"/v1/tokens/{token_id}", headers=bearer(admin)).status_code == 204
    page.goto(f"{stack.url}/console/runs")
    assert "/console/sign-in" in page.url
    assert "session has ended" in page.inner_text("#message")
    page.context.close()
