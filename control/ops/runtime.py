"""The control plane's composition root: settings to engines, keys, policy and broker.

Built once per process (CLI command, client, control process) and passed down.
"""

from __future__ import annotations

import logging
import threading
import time
from datetime import UTC, datetime
from functools import cached_property
from pathlib import Path
from typing import Any

from celery import Celery
from sqlalchemy import Engine, select
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session, sessionmaker

import celeryconfig
from control.errors import ServiceUnavailable
from control.governance.entitlements import EntitlementStore
from control.governance.keys import sync_keys
from control.ops.embedded import find_embedded
from control.ops.identities import refresh_worker_keys
from control.ops.witness_client import WitnessClient
from control.orchestration.artifacts import Artifacts
from control.orchestration.dispatch import CeleryPublisher
from control.orchestration.intake import Governance
from ledger.chain import NewEvent
from ledger.checkpoints import (
    CheckpointRefused,
    CheckpointStore,
    Signed,
    checkpoint_all,
    load_signer,
)
from ledger.cosignature import CosignatureVerifier
from ledger.db import make_engine, make_sessionmaker
from ledger.models import PolicyVersion, SigningKey, ToolManifest
from ledger.note import NoteSigner, NoteVerifier
from ledger.store import append_events
from ledger.stores import artifact_store, checkpoint_store
from policy.bundle import PolicyBundle, bundle_files, load_bundle
from policy.engine import PolicyEngine
from policy.errors import BundleError
from toolplane.canonical import digest
from toolplane.errors import SettingsError
from toolplane.keystore import IndexWatch, KeyStore
from toolplane.settings import Settings
from toolplane.signing import KeyRing, Signer

log = logging.getLogger("toolplane.control")

KEYRING_TTL_S = 30.0  # the ledger's key table is read again after this; the index at once
MANIFEST_TTL_S = 10.0
POLICY_CHECK_S = 1.0  # how often the bundle directory is looked at for a new version
REDIS_SCHEMES = ("redis://", "rediss://", "unix://")

__all__ = ["ControlPlane", "resolve_urls"]


def resolve_urls(settings: Settings) -> tuple[str, str]:
    """Broker and database URLs: from the settings, else the embedded servers of HOME."""
    broker, database = settings.broker_url, settings.database_url
    if broker and database:
        return broker, database
    embedded = find_embedded(settings.home)
    if embedded is None:
        missing = " and ".join(
            n
            for n, v in (("TOOLPLANE_BROKER_URL", broker), ("TOOLPLANE_DATABASE_URL", database))
            if not v
        )
        raise ServiceUnavailable(
            "services",
            f"{missing} not set and no embedded servers under {settings.home}; "
            "run `toolplane up` or set them",
        )
    return broker or embedded.broker_url, database or embedded.database_url


