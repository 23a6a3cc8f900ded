"""``s3://<bucket>[/<prefix>]``: where an S3 store keeps its objects (a setting's value)."""

from __future__ import annotations

import re
from dataclasses import dataclass

__all__ = ["S3Location"]

BUCKET = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
PREFIX = re.compile(r"^([A-Za-z0-9._-]+/)*$")


@dataclass(frozen=True)
class S3Location:
    """``s3://bucket/prefix``: the prefix ends with ``/`` (or is empty)."""

    bucket: str
    prefix: str

    @classmethod
    def parse(cls, url: str) -> S3Location:
        """ValueError (naming the rule) unless ``url`` is ``s3://<bucket>[/<prefix>]``."""
        if not url.startswith("s3://"):
            raise ValueError("must be s3://<bucket>[/<prefix>]")
        bucket, _, prefix = url[5:].partition("/")
        if not BUCKET.match(bucket) or ".." in bucket:
            raise ValueError(
                f"bucket {bucket[:70]!r}: 3 to 63 of a-z, 0-9, '.', '-', starting and "
                "ending with a letter or digit"
            )
        prefix = prefix.strip("/")
        prefix = f"{prefix}/" if prefix else ""
        if not PREFIX.match(prefix) or any(p in (".", "..") for p in prefix.split("/")):
            raise ValueError("prefix: segments of A-Z, a-z, 0-9, '.', '_', '-' (no '.' or '..')")
        return cls(bucket, prefix)

    def __str__(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}"
