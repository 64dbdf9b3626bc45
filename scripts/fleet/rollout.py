"""`scripts/fleet/rollout`: roll a model package out to the lines of an Ansible inventory.

    scripts/fleet/rollout --inventory INV --package PKG [--waves 1,10%,100%] [--soak-s S]
                          [--dry-run] [--report out.json] [gate options]

This side checks what can be checked before touching a line (the inventory parses, every host
names its line config, the package is a package), orders the hosts (group `canary` first, then
inventory order), runs rollout.yml (which does the per-line work, wave by wave) and turns the
per-line results into one report: a table printed, and JSON written with --report.

Exit: 0 every line runs the package (or the dry run found nothing wrong); 1 the rollout stopped
(a gate failed and that line was rolled back, or a line could not be reached); 2 bad input
(nothing was changed).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE / "module_utils"))

from edge_fleet import GateLimits, parse_waves, plan_waves  # noqa: E402

PLAYBOOK = HERE / "rollout.yml"


class InputError(Exception):
    """Bad inventory, package or option: reported with exit 2 before anything changes."""


def _tool(name: str) -> str:
    """An Ansible command from the same environment as this Python, else from PATH."""
    beside = Path(sys.executable).parent / name
    if beside.exists():
        return str(beside)
    found = shutil.which(name)
    if not found:
        raise InputError(f"{name} not found: install the fleet extra (pip install -e '.[fleet]')")
    return found


def _env(tmp: Path) -> dict[str, str]:
    """Ansible without side effects on the controller's home: temp dirs, no retry files."""
    return {
        **os.environ,
        "ANSIBLE_LOCAL_TEMP": str(tmp / "ansible-local"),
        "ANSIBLE_RETRY_FILES_ENABLED": "false",
        "ANSIBLE_PIPELINING": "true",  # one process per module run, no file transfer
        "ANSIBLE_HOST_KEY_CHECKING": os.environ.get("ANSIBLE_HOST_KEY_CHECKING", "true"),
        "ANSIBLE_NOCOLOR": "1" if not sys.stdout.isatty() else os.environ.get(
            "ANSIBLE_NOCOLOR", "0"),
        "ANSIBLE_DEPRECATION_WARNINGS": "false",
    }


def read_inventory(inventory: Path, limit: str | None, env: dict[str, str]) -> tuple[
        list[str], dict[str, dict[str, Any]]]:
    """Hosts in rollout order (group `canary` first) and their vars, as Ansible sees them."""
    if not inventory.exists():
        raise InputError(f"inventory {inventory} not found")
    r = subprocess.run([_tool("ansible-inventory"), "-i", str(inventory), "--list"],
                       capture_output=True, text=True, env=env, timeout=120)
    if r.returncode != 0:
        raise InputError(f"ansible-inventory cannot read {inventory}: {r.stderr.strip()}")
    inv = json.loads(r.stdout)
    hostvars: dict[str, dict[str, Any]] = inv.get("_meta", {}).get("hostvars", {})
    # canary hosts first, then inventory order; with a limit: (canary + limit) & limit
    pattern = f"canary:{limit}:&{limit}" if limit else "canary:all"
    r = subprocess.run([_tool("ansible"), "-i", str(inventory), pattern, "--list-hosts"],
                       capture_output=True, text=True, env=env, timeout=120)
    if r.returncode != 0:
        raise InputError(f"no hosts match {limit or 'all'} in {inventory}: {r.stderr.strip()}")
    hosts = [ln.strip() for ln in r.stdout.splitlines()[1:] if ln.strip()]
    if not hosts:
        raise InputError(f"no hosts in {inventory}" + (f" matching {limit}" if limit else ""))
    missing = [h for h in hosts if not hostvars.get(h, {}).get("edge_config")]
    if missing:
        raise InputError(f"hosts without edge_config (the line YAML on that host): {missing}; "
                         "e.g. `line1 edge_config=/etc/edge/line.yaml`")
    return hosts, hostvars