class ControlPlane:
    """Everything a control-side process uses, built lazily from one Settings."""

    def __init__(self, settings: Settings, *, broker_url: str, database_url: str) -> None:
        self.settings = settings
        self.broker_url = broker_url
        self.database_url = database_url
        self.keystore = KeyStore(settings.keys_dir)
        self._signer = IndexWatch(self.keystore, lambda store: store.signer("control"))
        self._index = IndexWatch(self.keystore, lambda store: store.stamp())
        self._keyring: KeyRing | None = None
        self._keyring_at = 0.0
        self._manifests: dict[str, tuple[float, dict[str, Any]]] = {}
        self._policy: PolicyEngine | None = None
        self._policy_checked = 0.0
        self._policy_refused: set[str] = set()
        self._policy_lock = threading.Lock()

    @classmethod
    def from_settings(cls, settings: Settings) -> ControlPlane:
        broker, database = resolve_urls(settings)
        return cls(settings, broker_url=broker, database_url=database)

    @classmethod
    def from_plane(cls, plane: ControlPlane) -> ControlPlane:
        """Another plane of the same settings and URLs, with engines and caches of its own
        (the API thread's, beside the ingest's)."""
        return cls(plane.settings, broker_url=plane.broker_url, database_url=plane.database_url)

    @cached_property
    def engine(self) -> Engine:
        return make_engine(self.database_url)

    @cached_property
    def sessions(self) -> sessionmaker[Session]:
        return make_sessionmaker(self.engine)

    def check_database(self) -> None:
        try:
            with self.engine.connect() as connection:
                connection.exec_driver_sql("select 1")
        except OperationalError as e:
            raise ServiceUnavailable("database", str(e.orig).strip().splitlines()[0]) from e

    @cached_property
    def celery(self) -> Celery:
        app = Celery("toolplane-control", set_as_current=False)
        app.conf.update(
            celeryconfig.build_config(
                self.broker_url, visibility_timeout=self.settings.visibility_timeout
            )
        )
        return app

    @cached_property
    def publisher(self) -> CeleryPublisher:
        return CeleryPublisher(self.celery)

    # -- checkpoints (ledger/checkpoints.py) -------------------------------------
    @cached_property
    def checkpoints(self) -> CheckpointStore:
        """Signed checkpoints, outside the database: files, or a bucket (ledger/stores.py)."""
        return checkpoint_store(self.settings)

    @cached_property
    def artifacts(self) -> Artifacts:
        """Large results, outside the database: files, or a bucket (ledger/stores.py)."""
        return Artifacts(artifact_store(self.settings), self.settings.artifact_threshold)

    @cached_property
    def checkpoint_signer(self) -> NoteSigner:
        """The key that signs checkpoints, named for the deployment (made once)."""
        return load_signer(self.settings.keys_dir, self.settings.deployment)

    @cached_property
    def witnesses(self) -> WitnessClient | None:
        """The witnesses asked to cosign each checkpoint (TOOLPLANE_WITNESS_URLS), if any."""
        urls = [u for u in self.settings.witness_urls.split(",") if u.strip()]
        if not urls:
            return None
        keys = [CosignatureVerifier.parse(k) for k in self.settings.witness_keys.split(",") if k]
        return WitnessClient(urls, keys)

    def checkpoint_verifiers(self) -> list[NoteVerifier]:
        """Keys a checkpoint is verified with: pinned in the key store, never the database."""
        return [self.checkpoint_signer.verifier]

    def checkpoint(
        self, chain_ids: list[str] | None = None
    ) -> tuple[list[Signed], list[CheckpointRefused]]:
        """Integrate and checkpoint ``chain_ids`` (default: every chain with events)."""
        signer, store, name = self.checkpoint_signer, self.checkpoints, self.settings.deployment
        cosign = self.witnesses.cosign if self.witnesses is not None else None
        with self.sessions() as session:
            return checkpoint_all(
                session,
                signer=signer,
                store=store,
                deployment=name,
                cosign=cosign,
                chain_ids=chain_ids,
            )

    @property
    def signer(self) -> Signer:
        """The control's active key, as of the key store's index now: a rotation or a
        revocation (which replaces an active key) takes effect without a restart."""
        return self._signer.get()

    @property
    def policy(self) -> PolicyEngine:
        """The engine of the bundle in POLICY_DIR, reloaded when its files change.

        A new version is loaded, recorded (PolicyVersionLoaded) and used from the
        next decision on, without restarting anything. A version that fails to
        load is refused (PolicyBundleRefused) and the running one stays.
        """
        now = time.monotonic()
        if self._policy is not None and now - self._policy_checked < POLICY_CHECK_S:
            return self._policy
        with self._policy_lock:
            if self._policy is None or time.monotonic() - self._policy_checked >= POLICY_CHECK_S:
                self._reload_policy()
                self._policy_checked = time.monotonic()
        assert self._policy is not None
        return self._policy

    def _reload_policy(self) -> None:
        path = self.settings.bundle_dir
        if self._policy is not None:
            try:
                if digest(bundle_files(path)) == self._policy.version:
                    return
            except OSError:
                pass  # let load_bundle say what is wrong
        try:
            bundle = load_bundle(path)
        except BundleError as e:
            if self._policy is None:
                raise
            self._refuse_policy(path, e)
            return
        if self._policy is not None and bundle.version == self._policy.version:
            return
        self._record_policy(bundle)
        if self._policy is not None:
            log.info("policy.reloaded version=%s", bundle.version[:16])
        self._policy = PolicyEngine(bundle)

    def _refuse_policy(self, path: Path, error: BundleError) -> None:
        try:
            attempted = digest(bundle_files(path))
        except OSError:
            attempted = "unreadable"
        if attempted in self._policy_refused:
            return
        self._policy_refused.add(attempted)
        log.error("policy.refused version=%s problem=%s", attempted[:16], error)
        with self.sessions() as session:
            append_events(
                session,
                [
                    NewEvent(
                        "PolicyBundleRefused",
                        {
                            "attempted_version": attempted,
                            "path": str(path),
                            "problem": str(error),
                            "running_version": self._policy.version if self._policy else None,
                        },
                    )
                ],
            )
            session.commit()

    def _record_policy(self, bundle: PolicyBundle) -> None:
        with self.sessions() as session:
            inserted = session.execute(
                pg_insert(PolicyVersion)
                .values(
                    version=bundle.version,
                    path=str(bundle.path),
                    files=bundle.files,
                    loaded_at=datetime.now(UTC),
                )
                .on_conflict_do_nothing(index_elements=["version"])
                .returning(PolicyVersion.version)
            ).first()
            if inserted is not None:
                append_events(
                    session,
                    [
                        NewEvent(
                            "PolicyVersionLoaded",
                            {
                                "version": bundle.version,
                                "path": str(bundle.path),
                                "files": bundle.files,
                                "policies": sorted(bundle.policies),
                                "log_only": sorted(
                                    p.id for p in bundle.policies.values() if p.mode == "log_only"
                                ),
                                "labels": bundle.labels.as_dict(),
                                "plans": {
                                    name: plan.as_dict()
                                    for name, plan in bundle.plans.plans.items()
                                },
                            },
                        )
                    ],
                )
            session.commit()

    # -- entitlements ----------------------------------------------------------------
    @property
    def redis_url(self) -> str | None:
        url = self.settings.redis_url or self.broker_url
        return url if url.startswith(REDIS_SCHEMES) else None

    @cached_property
    def entitlements(self) -> EntitlementStore | None:
        """The entitlement store, or None where no Redis is configured."""
        url = self.redis_url
        return None if url is None else EntitlementStore.from_url(url)

    def governance(self) -> Governance:
        return Governance(
            engine=self.policy,
            signer=self.signer,
            visibility_timeout=self.settings.visibility_timeout,
            queue_wait_s=self.settings.queue_wait_s,
            manifests=self.manifest,
            entitlements=self.entitlements,
            classifications=self.settings.classification_order,
            artifacts=self.artifacts,
        )

    # -- tool manifests ------------------------------------------------------------
    def manifest(self, session: Session, tool: str) -> dict[str, Any] | None:
        """A tool's manifest in force (the approved one), cached for a few seconds (read again
        on a miss): an approval made in another process applies here within MANIFEST_TTL_S."""
        now = time.monotonic()
        cached = self._manifests.get(tool)
        if cached is not None and now - cached[0] < MANIFEST_TTL_S:
            return cached[1]
        row = session.get(ToolManifest, tool)
        if row is None:
            return None
        self._manifests[tool] = (now, row.manifest)
        return row.manifest

    def forget_manifests(self) -> None:
        """Read every tool's manifest again at its next use (after an approval here)."""
        self._manifests.clear()

    # -- keys ------------------------------------------------------------------
    def sync_keys(self) -> int:
        """Mirror the key store in the ledger's key table, and its revocations back."""
        with self.sessions() as session:
            count = sync_keys(session, self.keystore)
        self._keyring = None
        try:  # a revocation learnt here reaches the workers' own copies (control.ops.identities)
            refresh_worker_keys(self.settings)
        except SettingsError as e:
            log.error("keys.workers_not_refreshed error=%s", e)
        return count

    def keyring(self, *, refresh: bool = False) -> KeyRing:
        """Keys to verify receipts: the key store's (with local HMAC secrets), each with the
        earliest retirement and revocation that it or the ledger's key table knows. Trust
        comes from the key store only, outside the database: a key found only in the table
        verifies nothing (whoever can write the table could have put it there).

        Built again when the key store's index changes, and at least every KEYRING_TTL_S
        (ingest also reads the revocation of each receipt's key from the table itself:
        control.governance.keys.judge_key)."""
        index_changed = self._index.changed()
        fresh = time.monotonic() - self._keyring_at < KEYRING_TTL_S
        if self._keyring is not None and fresh and not refresh and not index_changed:
            return self._keyring
        self._index.get()
        ring = KeyRing(self.keystore.public_keys(with_secrets=True))
        with self.sessions() as session:
            for row in session.scalars(select(SigningKey)):
                known = ring.get(row.key_id)
                if known is not None:
                    ring.add(known.merged(not_after=row.not_after, revoked_at=row.revoked_at))
        self._keyring, self._keyring_at = ring, time.monotonic()
        return ring
