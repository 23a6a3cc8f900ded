"""Checkpoint and artifact stores in an S3-compatible bucket (boto3, the ``s3`` extra).

The same semantics as the directory stores (ledger/checkpoints.py, ledger/artifacts.py),
under ``s3://<bucket>/<prefix>``:

- ``S3ArtifactStore``: ``<prefix>sha256/<2 hex>/<62 hex>``, each object written once.
  With conditional writes (the default) the put carries ``If-None-Match: *``, so the
  server refuses to replace an object that exists; without them (a server that does not
  support the header: TOOLPLANE_S3_CONDITIONAL_WRITES=false) the store looks first
  (HEAD) and puts only when nothing is there, which leaves a window between the two
  in which another writer's object can be replaced (content-addressed, so only by other
  bytes if that writer is hostile). A read asks for at most the recorded size + 1 bytes
  (a Range request); the caller checks the hash (ledger/artifacts.py ``checked_bytes``).
- ``S3CheckpointStore``: ``<prefix><chain path>/<size, 20 digits>.note``, append-only
  (conditional put as above; an existing checkpoint is never overwritten), the newest is
  the largest size listed; each witness refusal is an object of its own under
  ``<prefix><chain path>/refusals/``, never appended to or rewritten.

Errors of the bucket (missing, access denied, endpoint down, no credentials) are
:class:`StoreUnavailable`, naming the setting; a missing object is named as missing.
Only the control process builds these (it holds the credentials); workers never do.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import secrets
import time
from collections.abc import Iterator
from typing import Any

from ledger.artifacts import ArtifactProblem
from ledger.errors import LedgerError, StoreUnavailable
from toolplane.s3url import S3Location

__all__ = ["S3ArtifactStore", "S3CheckpointStore", "S3Location", "make_s3_client"]

log = logging.getLogger("toolplane.ledger.s3store")
HEX64 = re.compile(r"^[0-9a-f]{64}$")
NOTE = re.compile(r"^[0-9]{20}\.note$")
CHAIN = re.compile(r"^(system|tenant:[A-Za-z0-9_.-]{1,40})$")
MAX_NOTE = 1 << 20  # a checkpoint note (with its cosignatures) is a few hundred bytes
MAX_REFUSAL = 64 << 10
MISSING = ("NoSuchKey", "404", "NotFound")
EXISTS = ("PreconditionFailed", "412", "ConditionalRequestConflict", "409")


def make_s3_client(
    *,
    endpoint_url: str | None,
    region: str | None,
    access_key_id: str | None,
    secret_access_key: str | None,
    setting: str,
) -> Any:
    """A boto3 S3 client; credentials not given come from boto3's standard chain (AWS_*
    variables, profiles, instance roles)."""
    try:
        import boto3
        from botocore.config import Config
    except ImportError as e:
        raise StoreUnavailable(
            "an S3 store needs boto3: install toolplane with the s3 extra (pip install "
            "'toolplane[s3]')",
            setting=setting,
        ) from e
    config = Config(connect_timeout=5, read_timeout=30, retries={"max_attempts": 3})
    return boto3.client(
        "s3",
        endpoint_url=endpoint_url,
        region_name=region,
        aws_access_key_id=access_key_id,
        aws_secret_access_key=secret_access_key,
        config=config,
    )


class _Bucket:
    """One client and location, and the translation of its errors."""

    def __init__(
        self, client: Any, location: S3Location, *, setting: str, conditional: bool = True
    ) -> None:
        self.client, self.where, self.setting = client, location, setting
        self.conditional = conditional

    @property
    def location(self) -> str:
        return str(self.where)

    def url(self, key: str) -> str:
        return f"s3://{self.where.bucket}/{key}"

    def fail(self, error: Exception, key: str) -> StoreUnavailable:
        """The error of a call as the operator needs it: the setting, the bucket, the cause."""
        code, message = _code(error), str(error).splitlines()[0] if str(error) else ""
        if code == "NoSuchBucket":
            problem = f"bucket {self.where.bucket!r} does not exist"
        elif code in ("AccessDenied", "403", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
            problem = f"access to {self.url(key)} denied ({code})"
        elif code:
            problem = f"{self.url(key)}: {code}: {message}"
        else:
            problem = f"{self.url(key)}: {type(error).__name__}: {message}"
        return StoreUnavailable(
            f"{problem} (endpoint: TOOLPLANE_S3_ENDPOINT_URL, credentials: "
            "TOOLPLANE_S3_ACCESS_KEY_ID or the AWS_* variables)",
            setting=self.setting,
        )

    def get(self, key: str, limit: int) -> bytes | None:
        """At most ``limit`` + 1 bytes of ``key``; None when there is no such object."""
        try:
            response = self.client.get_object(
                Bucket=self.where.bucket, Key=key, Range=f"bytes=0-{limit}"
            )
        except Exception as e:
            code = _code(e)
            if code in MISSING:
                return None
            if code == "InvalidRange":  # an empty object
                return b""
            raise self.fail(e, key) from e
        body = response["Body"]
        try:
            return bytes(body.read(limit + 1))
        except Exception as e:
            raise self.fail(e, key) from e
        finally:
            body.close()

    def exists(self, key: str) -> bool:
        try:
            self.client.head_object(Bucket=self.where.bucket, Key=key)
        except Exception as e:
            if _code(e) in MISSING:
                return False
            raise self.fail(e, key) from e
        return True

    def create(self, key: str, data: bytes, content_type: str) -> bool:
        """Write ``key`` only if there is no such object: True if written, False if one
        existed (then nothing is written)."""
        if not self.conditional and self.exists(key):
            return False
        extra = {"IfNoneMatch": "*"} if self.conditional else {}
        try:
            self.client.put_object(
                Bucket=self.where.bucket,
                Key=key,
                Body=data,
                ContentType=content_type,
                ChecksumAlgorithm="SHA256",
                **extra,
            )
        except Exception as e:
            if _code(e) in EXISTS:
                return False
            raise self.fail(e, key) from e
        return True

    def keys(self, prefix: str, *, delimiter: str = "") -> Iterator[str]:
        """Keys (or, with ``delimiter``, also the common prefixes) under ``prefix``."""
        args = {"Bucket": self.where.bucket, "Prefix": prefix}
        if delimiter:
            args["Delimiter"] = delimiter
        try:
            for page in self.client.get_paginator("list_objects_v2").paginate(**args):
                for item in page.get("Contents", ()):
                    yield str(item["Key"])
                for item in page.get("CommonPrefixes", ()):
                    yield str(item["Prefix"])
        except Exception as e:
            raise self.fail(e, prefix) from e


def _code(error: Exception) -> str:
    response = getattr(error, "response", None)
    if isinstance(response, dict):
        return str(response.get("Error", {}).get("Code", ""))
    return ""


class S3ArtifactStore:
    """Artifacts, content-addressed, in a bucket; written by the control only."""

    def __init__(self, client: Any, location: S3Location, *, conditional: bool = True) -> None:
        self.bucket = _Bucket(
            client, location, setting="TOOLPLANE_ARTIFACT_STORE", conditional=conditional
        )

    @property
    def location(self) -> str:
        return self.bucket.location

    def key_for(self, sha256: str) -> str:
        if not isinstance(sha256, str) or not HEX64.match(sha256):
            raise ArtifactProblem(str(sha256)[:80], "not a SHA-256 hex digest (64 of 0-9a-f)")
        return f"{self.bucket.where.prefix}sha256/{sha256[:2]}/{sha256[2:]}"

    def put(self, data: bytes) -> str:
        digest = hashlib.sha256(data).hexdigest()
        key = self.key_for(digest)
        if not self.bucket.create(key, data, "application/json"):
            # Written before (a redelivery): never replaced. Bytes that are not these are
            # named by every read (the hash is checked), and logged here.
            if self.bucket.get(key, len(data)) != data:
                log.error("artifact.conflict sha256=%s object=%s", digest, self.bucket.url(key))
        return digest

    def get(self, sha256: str, *, limit: int) -> bytes:
        key = self.key_for(sha256)
        found = self.bucket.get(key, limit)
        if found is None:
            raise ArtifactProblem(
                sha256, f"missing from the artifact store ({self.bucket.url(key)})"
            )
        return found


class S3CheckpointStore:
    """Signed checkpoints in a bucket, append-only."""

    def __init__(self, client: Any, location: S3Location, *, conditional: bool = True) -> None:
        self.bucket = _Bucket(
            client, location, setting="TOOLPLANE_CHECKPOINT_STORE", conditional=conditional
        )

    @property
    def location(self) -> str:
        return self.bucket.location

    def _dir(self, chain_id: str) -> str:
        if not CHAIN.match(chain_id):
            raise LedgerError(f"chain id {chain_id!r}: not a chain a checkpoint can name")
        return f"{self.bucket.where.prefix}{chain_id.replace(':', '/', 1)}/"

    def sizes(self, chain_id: str) -> list[int]:
        folder = self._dir(chain_id)
        names = (k[len(folder) :] for k in self.bucket.keys(folder, delimiter="/"))
        return sorted(int(n[:20]) for n in names if NOTE.match(n))

    def read(self, chain_id: str, size: int) -> bytes:
        key = f"{self._dir(chain_id)}{size:020d}.note"
        note = self.bucket.get(key, MAX_NOTE)
        if note is None:
            raise LedgerError(f"{self.bucket.url(key)}: no such checkpoint")
        if len(note) > MAX_NOTE:
            raise LedgerError(f"{self.bucket.url(key)}: larger than {MAX_NOTE} bytes")
        return note

    def latest(self, chain_id: str) -> bytes | None:
        sizes = self.sizes(chain_id)
        return self.read(chain_id, sizes[-1]) if sizes else None

    def chains(self) -> Iterator[str]:
        prefix = self.bucket.where.prefix
        found = set(self.bucket.keys(prefix, delimiter="/"))
        if f"{prefix}system/" in found:
            yield "system"
        for key in sorted(self.bucket.keys(f"{prefix}tenant/", delimiter="/")):
            name = key[len(prefix) + len("tenant/") :].rstrip("/")
            if CHAIN.match(f"tenant:{name}"):
                yield f"tenant:{name}"

    def record_refusal(self, chain_id: str, size: int, witness: str, problem: str) -> None:
        """A witness's refusal, as an object of its own (one JSON object) under
        ``<chain path>/refusals/``, named by size, time and a random part."""
        line = json.dumps({"size": size, "witness": witness, "problem": problem})
        name = f"{size:020d}-{time.time_ns():020d}-{secrets.token_hex(8)}.json"
        key = f"{self._dir(chain_id)}refusals/{name}"
        self.bucket.create(key, line.encode("utf-8"), "application/json")
        log.error(
            "witness.refused chain=%s size=%s witness=%s problem=%s",
            chain_id,
            size,
            witness,
            problem,
        )

    def refusals(self, chain_id: str) -> list[dict[str, Any]]:
        found = []
        for key in sorted(self.bucket.keys(f"{self._dir(chain_id)}refusals/")):
            data = self.bucket.get(key, MAX_REFUSAL)
            if data is not None:
                try:
                    found.append(json.loads(data))
                except ValueError:
                    found.append({"problem": f"unreadable refusal record {key}"})
        return found

    def write(self, chain_id: str, size: int, note: bytes) -> str:
        key = f"{self._dir(chain_id)}{size:020d}.note"
        if not self.bucket.create(key, note, "text/plain; charset=utf-8"):
            # Another checkpointer signed the same tree first (Ed25519 is deterministic);
            # anything else is a fork, and the checkpoint stored stays.
            if self.bucket.get(key, MAX_NOTE) != note:
                raise LedgerError(
                    f"{self.bucket.url(key)}: a different checkpoint of this size exists"
                )
        return self.bucket.url(key)
