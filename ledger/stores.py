"""Which checkpoint and artifact store a control process uses, from its settings.

A directory by default (TOOLPLANE_CHECKPOINT_DIR, TOOLPLANE_ARTIFACT_DIR); an
S3-compatible bucket when TOOLPLANE_CHECKPOINT_STORE or TOOLPLANE_ARTIFACT_STORE is an
``s3://`` URL (ledger/s3store.py), with the endpoint, region and credentials of the
TOOLPLANE_S3_* settings, else of boto3's standard chain (the AWS_* variables).
"""

from __future__ import annotations

from ledger.artifacts import ArtifactStore, DirectoryArtifactStore
from ledger.checkpoints import CheckpointStore, DirectoryCheckpointStore
from toolplane.s3url import S3Location
from toolplane.settings import Settings

__all__ = ["artifact_store", "checkpoint_store"]


def _client(settings: Settings, setting: str) -> object:
    from ledger.s3store import make_s3_client

    key, secret = settings.s3_access_key_id, settings.s3_secret_access_key
    return make_s3_client(
        endpoint_url=settings.s3_endpoint_url,
        region=settings.s3_region,
        access_key_id=key.get_secret_value() if key is not None else None,
        secret_access_key=secret.get_secret_value() if secret is not None else None,
        setting=setting,
    )


def checkpoint_store(settings: Settings) -> CheckpointStore:
    """The signed checkpoints' store: CHECKPOINT_STORE's bucket, else CHECKPOINT_DIR."""
    if settings.checkpoint_store is None:
        return DirectoryCheckpointStore(settings.checkpoints_dir)
    from ledger.s3store import S3CheckpointStore

    return S3CheckpointStore(
        _client(settings, "TOOLPLANE_CHECKPOINT_STORE"),
        S3Location.parse(settings.checkpoint_store),
        conditional=settings.s3_conditional_writes,
    )


def artifact_store(settings: Settings) -> ArtifactStore:
    """The artifact store: ARTIFACT_STORE's bucket, else ARTIFACT_DIR."""
    if settings.artifact_store is None:
        return DirectoryArtifactStore(settings.artifacts_dir)
    from ledger.s3store import S3ArtifactStore

    return S3ArtifactStore(
        _client(settings, "TOOLPLANE_ARTIFACT_STORE"),
        S3Location.parse(settings.artifact_store),
        conditional=settings.s3_conditional_writes,
    )
