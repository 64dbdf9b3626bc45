"""Fleet rollout: how one line is read and judged (stdlib only).

This file runs in two places: inside the `edge_line` Ansible module on each line PC (Ansible ships
it there as module_utils, so it may import nothing the line PC lacks) and on the controller, where
`scripts/fleet/rollout` plans the waves with it and the tests check the gate arithmetic directly.

A gate compares a line with ITSELF: the figures of a window measured on the running line before
anything changed (its baseline) against a window of the same length after the new model went live.
Lines differ (parts, lighting, defect mix), so absolute limits would be either too loose for a good
line or too tight for a hard one; the change a model causes on its own line is what a rollout
must catch.
"""

from __future__ import annotations

import json
import math
import os
import socket
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass, field
from typing import Any

# ---- where a line listens -------------------------------------------------------------------


@dataclass
class LineEndpoints:
    control_socket: str
    """The daemon's Unix control socket (JSON lines, edge/control.py)."""
    http: str
    """host:port of /healthz and /metrics (always an address of the box itself)."""


def _read_yaml(path: str) -> dict[str, Any]:
    try:
        from ruamel.yaml import YAML  # the line venv's own YAML reader (an edge dependency)

        with open(path, encoding="utf-8") as fh:
            data = YAML(typ="safe").load(fh)
    except ImportError:
        try:
            import yaml  # PyYAML: ships with ansible-core
        except ImportError:
            raise ValueError(
                "no YAML reader in this Python: set ansible_python_interpreter to the line's "
                "venv python (e.g. /opt/edge/venv/bin/python), or give the host vars "
                "edge_control_socket and edge_http"
            ) from None
        with open(path, encoding="utf-8") as fh:
            data = yaml.safe_load(fh)
    if not isinstance(data, dict):
        raise ValueError(f"{path} is not a line config (no top-level mapping)")
    return data


def _section(data: dict[str, Any], key: str) -> dict[str, Any]:
    value = data.get(key) or {}
    return value if isinstance(value, dict) else {}


def line_endpoints(
    config: str, control_socket: str | None = None, http: str | None = None
) -> LineEndpoints:
    """Where the daemon of the line `config` describes listens.

    With the line's own venv as interpreter (the documented setting) the daemon's loader decides,
    so the answer cannot drift from what `edge run` does; otherwise the same documented rules are
    applied to the raw YAML: `control.socket`, else `<state_dir>/control.sock`, else
    `<uplink.spool_dir>/../state/control.sock`, relative paths relative to the YAML's folder.
    """
    if control_socket and http:
        return LineEndpoints(control_socket, http)
    try:
        from pathlib import Path

        from edge.config import ConfigError, load_config
    except ImportError:
        sock, obs = _endpoints_from_yaml(config)
    else:
        try:
            cfg = load_config(Path(config), deep=False)
        except ConfigError as exc:
            raise ValueError(f"config error in {exc.path}: " + "; ".join(exc.problems)) from None
        sock = str(cfg.control_socket())
        obs = (cfg.observability.host, cfg.observability.port, cfg.observability.enabled)
    host, port, enabled = obs
    if not http:
        if not enabled or not port:
            raise ValueError(
                f"{config}: the health gate reads /healthz and /metrics, but observability is "
                "off or on a random port (port: 0); give it a fixed port, or the host var edge_http"
            )
        if host in ("", "0.0.0.0", "::"):
            host = "127.0.0.1"
        http = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    return LineEndpoints(control_socket or sock, http)


def _endpoints_from_yaml(config: str) -> tuple[str, tuple[str, int, bool]]:
    data = _read_yaml(config)
    base = os.path.dirname(os.path.abspath(config))

    def rel(p: str) -> str:
        return os.path.normpath(os.path.join(base, os.path.expanduser(str(p))))

    control = _section(data, "control")
    if control.get("socket"):
        sock = rel(control["socket"])
    else:
        state = data.get("state_dir")
        if not state:
            spool = _section(data, "uplink").get("spool_dir") or "var/uplink"
            state = os.path.join(os.path.dirname(rel(spool)), "state")
        sock = os.path.join(rel(state), "control.sock")
    obs = _section(data, "observability")
    return sock, (
        str(obs.get("host", "127.0.0.1")),
        int(obs.get("port", 9108)),
        bool(obs.get("enabled", True)),
    )


