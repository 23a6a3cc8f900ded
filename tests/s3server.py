"""An S3-compatible endpoint for the tests: moto's standalone S3 server (``moto[server]``)
on a free loopback port, spoken to over HTTP with boto3 as the control does. It is not
AWS and not MinIO: what the S3 stores are tested against."""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

REGION = "us-east-1"
KEY_ID, SECRET = "toolplane-test", "toolplane-test-secret"  # moto takes any


@contextmanager
def moto_s3() -> Iterator[str]:
    """Run moto's S3 server; yields its endpoint URL."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        yield f"http://{host}:{port}"
    finally:
        server.stop()


def s3_client(endpoint: str) -> Any:
    import boto3

    return boto3.client(
        "s3",
        endpoint_url=endpoint,
        region_name=REGION,
        aws_access_key_id=KEY_ID,
        aws_secret_access_key=SECRET,
    )


def new_bucket(client: Any) -> str:
    name = f"tp-test-{secrets.token_hex(6)}"
    client.create_bucket(Bucket=name)
    return name


def s3_env(endpoint: str) -> dict[str, str]:
    """The control's settings for the test endpoint (its stores' URLs are set apart)."""
    return {
        "TOOLPLANE_S3_ENDPOINT_URL": endpoint,
        "TOOLPLANE_S3_REGION": REGION,
        "TOOLPLANE_S3_ACCESS_KEY_ID": KEY_ID,
        "TOOLPLANE_S3_SECRET_ACCESS_KEY": SECRET,
    }


S3_SETTINGS = ("checkpoint_store", "artifact_store", "s3_endpoint_url", "s3_region")
S3_SETTINGS += ("s3_access_key_id", "s3_secret_access_key", "s3_conditional_writes")


def s3_settings(env: dict[str, str]) -> dict[str, str]:
    """The S3 settings of a stack's environment, as Settings fields (tests/harness.py)."""
    return {
        k: env[f"TOOLPLANE_{k.upper()}"] for k in S3_SETTINGS if f"TOOLPLANE_{k.upper()}" in env
    }
