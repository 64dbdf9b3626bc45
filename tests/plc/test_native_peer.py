"""The native Modbus server that plays the PLC in `edge bench` (plc/native_peer.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from edge import bench
from plc import native_peer
from tests.support import mbpoll_read, mbpoll_write


def test_built_once_per_source_version_and_written_by_a_client_we_did_not_write(
    tmp_path: Path,
) -> None:
    binary = native_peer.build(tmp_path)
    mtime = binary.stat().st_mtime_ns
    assert native_peer.build(tmp_path) == binary and binary.stat().st_mtime_ns == mtime
    with bench.plc_process(1, binary) as port:
        mbpoll_write(port, 1000, [4242])
        assert mbpoll_read(port, 1000, 1) == [4242]


def test_auto_falls_back_to_the_simulator_and_native_says_what_to_install(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def unavailable(_out: Path) -> Path:
        raise native_peer.PeerUnavailable("cannot build (apt-get install libmodbus-dev)")

    monkeypatch.setattr(native_peer, "build", unavailable)
    assert bench.resolve_plc_peer("auto", tmp_path) == ("sim", None)
    assert "libmodbus-dev" in capsys.readouterr().out
    assert bench.resolve_plc_peer("sim", tmp_path) == ("sim", None)
    with pytest.raises(native_peer.PeerUnavailable, match="libmodbus-dev"):
        bench.resolve_plc_peer("native", tmp_path)


def test_a_missing_library_is_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    broken = tmp_path / "broken.c"
    broken.write_text("#include <no_such_modbus_header.h>\nint main(void) { return 0; }\n")
    monkeypatch.setattr(native_peer, "SOURCE", broken)
    with pytest.raises(native_peer.PeerUnavailable, match="libmodbus-dev"):
        native_peer.build(tmp_path / "out")
    assert not list((tmp_path / "out").glob("libmodbus_server-*"))