# ---- talking to a line ----------------------------------------------------------------------


class LineError(Exception):
    """The line refused a command or could not be reached: the message says which and why."""


def control_call(
    path: str, cmd: str, args: dict[str, Any] | None = None, timeout_s: float = 300.0
) -> Any:
    """One command over the daemon's control socket (the protocol of edge/control.py: one JSON
    object per line each way). The same socket `edge model ...` uses; spoken directly because
    a CLI start costs 1-3 s of CPU on a 2-core line PC, and the soak polls it."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout_s)
        try:
            s.connect(path)
        except (FileNotFoundError, ConnectionRefusedError) as exc:
            raise LineError(
                f"no daemon listening on {path} ({exc.strerror}): is the line running and is "
                "edge_config its config?"
            ) from None
        except PermissionError:
            raise LineError(
                f"permission denied on {path}: run the rollout as a member of the service's group "
                "(e.g. ansible_become_user=edge)"
            ) from None
        s.sendall(json.dumps({"cmd": cmd, "args": args or {}}).encode() + b"\n")
        buf = b""
        while not buf.endswith(b"\n"):
            chunk = s.recv(65536)
            if not chunk:
                raise LineError(f"the daemon closed the connection without answering {cmd}")
            buf += chunk
    answer = json.loads(buf)
    if not answer.get("ok"):
        raise LineError(f"{cmd} refused: {answer.get('error')}")
    return answer.get("result")


def http_get(http: str, path: str, timeout_s: float = 10.0) -> tuple[int, str]:
    """(status, body) of the line's own HTTP endpoint; 503 bodies are answers too (/healthz)."""
    url = f"http://{http}{path}"
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as r:
            return int(r.status), r.read().decode("utf-8", "replace")
    except urllib.error.HTTPError as exc:
        return int(exc.code), exc.read().decode("utf-8", "replace")
    except (urllib.error.URLError, OSError) as exc:
        raise LineError(f"{url} unreachable ({exc}): is observability enabled on this line?") \
            from None


def health(http: str) -> dict[str, Any]:
    """The parts of /healthz a gate compares: overall, components up/down, alarms, misses."""
    code, body = http_get(http, "/healthz")
    try:
        doc = json.loads(body)
    except ValueError:
        raise LineError(f"/healthz on {http} did not answer JSON (HTTP {code})") from None
    comps = doc.get("components") or {}
    return {
        "http_status": code,
        "status": doc.get("status"),
        "components": {n: bool(c.get("up")) for n, c in comps.items() if isinstance(c, dict)},
        "alarms": sorted(str(a) for a in doc.get("alarms") or []),
        "problems": doc.get("problems") or [],
        "frames": doc.get("frames"),
        "deadline_misses": doc.get("deadline_misses"),
    }


# ---- metrics --------------------------------------------------------------------------------


def parse_metrics(text: str) -> list[tuple[str, dict[str, str], float]]:
    """Prometheus text exposition -> (name, labels, value); comments and odd lines skipped."""
    out: list[tuple[str, dict[str, str], float]] = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        labels: dict[str, str] = {}
        if "{" in line:
            name, rest = line.split("{", 1)
            body, _, tail = rest.rpartition("}")
            for part in _split_labels(body):
                k, _, v = part.partition("=")
                v = v.strip()
                if len(v) >= 2 and v[0] == v[-1] == '"':
                    v = v[1:-1]
                labels[k.strip()] = v.replace('\\"', '"').replace("\\\\", "\\")
        else:
            name, _, tail = line.partition(" ")
        fields = tail.split()
        if not fields:
            continue
        try:
            value = float(fields[0])
        except ValueError:
            continue
        out.append((name.strip(), labels, value))
    return out


