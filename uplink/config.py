"""Typed settings of the uplink: spool, disk quota, image policy, Kafka and S3.

Secrets never live in the YAML itself in production: a `SecretSource` names an environment variable
or a file (a mounted secret), and the resolved value is a pydantic SecretStr so it never reaches a
log line or a repr.
"""

from __future__ import annotations

import configparser
import os
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, model_validator


class SecretSource(BaseModel):
    """Where one secret comes from: exactly one of env, file or (tests/demo only) value."""

    model_config = ConfigDict(extra="forbid")

    env: str | None = None
    file: Path | None = None
    value: SecretStr | None = None

    @model_validator(mode="after")
    def _exactly_one(self) -> SecretSource:
        given = [x for x in (self.env, self.file, self.value) if x is not None]
        if len(given) != 1:
            raise ValueError("give exactly one of env (variable name), file (path) or value")
        return self

    def resolve(self) -> SecretStr:
        """Read the secret now (at start-up, so a missing one is a clear config error)."""
        if self.value is not None:
            return self.value
        if self.env is not None:
            got = os.environ.get(self.env)
            if got is None:
                raise ValueError(f"environment variable {self.env} is not set (secret source)")
            return SecretStr(got)
        assert self.file is not None
        try:
            return SecretStr(self.file.read_text().strip())
        except OSError as exc:
            raise ValueError(f"cannot read secret file {self.file}: {exc.strerror}") from exc


class TlsSettings(BaseModel):
    """TLS towards the broker; file paths so keys stay in the OS secret store, not in config."""

    model_config = ConfigDict(extra="forbid")

    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    key_password: SecretSource | None = None
    check_hostname: bool = True


class SaslSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] = "SCRAM-SHA-512"
    username: str
    password: SecretSource


class KafkaSettings(BaseModel):
    """Event forwarding. acks=all and idempotence are fixed, not settable: they are the contract."""

    model_config = ConfigDict(extra="forbid")

    bootstrap_servers: list[str] = Field(min_length=1)
    events_topic: str = "edge.events"
    client_id: str = "edge-uplink"
    tls: TlsSettings | None = None
    sasl: SaslSettings | None = None
    compression: Literal["gzip", "lz4", "zstd", "snappy", "none"] = "gzip"
    linger_ms: int = Field(default=20, ge=0, le=5000)
    max_batch_bytes: int = Field(default=262144, ge=1024)
    request_timeout_ms: int = Field(default=10000, ge=1000)
    """How long one send may wait for the broker before the batch is retried from the spool."""

    @property
    def security_protocol(self) -> str:
        if self.sasl is not None:
            return "SASL_SSL" if self.tls is not None else "SASL_PLAINTEXT"
        return "SSL" if self.tls is not None else "PLAINTEXT"


class S3Credentials(BaseModel):
    """Access key pair, each from env or file; or an AWS-style INI credentials file."""

    model_config = ConfigDict(extra="forbid")

    access_key_id: SecretSource | None = None
    secret_access_key: SecretSource | None = None
    credentials_file: Path | None = None
    """INI like ~/.aws/credentials: [profile] aws_access_key_id=..., aws_secret_access_key=..."""
    profile: str = "default"

    @model_validator(mode="after")
    def _one_way(self) -> S3Credentials:
        pair = self.access_key_id is not None and self.secret_access_key is not None
        if pair == (self.credentials_file is not None):
            raise ValueError(
                "give either access_key_id + secret_access_key, or credentials_file"
            )
        return self

    def resolve(self) -> tuple[SecretStr, SecretStr]:
        if self.credentials_file is not None:
            ini = configparser.ConfigParser()
            if not ini.read(self.credentials_file):
                raise ValueError(f"cannot read S3 credentials file {self.credentials_file}")
            if not ini.has_section(self.profile):
                raise ValueError(f"S3 credentials file has no [{self.profile}] section")
            sec = ini[self.profile]
            try:
                return SecretStr(sec["aws_access_key_id"]), SecretStr(sec["aws_secret_access_key"])
            except KeyError as exc:
                raise ValueError(f"S3 credentials file lacks {exc.args[0]}") from exc
        assert self.access_key_id is not None and self.secret_access_key is not None
        return self.access_key_id.resolve(), self.secret_access_key.resolve()


