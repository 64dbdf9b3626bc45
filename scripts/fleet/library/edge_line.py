#!/usr/bin/python
"""Ansible module: one step of a model rollout on one line (see scripts/fleet/README.md).

Runs ON the line PC (ansible_connection=local in the checks) and talks only to that line's own
daemon: its control socket and its /healthz and /metrics on the box's own address.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tarfile
import tempfile
import time
from typing import Any

from ansible.module_utils.basic import AnsibleModule
from ansible.module_utils.edge_fleet import (
    GateLimits,
    LineError,
    control_call,
    gate_problems,
    health,
    health_problems,
    line_endpoints,
    measure,
    shadow_problems,
)

DOCUMENTATION = r"""
module: edge_line
short_description: One step of a model rollout on an edge-inspect line
description:
  - C(before) reads the running model and health and measures the line's baseline window.
  - C(import) unpacks the staged package archive, verifies and copies it into the line's model
    store (C(edge model import)) and removes the archive.
  - C(shadow) soaks the candidate on a sample of live parts and judges its agreement.
  - C(activate) switches the line to it; C(gate) measures a window after the switch and compares
    it with the line's own baseline; C(restore) stops a shadow and rolls the line back.
options:
  step:
    description: The step to run.
    type: str
    required: true
    choices: [before, import, shadow, activate, gate, restore]
  config:
    description: The line YAML (host var edge_config).
    type: path
    required: true
  edge_bin:
    description: The edge CLI on the line (import only).
    type: str
    default: edge
  control_socket:
    description: Override the control socket path read from the config.
    type: str
  http:
    description: Override host:port of /healthz and /metrics.
    type: str
  package:
    description: The staged package archive, a tar (import).
    type: path
  ref:
    description: NAME:VERSION of the candidate.
    type: str
  digest:
    description: The candidate's package digest (checked after activation).
    type: str
  window_s:
    description: Length of a measurement window or of the shadow soak, seconds.
    type: float
    default: 60
  min_parts:
    description: Decided parts a window must hold.
    type: int
    default: 100
  timeout_s:
    description: Give up on a window (or the soak) after this long.
    type: float
    default: 300
  sample:
    description: Share of parts the shadow infers.
    type: float
    default: 0.1
  min_frames:
    description: Shadow results needed.
    type: int
    default: 100
  baseline:
    description: The before step's window figures (gate).
    type: dict
  before_health:
    description: The before step's health (gate).
    type: dict
  limits:
    description: GateLimits fields (module_utils/edge_fleet.py).
    type: dict
  expect_active:
    description: NAME:VERSION the line ran before (restore).
    type: str
