"""Config: secrets from env/file, never in reprs; Kafka TLS/SASL wiring; clear errors."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from confluent_kafka import KafkaException
from pydantic import ValidationError

from uplink.config import UplinkSettings
from uplink.kafka_sink import KafkaConfigError, KafkaSink, producer_config
from uplink.s3_sink import client_kwargs


def make_cert(tmp_path: Path) -> tuple[Path, Path]:
    key, cert = tmp_path / "client.key", tmp_path / "client.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key),
         "-out", str(cert), "-days", "1", "-subj", "/CN=edge-test"],
        check=True, capture_output=True,
    )
    return key, cert


def test_kafka_tls_and_sasl_from_files_and_env(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    key, cert = make_cert(tmp_path)
    pw = tmp_path / "kafka.pw"
    pw.write_text("s3cr3t-from-file\n")
    cfg = UplinkSettings.model_validate({"kafka": {
        "bootstrap_servers": ["broker:9093"], "events_topic": "plant.events",
        "tls": {"ca_file": str(cert), "cert_file": str(cert), "key_file": str(key)},
        "sasl": {"mechanism": "SCRAM-SHA-512", "username": "edge", "password": {"file": str(pw)}},
    }})
    assert cfg.kafka is not None
    kw = producer_config(cfg.kafka)
    assert kw["acks"] == "all" and kw["enable.idempotence"] is True
    assert kw["security.protocol"] == "SASL_SSL"
    assert kw["ssl.ca.location"] == str(cert) and kw["ssl.key.location"] == str(key)
    assert kw["ssl.endpoint.identification.algorithm"] == "https"
    assert kw["sasl.mechanism"] == "SCRAM-SHA-512" and kw["sasl.username"] == "edge"
    assert kw["sasl.password"] == "s3cr3t-from-file"
    assert "s3cr3t" not in repr(cfg) and "s3cr3t" not in str(cfg.model_dump())
    KafkaSink(cfg.kafka).close(0.1)  # librdkafka itself accepts the mapped TLS/SASL settings

    monkeypatch.setenv("KAFKA_PW", "from-env")
    env_cfg = UplinkSettings.model_validate({"kafka": {
        "bootstrap_servers": ["b:9092"],
        "sasl": {"mechanism": "PLAIN", "username": "u", "password": {"env": "KAFKA_PW"}},
    }})
    assert env_cfg.kafka is not None
    kw = producer_config(env_cfg.kafka)
    assert kw["security.protocol"] == "SASL_PLAINTEXT" and kw["sasl.password"] == "from-env"


def test_missing_secret_and_codec_errors_name_the_problem(tmp_path: Path) -> None:
    cfg = UplinkSettings.model_validate({"kafka": {
        "bootstrap_servers": ["b:9092"],
        "sasl": {"username": "u", "password": {"env": "NO_SUCH_VAR_FOR_TEST"}},
    }})
    assert cfg.kafka is not None
    with pytest.raises(ValueError, match="NO_SUCH_VAR_FOR_TEST is not set"):
        producer_config(cfg.kafka)
    s3 = UplinkSettings.model_validate({"s3": {
        "bucket": "imgs", "credentials": {"credentials_file": str(tmp_path / "missing.ini")}}})
    assert s3.s3 is not None
    with pytest.raises(ValueError, match="cannot read S3 credentials file"):
        client_kwargs(s3.s3)
    # librdkafka refuses what cannot work on this machine, at start-up, naming it.
    tls = UplinkSettings.model_validate({"kafka": {
        "bootstrap_servers": ["b:9093"], "tls": {"ca_file": str(tmp_path / "no-such-ca.pem")}}})
    assert tls.kafka is not None
    with pytest.raises(KafkaConfigError, match=r"ssl\.ca\.location"):
        KafkaSink(tls.kafka)


@pytest.mark.parametrize("codec", ["gzip", "lz4", "zstd", "snappy", "none"])
def test_every_compression_codec_is_built_in(codec: str) -> None:
    """librdkafka ships all codecs (no cramjam extra as with aiokafka)."""
    cfg = UplinkSettings.model_validate(
        {"kafka": {"bootstrap_servers": ["b:9092"], "compression": codec}})
    assert cfg.kafka is not None
    KafkaSink(cfg.kafka).close(0.1)


def test_s3_credentials_from_ini_file(tmp_path: Path) -> None:
    ini = tmp_path / "credentials"
    ini.write_text("[line7]\naws_access_key_id = AKIAEDGE\naws_secret_access_key = topsecret\n")
    cfg = UplinkSettings.model_validate({"s3": {
        "bucket": "imgs", "endpoint_url": "https://s3.plant.local",
        "credentials": {"credentials_file": str(ini), "profile": "line7"}}})
    assert cfg.s3 is not None
    kw = client_kwargs(cfg.s3)
    assert kw["aws_access_key_id"] == "AKIAEDGE" and kw["aws_secret_access_key"] == "topsecret"
    assert "topsecret" not in repr(cfg)


@pytest.mark.parametrize(
    ("doc", "where"),
    [
        ({"colour": "blue"}, "colour"),
        ({"kafka": {"bootstrap_servers": []}}, "bootstrap_servers"),
        ({"s3": {"bucket": "b", "credentials": {"access_key_id": {"env": "A", "file": "/x"}}}},
         "exactly one"),
        ({"ok_image_sample_rate": 1.5}, "ok_image_sample_rate"),
        ({"image": {"format": "bmp"}}, "format"),
    ],
)
def test_bad_config_is_rejected_with_its_key(doc: dict[str, object], where: str) -> None:
    with pytest.raises(ValidationError, match=where):
        UplinkSettings.model_validate(doc)


def test_librdkafka_log_lines_go_to_the_uplink_kafka_logger(
    caplog: pytest.LogCaptureFixture,
) -> None:
    from tests.support import free_port

    cfg = UplinkSettings.model_validate(
        {"kafka": {"bootstrap_servers": [f"127.0.0.1:{free_port()}"]}})  # nothing listens
    assert cfg.kafka is not None
    sink = KafkaSink(cfg.kafka)
    with caplog.at_level("DEBUG", logger="uplink.kafka"), pytest.raises(KafkaException):
        sink.probe(1.0)
    sink.close(0.5)  # serves the queued log lines
    lines = [r for r in caplog.records if r.name == "uplink.kafka"]
    assert lines and any("Connection refused" in r.getMessage() for r in lines)