def _default_s3_credentials() -> S3Credentials:
    return S3Credentials(
        access_key_id=SecretSource(env="AWS_ACCESS_KEY_ID"),
        secret_access_key=SecretSource(env="AWS_SECRET_ACCESS_KEY"),
    )


class S3Settings(BaseModel):
    """Image forwarding to any S3-compatible store (key layout in docs/uplink.md)."""

    model_config = ConfigDict(extra="forbid")

    bucket: str = Field(min_length=3)
    endpoint_url: str | None = None
    region: str = "us-east-1"
    key_prefix: str = ""
    addressing_style: Literal["path", "virtual", "auto"] = "path"
    credentials: S3Credentials = Field(default_factory=_default_s3_credentials)
    ca_file: Path | None = None
    concurrency: int = Field(default=4, ge=1, le=64)
    timeout_s: float = Field(default=10.0, gt=0)


class ImageSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    format: Literal["png", "jpeg"] = "jpeg"
    jpeg_quality: int = Field(default=92, ge=1, le=100)
    png_compression: int = Field(default=3, ge=0, le=9)

    @property
    def extension(self) -> str:
        return "png" if self.format == "png" else "jpg"

    @property
    def content_type(self) -> str:
        return "image/png" if self.format == "png" else "image/jpeg"


class UplinkSettings(BaseModel):
    """The `uplink:` section of a line config."""

    model_config = ConfigDict(extra="forbid")

    spool_dir: Path = Path("var/uplink")
    quota_mb: float = Field(default=2048.0, gt=0)
    """Upper bound for the spool database plus its image files."""
    alarm_fraction: float = Field(default=0.5, gt=0, lt=1)
    """Raise the disk alarm once UNSENT data passes this fraction of the quota, long before any
    unsent data is evicted (sent data filling the quota is normal and goes first)."""
    evict_to_fraction: float = Field(default=0.9, gt=0, lt=1)
    """When the quota is exceeded, evict until usage is below this fraction of it."""
    alarm_backlog_events: int = Field(default=100_000, ge=1)
    alarm_oldest_unsent_s: float = Field(default=600.0, gt=0)
    ok_image_sample_rate: float = Field(default=0.002, ge=0, le=1)
    image: ImageSettings = Field(default_factory=ImageSettings)
    queue_max: int = Field(default=20_000, ge=1)
    """Events awaiting the writer; beyond it submit() refuses (and counts), never blocks. Events
    hold no pixels, so this bounds memory at ~queue_max x a few KB during a disk stall."""
    image_queue_mb: float = Field(default=256.0, gt=0)
    """Pixels held for images waiting to be encoded and written (raw frame bytes). Past it a kept
    image is dropped and counted, never its event. 256 MB = ~200 1280x1024 mono frames or ~85
    1280x1024 RGB ones: minutes of defects at a normal defect rate, bounded on a disk stall."""
    commit_timeout_s: float = Field(default=10.0, gt=0)
    """How long one commit waits for the database lock (SQLite busy timeout) before it counts as
    failed and is retried with backoff."""
    image_writers: int = Field(default=1, ge=1, le=32)
    """Threads that encode and write images; each makes the images waiting durable as a group
    (one directory fsync for the group). More where JPEG encoding of large frames needs several
    cores or a slow disk's fsyncs need overlapping; on 2 cores four cost 13 % of capacity."""
    batch_max_events: int = Field(default=500, ge=1)
    batch_max_delay_ms: float = Field(default=50.0, ge=0)
    sent_retention_h: float = Field(default=24.0, ge=0)
    """Sent events and images stay this long for local inspection, unless the quota needs room."""
    forward_batch: int = Field(default=500, ge=1)
    backoff_initial_s: float = Field(default=0.2, gt=0)
    backoff_max_s: float = Field(default=30.0, gt=0)
    kafka: KafkaSettings | None = None
    s3: S3Settings | None = None

    @model_validator(mode="after")
    def _fractions(self) -> UplinkSettings:
        if self.backoff_max_s < self.backoff_initial_s:
            raise ValueError("backoff_max_s must be >= backoff_initial_s")
        return self

    @property
    def quota_bytes(self) -> int:
        return int(self.quota_mb * 1024 * 1024)

    @property
    def image_queue_bytes(self) -> int:
        return int(self.image_queue_mb * 1024 * 1024)