"""

def _status(sock: str) -> dict[str, Any]:
    st = control_call(sock, "model.status", timeout_s=30)
    return dict(st) if isinstance(st, dict) else {}


def _brief(st: dict[str, Any]) -> dict[str, Any]:
    return {k: st.get(k) for k in ("active", "active_digest", "previous", "last_event")} | {
        "shadow": (st.get("shadow") or {}).get("model"),
        "canary": (st.get("canary") or {}).get("model"),
    }


def import_archive(m: AnsibleModule, archive: str, edge_bin: str, config: str) -> str:
    """Unpack the staged package archive, `edge model import` it (digest, files, signature when
    the line has trusted keys), and remove both: the store keeps the only copy."""
    work = tempfile.mkdtemp(prefix="edge-package-")
    try:
        with tarfile.open(archive) as tar:
            members = [t for t in tar.getmembers() if t.isfile() or t.isdir()]
            for t in members:
                if t.name.startswith("/") or ".." in t.name.split("/"):
                    raise LineError(f"{archive}: unsafe path {t.name!r} in the package archive")
            if hasattr(tarfile, "data_filter"):  # 3.11.4+: refuse links out, odd modes
                tar.extractall(work, members=members, filter="data")
            else:
                tar.extractall(work, members=members)
        roots = [os.path.join(work, d) for d in os.listdir(work)]
        pkg = roots[0] if len(roots) == 1 and os.path.isdir(roots[0]) else work
        rc, out, err = m.run_command([edge_bin, "model", "import", pkg, "--config", config])
        if rc != 0:
            raise LineError(f"edge model import refused the package: {(err or out).strip()}")
        return (out or err).strip().splitlines()[-1] if (out or err).strip() else ""
    finally:
        shutil.rmtree(work, ignore_errors=True)
        with contextlib.suppress(OSError):
            os.unlink(archive)


def run(m: AnsibleModule) -> dict[str, Any]:
    p = m.params
    step = p["step"]
    ep = line_endpoints(p["config"], p["control_socket"], p["http"])
    limits = GateLimits.from_dict(p["limits"])
    res: dict[str, Any] = {"changed": False, "step": step, "endpoints": vars(ep)}

    if step == "before":
        st = _status(ep.control_socket)
        already = bool(p["digest"]) and st.get("active_digest") == p["digest"]
        res.update(status=_brief(st), health=health(ep.http), already_active=already)
        if not already and not m.check_mode:
            res["figures"] = measure(ep.http, p["window_s"], p["min_parts"], p["timeout_s"])
        return res

    if step == "import":
        res["changed"] = True
        if m.check_mode:
            return res
        res["imported"] = import_archive(m, p["package"], p["edge_bin"], p["config"])
        return res

    if step == "shadow":
        res["changed"] = True
        if m.check_mode:
            return res
        control_call(ep.control_socket, "model.shadow",
                     {"package": p["ref"], "sample": p["sample"]})
        started = time.monotonic()
        sh: dict[str, Any] | None = None
        try:
            while True:
                time.sleep(1.0)
                sh = _status(ep.control_socket).get("shadow")
                elapsed = time.monotonic() - started
                frames = int((sh or {}).get("frames") or 0)
                if sh is None or (elapsed >= p["window_s"] and frames >= p["min_frames"]):
                    break
                if elapsed >= p["timeout_s"]:
                    break
        finally:
            control_call(ep.control_socket, "model.shadow", {"stop": True})
        res["shadow"] = sh
        res["problems"] = shadow_problems(sh, limits, p["min_frames"])
        return res

    if step == "activate":
        res["changed"] = True
        if m.check_mode:
            return res
        st = control_call(ep.control_socket, "model.activate",
                          {"package": p["ref"], "canary": None})
        res["status"] = _brief(st)
        if st.get("active") != p["ref"] or (p["digest"] and st.get("active_digest") != p["digest"]):
            res["problems"] = [f"after activation the line runs {st.get('active')} (digest "
                               f"{st.get('active_digest')}), not {p['ref']} ({p['digest']})"]
        return res

    if step == "gate":
        if m.check_mode:
            res.update(skipped=True)
            return res
        after = measure(ep.http, p["window_s"], p["min_parts"], p["timeout_s"])
        h = health(ep.http)
        st = _status(ep.control_socket)
        problems = gate_problems(p["baseline"] or {}, after, limits)
        health_bad, notes = health_problems(p["before_health"] or {}, h, limits)
        problems += health_bad
        if st.get("active") != p["ref"]:
            problems.append(f"the line runs {st.get('active')}, not {p['ref']} (an automatic "
                            f"rollback? last event: {st.get('last_event')})")
        res.update(figures=after, health=h, status=_brief(st), problems=problems, notes=notes)
        return res

    if step == "restore":
        st = _status(ep.control_socket)
        if m.check_mode:
            res["status"] = _brief(st)
            return res
        if st.get("shadow") and st["shadow"].get("model") == p["ref"]:
            control_call(ep.control_socket, "model.shadow", {"stop": True})
            res["changed"] = True
        if st.get("active") == p["expect_active"] and not st.get("canary"):
            res.update(action="unchanged", status=_brief(_status(ep.control_socket)))
            return res
        st = control_call(ep.control_socket, "model.rollback")
        if st.get("active") != p["expect_active"] and p["expect_active"]:
            # rollback goes to `previous`; if something else ran in between, go by name
            st = control_call(ep.control_socket, "model.activate",
                              {"package": p["expect_active"], "canary": None})
        res.update(changed=True, status=_brief(st))
        if st.get("active") != p["expect_active"]:
            res["problems"] = [f"rollback left the line on {st.get('active')}, "
                               f"not {p['expect_active']}"]
            res["action"] = "rollback_failed"
        else:
            res["action"] = "rolled_back"
        return res

    raise LineError(f"unknown step {step}")


def main() -> None:
    m = AnsibleModule(
        argument_spec={
            "step": {"type": "str", "required": True, "choices": [
                "before", "import", "shadow", "activate", "gate", "restore"]},
            "config": {"type": "path", "required": True},
            "edge_bin": {"type": "str", "default": "edge"},
            "control_socket": {"type": "str"},
            "http": {"type": "str"},
            "package": {"type": "path"},
            "ref": {"type": "str"},
            "digest": {"type": "str"},
            "window_s": {"type": "float", "default": 60.0},
            "min_parts": {"type": "int", "default": 100},
            "timeout_s": {"type": "float", "default": 300.0},
            "sample": {"type": "float", "default": 0.1},
            "min_frames": {"type": "int", "default": 100},
            "baseline": {"type": "dict"},
            "before_health": {"type": "dict"},
            "limits": {"type": "dict"},
            "expect_active": {"type": "str"},
        },
        supports_check_mode=True,
    )
    try:
        res = run(m)
    except (LineError, ValueError, OSError) as exc:
        m.fail_json(msg=str(exc), step=m.params["step"])
        return
    if res.get("problems"):
        m.fail_json(msg=f"{res['step']} refused: " + "; ".join(res["problems"]), **{
            k: v for k, v in res.items() if k != "changed"}, changed=res["changed"])
    m.exit_json(**res)


if __name__ == "__main__":
    main()