def _split_labels(body: str) -> list[str]:
    parts, cur, quoted, escaped = [], "", False, False
    for ch in body:
        if escaped:
            cur += ch
            escaped = False
        elif ch == "\\":
            cur += ch
            escaped = True
        elif ch == '"':
            cur += ch
            quoted = not quoted
        elif ch == "," and not quoted:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    if cur.strip():
        parts.append(cur)
    return parts


@dataclass
class Counters:
    """The line's cumulative counters at one instant (summed over cameras)."""

    t: float
    frames: float = 0.0
    verdicts: dict[str, float] = field(default_factory=dict)
    failsafes: dict[str, float] = field(default_factory=dict)
    deadline_misses: float = 0.0
    e2e_buckets: dict[float, float] = field(default_factory=dict)
    """le (ms) -> cumulative count, +Inf as math.inf."""

    @classmethod
    def from_metrics(cls, text: str, t: float) -> Counters:
        c = cls(t)
        for name, labels, value in parse_metrics(text):
            if name == "edge_frames_total":
                c.frames += value
            elif name == "edge_verdicts_total":
                v = labels.get("verdict", "?")
                c.verdicts[v] = c.verdicts.get(v, 0.0) + value
            elif name == "edge_failsafe_total":
                r = labels.get("reason", "?")
                c.failsafes[r] = c.failsafes.get(r, 0.0) + value
            elif name == "edge_deadline_miss_total":
                c.deadline_misses += value
            elif name == "edge_end_to_end_latency_ms_bucket":
                le = labels.get("le", "+Inf")
                edge = math.inf if le in ("+Inf", "Inf") else float(le)
                c.e2e_buckets[edge] = c.e2e_buckets.get(edge, 0.0) + value
        return c


def quantile_from_buckets(q: float, buckets: dict[float, float]) -> float | None:
    """Prometheus' histogram_quantile: linear inside the bucket that holds the rank. None when the
    window holds no sample; the highest finite edge when the rank lies in +Inf (as Prometheus)."""
    edges = sorted(buckets)
    if not edges or buckets[edges[-1]] <= 0:
        return None
    total = buckets[edges[-1]]
    rank = q * total
    lower_edge, lower_count = 0.0, 0.0
    for e in edges:
        count = buckets[e]
        if count >= rank:
            if math.isinf(e):
                return lower_edge
            if count == lower_count:
                return e
            return lower_edge + (e - lower_edge) * (rank - lower_count) / (count - lower_count)
        lower_edge, lower_count = e, count
    return lower_edge


def window(a: Counters, b: Counters) -> dict[str, Any]:
    """What the line did between two snapshots: rates per decided part and the e2e p99."""
    verdicts = {k: b.verdicts.get(k, 0.0) - a.verdicts.get(k, 0.0) for k in b.verdicts}
    parts = sum(verdicts.values())
    failsafes = {k: b.failsafes.get(k, 0.0) - a.failsafes.get(k, 0.0) for k in b.failsafes}
    n_fs = sum(failsafes.values())
    defects = verdicts.get("DEFECT", 0.0)
    buckets = {e: b.e2e_buckets.get(e, 0.0) - a.e2e_buckets.get(e, 0.0) for e in b.e2e_buckets}
    p99 = quantile_from_buckets(0.99, buckets)
    return {
        "seconds": round(b.t - a.t, 2),
        "frames": int(b.frames - a.frames),
        "parts": int(parts),
        "defects": int(defects),
        "failsafes": int(n_fs),
        "failsafe_reasons": {k: int(v) for k, v in sorted(failsafes.items()) if v},
        "defect_rate": defects / parts if parts else None,
        "failsafe_rate": n_fs / parts if parts else None,
        "e2e_p99_ms": None if p99 is None else round(p99, 2),
        "deadline_misses": int(b.deadline_misses - a.deadline_misses),
    }


