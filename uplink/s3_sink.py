"""S3 upload of spooled images with aiobotocore (native asyncio, any S3-compatible store).

Key layout (set by the spool when it stores the image, so the event can reference it before the
upload happens): <key_prefix><line>/<YYYY-MM-DD>/<camera>/<event_id>.<ext>. Object metadata carries
the event's identity so an image is traceable without the event stream.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
from collections.abc import AsyncIterator
from typing import Any

from aiobotocore.config import AioConfig
from aiobotocore.session import get_session

from uplink.config import S3Settings
from uplink.store import SpooledImage


def client_kwargs(cfg: S3Settings) -> dict[str, Any]:
    key_id, secret = cfg.credentials.resolve()
    kw: dict[str, Any] = {
        "region_name": cfg.region,
        "aws_access_key_id": key_id.get_secret_value(),
        "aws_secret_access_key": secret.get_secret_value(),
        "config": AioConfig(
            s3={"addressing_style": cfg.addressing_style},
            connect_timeout=cfg.timeout_s,
            read_timeout=cfg.timeout_s,
            retries={"max_attempts": 1, "mode": "standard"},  # the spool is our retry queue
            max_pool_connections=max(cfg.concurrency, 2),
        ),
    }
    if cfg.endpoint_url:
        kw["endpoint_url"] = cfg.endpoint_url
    if cfg.ca_file is not None:
        kw["verify"] = str(cfg.ca_file)
    return kw


@contextlib.asynccontextmanager
async def s3_client(cfg: S3Settings) -> AsyncIterator[Any]:
    session = get_session()
    async with session.create_client("s3", **client_kwargs(cfg)) as client:
        yield client


def image_metadata(img: SpooledImage, data: bytes) -> dict[str, str]:
    """x-amz-meta-*: ASCII only, so free-form text from the event is not copied here."""
    try:
        payload = json.loads(img.payload)
    except ValueError:
        payload = {}
    meta = {
        "event-id": img.event_id,
        "line": img.line,
        "camera": img.camera,
        "part-id": str(img.part_id),
        "verdict": img.verdict,
        "kind": img.image_kind,
        "captured-at": str(payload.get("captured_at", "")),
        "model-id": str(payload.get("model_id", "")),
        "schema-version": str(payload.get("schema_version", "")),
        "sha256": hashlib.sha256(data).hexdigest(),
    }
    return {k: v.encode("ascii", "replace").decode() for k, v in meta.items()}


async def upload(client: Any, cfg: S3Settings, img: SpooledImage) -> None:
    """Put one image; raises FileNotFoundError if the file is gone, botocore errors otherwise."""
    data = await asyncio.to_thread(img.path.read_bytes)
    content_type = "image/png" if img.key.endswith(".png") else "image/jpeg"
    await client.put_object(
        Bucket=cfg.bucket, Key=img.key, Body=data, ContentType=content_type,
        Metadata=image_metadata(img, data),
    )