def read_package(pkg: Path) -> dict[str, Any]:
    """Name, version and digest of the package, verified here (digest and every file) when the
    controller has the edge package installed, so a damaged copy stops before any line is
    touched; every line verifies it again on import (and checks its trusted keys)."""
    if not (pkg / "manifest.json").is_file() or not (pkg / "package.digest").is_file():
        raise InputError(f"{pkg} is not a model package (manifest.json and package.digest "
                         "expected): build one with `edge model package`")
    try:
        from models.package import load_package
        from models.types import ModelPackageError
    except ImportError:  # a controller with ansible only: read, the lines verify
        try:
            m = json.loads((pkg / "manifest.json").read_text())
            seal = json.loads((pkg / "package.digest").read_text())
            ref, digest = f"{m['name']}:{m['version']}", str(seal["digest"])
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise InputError(f"{pkg}: unreadable manifest or digest ({exc})") from None
    else:
        try:
            loaded = load_package(pkg, check_model=False)
        except ModelPackageError as exc:
            raise InputError(f"refused: {exc}") from None
        ref, digest = loaded.ref, loaded.digest
    return {"path": str(pkg.resolve()), "ref": ref, "digest": digest}


# ---- the report -----------------------------------------------------------------------------


def action_of(r: dict[str, Any] | None) -> str:
    if r is None:
        return "not_reached"
    if r.get("dry_run"):
        return "already_active" if r.get("already_active") else "would_roll_out"
    if r.get("already_active"):
        return "already_active"
    if not r.get("failed_task"):
        return "rolled_out"
    if not (r.get("probe") or {}).get("status"):
        return "unreachable"  # failed before anything was read, so before anything changed
    restored = r.get("restored") or {}
    if restored.get("action") == "rolled_back":
        return "rolled_back"
    if restored.get("action") == "unchanged":
        return "stopped_before_activation"
    return "failed_not_restored"


def host_entry(host: str, wave: int, hostvars: dict[str, Any],
               r: dict[str, Any] | None) -> dict[str, Any]:
    r = r or {}
    probe, gate = r.get("probe") or {}, r.get("gate") or {}
    shadow = (r.get("shadow") or {}).get("shadow")
    restored = r.get("restored") or {}
    after_status = (restored.get("status") or gate.get("status")
                    or (r.get("activated") or {}).get("status") or probe.get("status") or {})
    problems = (gate.get("problems") or []) + ((r.get("shadow") or {}).get("problems") or []) \
        + ((r.get("activated") or {}).get("problems") or [])
    return {
        "host": host,
        "wave": wave,
        "config": hostvars.get("edge_config"),
        "action": action_of(r if r else None),
        "before": (probe.get("status") or {}).get("active"),
        "after": after_status.get("active") if r else None,
        "baseline": probe.get("figures"),
        "shadow": None if not shadow else {k: shadow.get(k) for k in (
            "frames", "agreement", "per_class_agreement", "latency_ms", "failsafe_free_rate")},
        "gate": gate.get("figures"),
        "health_after": gate.get("health"),
        "notes": gate.get("notes") or [],
        "problems": problems,
        "failed_task": r.get("failed_task"),
        "error": r.get("failed_msg"),
    }


def _f(v: Any, fmt: str = "{:.3f}") -> str:
    return "-" if v is None else fmt.format(v)