def snapshot(http: str) -> Counters:
    code, body = http_get(http, "/metrics")
    if code != 200:
        raise LineError(f"/metrics on {http} answered HTTP {code}")
    return Counters.from_metrics(body, time.monotonic())


def measure(
    http: str, window_s: float, min_parts: int, timeout_s: float, poll_s: float = 0.5
) -> dict[str, Any]:
    """A window of at least `window_s` holding at least `min_parts` decided parts.

    The window is a measurement, not a wait for something to happen: its length is what makes
    its rates comparable with the baseline's. A line that decides too few parts (idle, stopped)
    fails with the count rather than being judged on noise."""
    start = snapshot(http)
    while True:
        time.sleep(poll_s)
        now = snapshot(http)
        fig = window(start, now)
        elapsed = now.t - start.t
        if elapsed >= window_s and fig["parts"] >= min_parts:
            return fig
        if elapsed >= timeout_s:
            raise LineError(
                f"only {fig['parts']} parts decided in {elapsed:.0f} s (a gate needs "
                f"{min_parts}): is the line producing? Run during production or lower --min-parts"
            )


# ---- gates ----------------------------------------------------------------------------------


@dataclass
class GateLimits:
    """What a rollout accepts. Rates are shares of decided parts, changes are absolute."""

    max_failsafe_increase: float = 0.01
    """After - before fail-safe rate: a model that is slow or failing shows here first."""
    max_defect_rate_change: float = 0.10
    """|after - before| defect rate: a model that flips parts (either way) shows here."""
    max_p99_ratio: float = 1.5
    """End-to-end p99 after / before ..."""
    p99_slack_ms: float = 25.0
    """... or before + this much, whichever is larger: histogram buckets near 50 ms are 25 ms
    wide, so a ratio alone would flag a move of one bucket on a fast line."""
    max_deadline_misses: int = 0
    """Decisions not acknowledged by the PLC in time, in the window after the change."""
    min_shadow_agreement: float = 0.9
    """Share of shadowed parts where the candidate's OK/DEFECT equals the running model's;
    0 turns this pre-activation gate off."""
    min_shadow_failsafe_free: float = 0.99
    """Share of shadow inferences that completed (no error, no timeout)."""
    gate_alarms: list[str] = field(
        default_factory=lambda: ["MODEL_DOWN", "FAILSAFE_ACTIVE", "DRIFT"])
    """Alarms a model can raise (DRIFT: the line's images are unlike the new model's validation
    data); one of these raised after the change fails the gate."""
    gate_components: list[str] = field(default_factory=lambda: ["model", "verdicts"])
    """/healthz components a model change can take down."""

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> GateLimits:
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(d or {}) - known)
        if unknown:
            raise ValueError(f"unknown gate limits {unknown}; known: {sorted(known)}")
        values = dict(d or {})
        for k in ("gate_alarms", "gate_components"):
            if isinstance(values.get(k), str):
                values[k] = [v.strip() for v in values[k].split(",") if v.strip()]
        return cls(**values)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def gate_problems(
    before: dict[str, Any], after: dict[str, Any], limits: GateLimits
) -> list[str]:
    """Every way the window after the change is worse than the line's own baseline."""
    out: list[str] = []
    fs_b, fs_a = before.get("failsafe_rate") or 0.0, after.get("failsafe_rate") or 0.0
    if fs_a - fs_b > limits.max_failsafe_increase:
        out.append(f"fail-safe rate {fs_a:.3f} vs {fs_b:.3f} before "
                   f"(max +{limits.max_failsafe_increase})")
    dr_b, dr_a = before.get("defect_rate"), after.get("defect_rate")
    if dr_b is not None and dr_a is not None and abs(dr_a - dr_b) > limits.max_defect_rate_change:
        out.append(f"defect rate {dr_a:.3f} vs {dr_b:.3f} before "
                   f"(max change {limits.max_defect_rate_change})")
    p_b, p_a = before.get("e2e_p99_ms"), after.get("e2e_p99_ms")
    if p_b is not None and p_a is not None:
        limit = max(p_b * limits.max_p99_ratio, p_b + limits.p99_slack_ms)
        if p_a > limit:
            out.append(f"end-to-end p99 {p_a:.1f} ms vs {p_b:.1f} ms before (limit {limit:.1f} ms:"
                       f" x{limits.max_p99_ratio} or +{limits.p99_slack_ms:g} ms)")
    misses = int(after.get("deadline_misses") or 0)
    if misses > limits.max_deadline_misses:
        out.append(f"{misses} deadline misses after the change (max {limits.max_deadline_misses})")
    return out


