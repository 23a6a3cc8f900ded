"""Policy bundles (versions, validation) and decisions (reasons, failing closed)."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest

import policy
import policy.engine
from policy import BundleError, Decision, PolicyEngine, PolicyError, PolicyRequest, load_bundle

DEFAULT = Path(policy.__file__).resolve().parent / "bundles" / "default"


@pytest.fixture(scope="module")
def engine() -> PolicyEngine:
    return PolicyEngine(load_bundle(DEFAULT))


@pytest.fixture
def bundle_copy(tmp_path: Path) -> Path:
    target = tmp_path / "bundle"
    shutil.copytree(DEFAULT, target)
    return target


ARGS = {"read_repo_file": {"path": "src/app.py"}, "search_docs": {"query": "q"}}


def request(tool: str = "read_repo_file", env: str = "dev", cls: str = "internal") -> PolicyRequest:
    return PolicyRequest(
        tenant="acme",
        principal="alice",
        role="developer",
        tool=tool,
        environment=env,
        classification=cls,
        args=ARGS.get(tool, {}),
        on_behalf_of="user:alice",
    )


def append_policy(bundle: Path, text: str) -> None:
    path = bundle / "policies.cedar"
    path.write_text(path.read_text() + "\n" + text + "\n")


# -- versions ----------------------------------------------------------------------


def test_version_is_sha256_hex_and_stable():
    first, second = load_bundle(DEFAULT), load_bundle(DEFAULT)
    assert re.fullmatch(r"[0-9a-f]{64}", first.version)
    assert first.version == second.version
    assert set(first.files) == {
        "policies.cedar",
        "safe-paths.cedar",
        "schema.cedarschema",
        "entitlements.json",
        "labels.json",
        "tests/shipped.json",
    }


def test_a_copy_has_the_same_version(bundle_copy):
    assert load_bundle(bundle_copy).version == load_bundle(DEFAULT).version


@pytest.mark.parametrize("name", ["policies.cedar", "schema.cedarschema"])
def test_editing_any_file_changes_the_version(bundle_copy, name):
    before = load_bundle(bundle_copy).version
    path = bundle_copy / name
    path.write_text(path.read_text() + "\n// an edit\n")
    after = load_bundle(bundle_copy)
    assert after.version != before
    assert after.files[name] != load_bundle(DEFAULT).files[name]


def test_adding_or_renaming_a_file_changes_the_version(bundle_copy):
    before = load_bundle(bundle_copy).version
    (bundle_copy / "tests" / "more.json").write_text('{"cases": []}')
    added = load_bundle(bundle_copy).version
    assert added != before
    (bundle_copy / "policies.cedar").rename(bundle_copy / "main.cedar")
    renamed = load_bundle(bundle_copy).version
    assert renamed not in (before, added)


def test_the_decision_carries_the_bundle_version(bundle_copy):
    append_policy(bundle_copy, "// changed")
    changed = PolicyEngine(load_bundle(bundle_copy))
    decision = changed.decide(request())
    assert decision.bundle_version == changed.version == load_bundle(bundle_copy).version
    assert decision.bundle_version != load_bundle(DEFAULT).version


# -- decisions under the shipped bundle --------------------------------------------


@pytest.mark.parametrize("tool", ["read_repo_file", "search_docs", "lint_python"])
@pytest.mark.parametrize("env", ["dev", "staging", "prod"])
def test_builtin_tools_are_allowed(engine, tool, env):
    decision = engine.decide(request(tool, env, "internal"))
    assert decision.allowed
    assert decision.policies == ("builtin-tools",)
    assert decision.errors == ()
    assert decision.reason == "permitted by builtin-tools"


@pytest.mark.parametrize("tool", ["read_repo_file", "search_docs", "lint_python", "rm_rf"])
def test_restricted_data_is_denied(engine, tool):
    decision = engine.decide(request(tool, "dev", "restricted"))
    assert not decision.allowed
    assert decision.policies == ("no-restricted-data",)
    assert "no-restricted-data" in decision.reason


def test_confidential_repo_reads_in_prod_are_denied(engine):
    decision = engine.decide(request("read_repo_file", "prod", "confidential"))
    assert not decision.allowed
    assert decision.policies == ("no-confidential-repo-reads-in-prod",)
    assert decision.reason == "forbidden by no-confidential-repo-reads-in-prod"
    # The same data outside prod, or another tool in prod, is allowed.
    assert engine.decide(request("read_repo_file", "staging", "confidential")).allowed
    assert engine.decide(request("search_docs", "prod", "confidential")).allowed


def test_unknown_tool_is_denied_because_nothing_permits_it(engine):
    decision = engine.decide(request("rm_rf", "dev", "internal"))
    assert not decision.allowed
    assert decision.policies == ()
    assert decision.errors == ()
    assert decision.reason == "no policy permits rm_rf in dev/internal"


@pytest.mark.parametrize(("env", "cls"), [("moon", "internal"), ("dev", "secret"), ("", "")])
def test_unknown_environment_or_classification_is_denied(engine, env, cls):
    decision = engine.decide(request("read_repo_file", env, cls))
    assert not decision.allowed
    assert "no policy permits" in decision.reason


def test_each_decision_has_its_own_id(engine):
    a, b = engine.decide(request()), engine.decide(request())
    assert a.decision_id != b.decision_id


def test_decision_as_evidence(engine):
    decision = engine.decide(request("read_repo_file", "prod", "confidential"))
    evidence = decision.as_evidence()
    assert evidence["decision"] == "deny"
    assert evidence["policies"] == ["no-confidential-repo-reads-in-prod"]
    assert evidence["bundle_version"] == engine.version
    assert evidence["decision_id"] == decision.decision_id
    assert evidence["reason"] == decision.reason
    assert evidence["errors"] == []
    assert evidence["request"] == {
        "tenant": "acme",
        "principal": "alice",
        "role": "developer",
        "tool": "read_repo_file",
        "environment": "prod",
        "classification": "confidential",
        "workflow": "call",
        "args": {"path": "src/app.py"},
        "on_behalf_of": "user:alice",
    }
    assert evidence["log_only"] == {
        "decision": "deny",
        "policies": [],
        "differs": False,
        "errors": [],
    }
    assert engine.decide(request()).as_evidence()["decision"] == "allow"


# -- failing closed ----------------------------------------------------------------


def test_engine_errors_are_denials(engine, monkeypatch):
    def explode(*args, **kwargs):
        raise RuntimeError("cedar blew up")

    monkeypatch.setattr(policy.engine.cedarpy, "is_authorized", explode)
    decision = engine.decide(request())
    assert isinstance(decision, Decision)
    assert not decision.allowed
    assert decision.policies == ()
    assert decision.errors == ("RuntimeError: cedar blew up",)
    assert "cedar blew up" in decision.reason
    assert decision.as_evidence()["decision"] == "deny"
    assert decision.bundle_version == engine.version


def test_diagnostic_errors_deny_even_if_cedar_allows(engine, monkeypatch):
    class Diagnostics:
        errors = ["while evaluating policy `policy0`: boom"]
        reasons = ["policy0"]

    class Allowed:
        allowed = True
        diagnostics = Diagnostics()

    monkeypatch.setattr(policy.engine.cedarpy, "is_authorized", lambda *a, **k: Allowed())
    decision = engine.decide(request())
    assert not decision.allowed
    # Cedar's own policy ids are named by their @id in what we record.
    assert decision.errors == ("while evaluating policy `builtin-tools`: boom",)
    assert decision.reason.startswith("policy evaluation error:")


# -- refused bundles ---------------------------------------------------------------


def test_policy_using_an_attribute_outside_the_schema_is_refused(bundle_copy):
    append_policy(
        bundle_copy,
        '@id("uses-missing-attribute")\n'
        'permit (principal, action, resource) when { context.missing == "x" };',
    )
    with pytest.raises(BundleError, match="uses-missing-attribute") as info:
        load_bundle(bundle_copy)
    assert "schema validation" in str(info.value)
    assert info.value.path == bundle_copy


def test_policy_without_id_is_refused(bundle_copy):
    append_policy(bundle_copy, "permit (principal, action, resource);")
    with pytest.raises(BundleError, match="@id"):
        load_bundle(bundle_copy)


def test_duplicate_id_is_refused(bundle_copy):
    append_policy(bundle_copy, '@id("builtin-tools")\nforbid (principal, action, resource);')
    with pytest.raises(BundleError, match="duplicate policy @id 'builtin-tools'"):
        load_bundle(bundle_copy)


def test_syntax_error_is_refused(bundle_copy):
    append_policy(bundle_copy, '@id("broken")\npermit (principal, action resource);')
    with pytest.raises(BundleError, match="syntax error"):
        load_bundle(bundle_copy)


def test_missing_schema_is_refused(bundle_copy):
    (bundle_copy / "schema.cedarschema").unlink()
    with pytest.raises(BundleError, match="missing schema.cedarschema"):
        load_bundle(bundle_copy)


def test_bundle_without_policies_is_refused(bundle_copy):
    for policies in bundle_copy.glob("*.cedar"):
        policies.unlink()
    with pytest.raises(BundleError, match="no \\*.cedar policy files"):
        load_bundle(bundle_copy)


def test_missing_directory_is_refused(tmp_path):
    with pytest.raises(BundleError, match="does not exist"):
        load_bundle(tmp_path / "nowhere")


def test_broken_schema_is_refused(bundle_copy):
    (bundle_copy / "schema.cedarschema").write_text("namespace Toolplane { entity ")
    with pytest.raises(BundleError):
        load_bundle(bundle_copy)


def test_bundle_error_is_a_policy_error():
    assert issubclass(BundleError, PolicyError)


def test_policies_split_over_files_keep_their_ids(bundle_copy):
    (bundle_copy / "extra.cedar").write_text(
        '@id("deny-lint-in-prod")\n'
        'forbid (principal, action, resource == Toolplane::Tool::"lint_python")\n'
        'when { context.environment == "prod" };\n'
    )
    bundle = load_bundle(bundle_copy)
    assert set(bundle.policies) == set(load_bundle(DEFAULT).policies) | {"deny-lint-in-prod"}
    decision = PolicyEngine(bundle).decide(request("lint_python", "prod", "internal"))
    assert not decision.allowed
    assert decision.policies == ("deny-lint-in-prod",)
