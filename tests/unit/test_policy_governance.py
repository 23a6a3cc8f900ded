"""Bundles as governance: arguments, approvals, log-only policies, plans and policy tests."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

import policy
from policy import BundleError, PolicyEngine, PolicyRequest, load_bundle
from policy.bundle import parse_duration
from policy.engine import cedar_args
from policy.testing import load_cases, run_policy_tests

DEFAULT = Path(policy.__file__).resolve().parent / "bundles" / "default"


@pytest.fixture(scope="module")
def engine() -> PolicyEngine:
    return PolicyEngine(load_bundle(DEFAULT))


@pytest.fixture
def bundle(tmp_path: Path) -> Path:
    target = tmp_path / "bundle"
    shutil.copytree(DEFAULT, target)
    return target


def req(tool: str, args: dict, env: str = "dev", **kw) -> PolicyRequest:
    return PolicyRequest(
        tenant="tn_1",
        principal="alice",
        role="submitter",
        tool=tool,
        environment=env,
        classification=kw.pop("classification", "internal"),
        args=args,
        **kw,
    )


def add(bundle: Path, text: str) -> None:
    (bundle / "extra.cedar").write_text(text)


# -- arguments reach the policies ------------------------------------------------------


@pytest.mark.parametrize(
    "path",
    [
        ".env",
        ".env.local",
        "app/.env",
        "keys/server.pem",
        "tls.key",
        ".git/config",
        "vendor/x/.git/HEAD",
    ],
)
def test_secret_paths_are_denied_by_argument(engine, path):
    decision = engine.decide(req("read_repo_file", {"path": path}))
    assert decision.outcome == "deny"
    assert decision.policies == ("no-secret-files",)


@pytest.mark.parametrize("path", ["src/app.py", "docs/env.md", "README.md", "keys.txt"])
def test_ordinary_paths_are_allowed(engine, path):
    assert engine.decide(req("read_repo_file", {"path": path})).allowed


def test_lint_code_size_is_bounded_by_policy(engine):
    assert engine.decide(req("lint_python", {"code": "x" * 100_000})).allowed
    over = engine.decide(req("lint_python", {"code": "x" * 100_001}))
    assert over.outcome == "deny"
    assert over.policies == ("lint-code-size",)


def test_cedar_args_keep_scalars_and_sets_and_drop_the_rest():
    values, lengths = cedar_args(
        {
            "path": "a",
            "n": 3,
            "flag": True,
            "tags": ["x", "y"],
            "ratio": 0.5,
            "nested": {"__entity": {"type": "Toolplane::Principal", "id": "t/admin"}},
            "mixed": ["a", {"b": 1}],
            "huge": 2**70,
        }
    )
    assert values == {"path": "a", "n": 3, "flag": True, "tags": ["x", "y"]}
    assert lengths == {"path": 1, "tags": 2, "mixed": 2}


def test_an_entity_escape_in_arguments_cannot_impersonate(bundle):
    add(
        bundle,
        '@id("admins-only")\n'
        'permit (principal, action, resource) when { principal.role == "admin" };\n',
    )
    engine = PolicyEngine(load_bundle(bundle))
    decision = engine.decide(
        req("shell", {"role": {"__entity": {"type": "Toolplane::Principal", "id": "tn_1/root"}}})
    )
    assert decision.outcome == "deny"


def test_a_policy_reading_a_mistyped_argument_denies(bundle):
    add(
        bundle,
        '@id("short-queries")\n'
        'permit (principal, action, resource == Toolplane::Tool::"echo")\n'
        'when { context.args has query && context.args.query like "a*" };\n',
    )
    engine = PolicyEngine(load_bundle(bundle))
    assert engine.decide(req("echo", {"query": "abc"})).allowed
    mistyped = engine.decide(req("echo", {"query": 5}))
    assert mistyped.outcome == "deny"
    assert mistyped.errors and "short-queries" in mistyped.errors[0]


def test_on_behalf_of_reaches_the_policy(bundle):
    add(
        bundle,
        '@id("bots-may-echo")\n'
        'permit (principal, action, resource == Toolplane::Tool::"echo")\n'
        'when { context has on_behalf_of && context.on_behalf_of like "agent:*" };\n',
    )
    engine = PolicyEngine(load_bundle(bundle))
    assert engine.decide(req("echo", {}, on_behalf_of="agent:reviewer")).allowed
    assert not engine.decide(req("echo", {}, on_behalf_of="user:bob")).allowed
    assert not engine.decide(req("echo", {})).allowed
    assert (
        engine.decide(req("echo", {}, on_behalf_of="agent:x")).as_evidence()["request"][
            "on_behalf_of"
        ]
        == "agent:x"
    )


# -- approvals ----------------------------------------------------------------------------


def test_prod_reads_outside_src_need_an_approval(engine):
    decision = engine.decide(req("read_repo_file", {"path": "README.md"}, "prod"))
    assert decision.outcome == "approval_required"
    assert decision.needs_approval and not decision.allowed
    assert decision.policies == ("prod-repo-reads-outside-src-need-approval",)
    assert decision.approval_ttl_s == 3600
    assert decision.constraints is not None


def test_an_approval_never_lifts_a_hard_forbid(engine):
    decision = engine.decide(req("read_repo_file", {"path": ".env"}, "prod"))
    assert decision.outcome == "deny"


def test_an_approval_never_grants_what_nothing_permits(bundle):
    add(bundle, '@id("gate")\n@approval("5m")\nforbid (principal, action, resource);\n')
    engine = PolicyEngine(load_bundle(bundle))
    assert engine.decide(req("search_docs", {"query": "x"})).outcome == "approval_required"
    assert engine.decide(req("unknown_tool", {})).outcome == "deny"


def test_the_shortest_approval_window_wins(bundle):
    add(
        bundle,
        '@id("gate-a")\n@approval("2h")\nforbid (principal, action, resource);\n'
        '@id("gate-b")\n@approval("90s")\nforbid (principal, action, resource);\n',
    )
    decision = PolicyEngine(load_bundle(bundle)).decide(req("search_docs", {"query": "x"}))
    assert decision.outcome == "approval_required"
    assert decision.approval_ttl_s == 90


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ('@id("p")\n@approval("1h")\npermit (principal, action, resource);', "belongs on a forbid"),
        ('@id("p")\n@approval("soon")\nforbid (principal, action, resource);', "not a duration"),
        ('@id("p")\n@approval("31d")\nforbid (principal, action, resource);', "at most 30d"),
        ('@id("p")\n@mode("dry")\nforbid (principal, action, resource);', "@mode must be one"),
    ],
)
def test_bad_annotations_refuse_the_bundle(bundle, text, problem):
    add(bundle, text)
    with pytest.raises(BundleError, match=problem):
        load_bundle(bundle)


@pytest.mark.parametrize(
    ("text", "seconds"), [("30s", 30), ("15m", 900), ("2h", 7200), ("7d", 604800)]
)
def test_durations(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "0s", "1w", "-1h", "1.5h", "h", "10"])
def test_bad_durations(text):
    with pytest.raises(ValueError, match="duration"):
        parse_duration(text)


# -- log-only policies ------------------------------------------------------------------


def test_a_log_only_policy_is_observed_not_enforced(engine):
    decision = engine.decide(req("search_docs", {"query": "x"}, "prod"))
    assert decision.allowed
    assert decision.log_only == {
        "decision": "deny",
        "policies": ["prod-calls-name-an-end-user"],
        "differs": True,
        "errors": [],
    }
    assert decision.as_evidence()["log_only"]["differs"] is True


def test_a_log_only_permit_grants_nothing(bundle):
    add(bundle, '@id("maybe-shell")\n@mode("log_only")\npermit (principal, action, resource);\n')
    decision = PolicyEngine(load_bundle(bundle)).decide(req("shell", {}))
    assert decision.outcome == "deny"
    assert decision.log_only["decision"] == "allow"
    assert decision.log_only["policies"] == ["maybe-shell"]


def test_switching_a_policy_to_enforce_changes_the_version_and_the_decision(bundle):
    text = (bundle / "policies.cedar").read_text().replace('@mode("log_only")\n', "")
    (bundle / "policies.cedar").write_text(text)
    enforced = load_bundle(bundle)
    assert enforced.version != load_bundle(DEFAULT).version
    decision = PolicyEngine(enforced).decide(req("search_docs", {"query": "x"}, "prod"))
    assert decision.outcome == "deny"
    assert decision.policies == ("prod-calls-name-an-end-user",)
    assert decision.log_only is None


# -- entitlement plans ------------------------------------------------------------------


def test_shipped_plans(engine):
    plans = engine.bundle.plans
    name, plan = plans.for_tenant("anyone")
    assert name == "standard" and plan.rate is not None and plan.daily_calls == 1_000_000


@pytest.mark.parametrize(
    ("doc", "problem"),
    [
        ({"plans": {"p": {"daily_calls": -1}}}, "plans.p.daily_calls"),
        ({"plans": {"p": {"rate": {"calls": 0, "per_s": 1}}}}, "plans.p.rate.calls"),
        ({"plans": {"p": {"daily_calls": "10"}}}, "plans.p.daily_calls"),
        ({"plans": {"p": {"burst": 3}}}, "plans.p.burst"),
        ({"plans": {}, "tenants": {"acme": "gold"}}, "no plan named 'gold'"),
        ({"plans": {}, "default": "gold"}, "no plan named 'gold'"),
    ],
)
def test_bad_plans_refuse_the_bundle(bundle, doc, problem):
    (bundle / "entitlements.json").write_text(json.dumps(doc))
    with pytest.raises(BundleError, match="entitlements.json") as info:
        load_bundle(bundle)
    assert problem in str(info.value)


def test_a_tenant_without_plan_or_default_is_unlimited(bundle):
    (bundle / "entitlements.json").write_text(
        json.dumps({"plans": {"gold": {"daily_calls": 5}}, "tenants": {"acme": "gold"}})
    )
    plans = load_bundle(bundle).plans
    assert plans.for_tenant("acme")[0] == "gold"
    assert plans.for_tenant("other") is None


# -- policy tests ---------------------------------------------------------------------


def test_the_shipped_bundle_passes_its_tests():
    report = run_policy_tests(load_bundle(DEFAULT))
    assert report.ok, [r.as_dict() for r in report.results if not r.passed]
    assert len(report.results) >= 15


def test_a_mismatch_fails_and_says_why(bundle):
    (bundle / "tests" / "wrong.json").write_text(
        json.dumps(
            {
                "cases": [
                    {
                        "name": "lint in prod is denied (it is not)",
                        "request": {"tool": "lint_python", "environment": "prod"},
                        "expect": "deny",
                    },
                    {
                        "name": "wrong deciding policy",
                        "request": {"tool": "search_docs", "classification": "restricted"},
                        "expect": "deny",
                        "policies": ["builtin-tools"],
                    },
                ]
            }
        )
    )
    report = run_policy_tests(load_bundle(bundle))
    assert not report.ok
    failed = {r.case.name: r.problems for r in report.results if not r.passed}
    assert set(failed) == {"lint in prod is denied (it is not)", "wrong deciding policy"}
    assert "expected deny, got allow" in failed["lint in prod is denied (it is not)"][0]
    assert "no-restricted-data" in failed["wrong deciding policy"][0]


def test_a_change_to_a_policy_is_caught_by_the_tests(bundle):
    text = (bundle / "policies.cedar").read_text().replace('context.args.path like "*.pem" || ', "")
    (bundle / "policies.cedar").write_text(text)
    report = run_policy_tests(load_bundle(bundle))
    assert not report.ok
    assert [r.case.name for r in report.results if not r.passed] == ["key files are never read"]


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        ('{"cases": [{"name": "x", "request": {"tool": "t"}, "expect": "maybe"}]}', "expect"),
        ('{"cases": [{"name": "x", "request": {}, "expect": "allow"}]}', "request.tool"),
        ('{"cases": [{"name": "x", "name": "y"}]}', "duplicate"),
        ("{not json", "not valid JSON"),
    ],
)
def test_malformed_tests_name_the_file_and_field(bundle, content, problem):
    (bundle / "tests" / "bad.json").write_text(content)
    with pytest.raises(BundleError, match="tests/bad.json") as info:
        load_cases(bundle)
    assert problem in str(info.value)


def test_a_bundle_without_tests_cannot_pass(bundle):
    shutil.rmtree(bundle / "tests")
    with pytest.raises(BundleError, match="no policy tests"):
        load_cases(bundle)


# -- review findings -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "path",
    ["src/../README.md", "docs/../x", "./README.md", "src/./a", "src//a", "/etc/passwd", ".."],
)
def test_unplain_paths_cannot_dodge_path_rules(engine, path):
    decision = engine.decide(req("read_repo_file", {"path": path}, "prod"))
    assert decision.outcome == "deny"
    assert "plain-paths-only" in decision.policies


def test_would_be_decisions_follow_the_approval_rule(bundle):
    add(
        bundle,
        '@id("observe-gate")\n@mode("log_only")\n@approval("1h")\n'
        'forbid (principal, action, resource == Toolplane::Tool::"search_docs");\n'
        '@id("maybe-echo")\n@mode("log_only")\n'
        'permit (principal, action, resource == Toolplane::Tool::"echo");\n'
        '@id("echo-gate")\n@approval("1h")\n'
        'forbid (principal, action, resource == Toolplane::Tool::"echo");\n',
    )
    engine = PolicyEngine(load_bundle(bundle))
    gated = engine.decide(req("search_docs", {"query": "x"}))
    assert gated.outcome == "allow"
    assert gated.log_only["decision"] == "approval_required"  # not "deny"
    lifted = engine.decide(req("echo", {}))
    assert lifted.outcome == "deny"  # only the approval forbid matches, but nothing permits
    assert lifted.log_only["decision"] == "approval_required"  # the log-only permit would


def test_a_bundle_that_changes_while_loading_is_refused(bundle, monkeypatch):
    import policy.bundle as module

    original = module.load_plans

    def edit_midway(path):
        (path / "policies.cedar").write_text((path / "policies.cedar").read_text() + "\n// x\n")
        return original(path)

    monkeypatch.setattr(module, "load_plans", edit_midway)
    with pytest.raises(BundleError, match="changed while it was being loaded"):
        load_bundle(bundle)


def test_terminal_output_never_carries_control_characters():
    from control.cli.output import safe

    assert safe("ok\x1b[2J\x07 done\n") == "ok\\x1b[2J\\x07 done\\n"
    assert safe("naïve — fine") == "naïve — fine"