def health_problems(
    before: dict[str, Any], after: dict[str, Any], limits: GateLimits
) -> tuple[list[str], list[str]]:
    """(problems, notes): a gated component that was up and is now down, or a gated alarm that
    was not raised before, is a problem; any other change is a note in the report. An uplink
    backlog or a camera that went down during the window is real, but rolling the model back
    would not fix it, so it does not fail the model's gate."""
    problems: list[str] = []
    notes: list[str] = []
    was_up = {n for n, up in (before.get("components") or {}).items() if up}
    lost = sorted(n for n, up in (after.get("components") or {}).items()
                  if not up and n in was_up)
    for n in lost:
        (problems if n in limits.gate_components else notes).append(f"{n} down after the change")
    new_alarms = sorted(set(after.get("alarms") or []) - set(before.get("alarms") or []))
    for a in new_alarms:
        (problems if a in limits.gate_alarms else notes).append(f"new alarm {a}")
    return problems, notes


def shadow_problems(sh: dict[str, Any] | None, limits: GateLimits, min_frames: int) -> list[str]:
    if not sh:
        return ["no shadow figures (the shadow stopped early?)"]
    out: list[str] = []
    frames = int(sh.get("frames") or 0)
    if frames < min_frames:
        out.append(f"{frames} shadow frames < {min_frames} needed")
    agreement = sh.get("agreement")
    if agreement is not None and agreement < limits.min_shadow_agreement:
        out.append(f"shadow agreement {agreement:.3f} < {limits.min_shadow_agreement}")
    ff = sh.get("failsafe_free_rate")
    if ff is not None and ff < limits.min_shadow_failsafe_free:
        out.append(f"shadow fail-safe-free rate {ff:.3f} < {limits.min_shadow_failsafe_free}")
    return out


# ---- waves ----------------------------------------------------------------------------------


def parse_waves(text: str) -> list[int | str]:
    """"1,10%,100%" -> [1, "10%", "100%"] (Ansible's `serial` list), with clear errors."""
    waves: list[int | str] = []
    for raw in text.split(","):
        item = raw.strip()
        try:
            if item.endswith("%"):
                pct = int(item[:-1])  # Ansible's serial takes whole percentages only
                if not 0 < pct <= 100:
                    raise ValueError
                waves.append(item)
            else:
                n = int(item)
                if n < 1:
                    raise ValueError
                waves.append(n)
        except ValueError:
            raise ValueError(
                f"bad wave {item!r} in --waves {text!r}: each wave is a host count (>= 1) or a "
                "percentage of the fleet (e.g. 1,10%,100%)"
            ) from None
    if not waves:
        raise ValueError("--waves is empty")
    return waves


def plan_waves(hosts: list[str], waves: list[int | str]) -> list[list[str]]:
    """The batches Ansible's `serial` makes of `hosts` (same arithmetic: a percentage of the
    whole fleet, rounded down, at least one; the last wave size repeats until all are done)."""
    left, out, i = list(hosts), [], 0
    total = len(hosts)
    while left:
        w = waves[i]
        size = int(int(w[:-1]) / 100.0 * total) if isinstance(w, str) else int(w)
        size = max(size, 1)
        out.append(left[:size])
        left = left[size:]
        i = min(i + 1, len(waves) - 1)
    return out