def table(report: dict[str, Any]) -> str:
    cols = ["wave", "host", "before", "after", "shadow agr", "fs rate b/a", "defect b/a",
            "p99 ms b/a", "misses", "action"]
    rows = []
    for h in report["hosts"]:
        b, g, sh = h["baseline"] or {}, h["gate"] or {}, h["shadow"] or {}
        rows.append([
            str(h["wave"]), h["host"], h["before"] or "-", h["after"] or "-",
            _f(sh.get("agreement")),
            f"{_f(b.get('failsafe_rate'))}/{_f(g.get('failsafe_rate'))}",
            f"{_f(b.get('defect_rate'))}/{_f(g.get('defect_rate'))}",
            f"{_f(b.get('e2e_p99_ms'), '{:.1f}')}/{_f(g.get('e2e_p99_ms'), '{:.1f}')}",
            _f(g.get("deadline_misses"), "{}"), h["action"],
        ])
    widths = [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(cols)]
    line = "  ".join(c.ljust(w) for c, w in zip(cols, widths, strict=True))
    out = [line, "  ".join("-" * w for w in widths)]
    out += ["  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)) for r in rows]
    for h in report["hosts"]:
        if h["error"] or h["problems"]:
            out.append(f"{h['host']}: {h['error'] or '; '.join(h['problems'])}")
        if h["notes"]:
            out.append(f"{h['host']} (noted, not gated): {'; '.join(h['notes'])}")
    out.append(f"result: {report['result']}" + (
        f" (stopped at {', '.join(report['stopped_at'])})" if report["stopped_at"] else ""))
    return "\n".join(out)


# ---- main -----------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    d = GateLimits()
    p = argparse.ArgumentParser(
        prog="scripts/fleet/rollout",
        description="Roll a model package out to the lines of an Ansible inventory, wave by "
                    "wave, each line shadowed, activated and gated against its own baseline.")
    p.add_argument("--inventory", "-i", type=Path, required=True,
                   help="Ansible INI inventory; each host has edge_config=LINE.yaml; hosts of "
                        "group [canary] go first")
    p.add_argument("--package", type=Path, required=True, help="model package directory")
    p.add_argument("--waves", default="1,10%,100%",
                   help="wave sizes: host counts or %% of the fleet; the last repeats "
                        "(default 1,10%%,100%%: one canary line, 10%%, the rest)")
    p.add_argument("--limit", help="Ansible host pattern: only these hosts")
    p.add_argument("--soak-s", type=float, default=60.0,
                   help="shadow soak and post-activation gate window per line (s)")
    p.add_argument("--baseline-s", type=float, default=None,
                   help="baseline window before the change (default: --soak-s)")
    p.add_argument("--min-parts", type=int, default=100,
                   help="parts a baseline/gate window must hold (else the line is not judged)")
    p.add_argument("--window-timeout-s", type=float, default=None,
                   help="give up on a window after this long (default: 3x the window + 60)")
    p.add_argument("--shadow-sample", type=float, default=0.1,
                   help="share of parts the candidate also infers in shadow")
    p.add_argument("--min-shadow-frames", type=int, default=100,
                   help="shadow results needed before activation")
    for name, help_ in (
        ("max_failsafe_increase", "fail-safe rate after minus before, allowed"),
        ("max_defect_rate_change", "|defect rate after - before| allowed"),
        ("max_p99_ratio", "e2e p99 after / before allowed ..."),
        ("p99_slack_ms", "... or before + this many ms, whichever is larger"),
        ("max_deadline_misses", "deadline misses allowed in the window after the change"),
        ("min_shadow_agreement", "shadow OK/DEFECT agreement needed to activate (0: off)"),
        ("min_shadow_failsafe_free", "share of shadow inferences that must complete"),
    ):
        default = getattr(d, name)
        p.add_argument("--" + name.replace("_", "-"), type=type(default), default=default,
                       help=f"{help_} (default {default})")
    p.add_argument("--gate-alarms", default=",".join(d.gate_alarms),
                   help="alarms that fail the gate when raised after the change (others are "
                        "noted in the report); default %(default)s")
    p.add_argument("--gate-components", default=",".join(d.gate_components),
                   help="/healthz components that fail the gate when they go down; default "
                        "%(default)s")
    p.add_argument("--dry-run", action="store_true",
                   help="show the waves and each line's current model; change nothing")
    p.add_argument("--report", type=Path, help="write the report as JSON here")
    p.add_argument("-v", "--verbose", action="count", default=0, help="more Ansible output")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        limits = GateLimits.from_dict({k: getattr(args, k) for k in GateLimits().as_dict()})
    except (TypeError, ValueError) as exc:
        print(f"rollout: {exc}", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="edge-rollout-") as td:
        tmp = Path(td)
        env = _env(tmp)
        try:
            waves_spec = parse_waves(args.waves)
            pkg = read_package(args.package)
            hosts, hostvars = read_inventory(args.inventory, args.limit, env)
        except (InputError, ValueError) as exc:
            print(f"rollout: {exc}", file=sys.stderr)
            return 2
        waves = plan_waves(hosts, waves_spec)
        print(f"rollout of {pkg['ref']} ({pkg['digest'][:12]}) to {len(hosts)} line(s) in "
              f"{len(waves)} wave(s)" + (" [dry run]" if args.dry_run else ""))
        for i, w in enumerate(waves, 1):
            print(f"  wave {i}: " + ", ".join(f"{h} ({hostvars[h]['edge_config']})" for h in w))
        baseline_s = args.baseline_s if args.baseline_s is not None else args.soak_s
        window_timeout = args.window_timeout_s or 3 * max(baseline_s, args.soak_s) + 60
        archive = tmp / f"{pkg['ref'].replace(':', '-')}.tar"
        with tarfile.open(archive, "w") as tar:  # one file to copy per line, not one per file
            tar.add(pkg["path"], arcname=archive.stem)
        results = tmp / "results"
        results.mkdir()
        extra = {
            "fleet_hosts": ",".join(hosts),
            "fleet_waves": waves_spec,
            "fleet_package": pkg["path"],
            "fleet_package_archive": str(archive),
            "fleet_package_ref": pkg["ref"],
            "fleet_package_digest": pkg["digest"],
            "fleet_report_dir": str(results),
            "fleet_limits": limits.as_dict(),
            "fleet_baseline_s": baseline_s,
            "fleet_soak_s": args.soak_s,
            "fleet_min_parts": args.min_parts,
            "fleet_window_timeout_s": window_timeout,
            "fleet_shadow_sample": args.shadow_sample,
            "fleet_min_shadow_frames": args.min_shadow_frames,
        }
        (tmp / "vars.json").write_text(json.dumps(extra))
        cmd = [_tool("ansible-playbook"), "-i", str(args.inventory), str(PLAYBOOK),
               "-e", f"@{tmp / 'vars.json'}"]
        if args.dry_run:
            cmd.append("--check")
        if args.verbose:
            cmd.append("-" + "v" * args.verbose)
        started = time.time()
        rc = subprocess.run(cmd, env=env, check=False).returncode
        per_host = {p.stem: json.loads(p.read_text()) for p in results.glob("*.json")}
    entries = [host_entry(h, i, hostvars[h], per_host.get(h))
               for i, w in enumerate(waves, 1) for h in w]
    stopped = [e["host"] for e in entries
               if e["action"] not in ("rolled_out", "already_active", "would_roll_out",
                                      "not_reached")]
    if rc != 0 and not stopped:
        stopped = [e["host"] for e in entries if e["action"] == "not_reached"][:1]
    result = ("dry_run" if args.dry_run and rc == 0 and not stopped
              else "complete" if rc == 0 and not stopped else "stopped")
    report = {
        "package": pkg,
        "inventory": str(args.inventory),
        "waves": waves,
        "limits": limits.as_dict(),
        "windows": {"baseline_s": baseline_s, "soak_s": args.soak_s,
                    "min_parts": args.min_parts, "shadow_sample": args.shadow_sample,
                    "min_shadow_frames": args.min_shadow_frames},
        "started_at": started,
        "duration_s": round(time.time() - started, 1),
        "ansible_rc": rc,
        "result": result,
        "stopped_at": stopped,
        "hosts": entries,
    }
    print()
    print(table(report))
    if args.report:
        args.report.parent.mkdir(parents=True, exist_ok=True)
        args.report.write_text(json.dumps(report, indent=1, default=str))
        print(f"report: {args.report}")
    return 0 if result in ("complete", "dry_run") else 1


if __name__ == "__main__":
    sys.exit(main())
