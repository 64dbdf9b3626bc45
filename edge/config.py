"""The line's configuration: one YAML per line, validated as a whole before anything starts.

Every section is a pydantic model with ``extra="forbid"``: a misspelt key is an error, never a
silently ignored setting on a production line. Component sections come from the components' own
config modules (the core composes them). Relative paths are resolved against the YAML's folder, so a
config and its assets can be moved together.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from ruamel.yaml import YAML
from ruamel.yaml.error import YAMLError

from camera.config import CameraSettings
from edge.control import ControlSettings
from edge.decision import DecisionSettings
from edge.lifecycle import LifecycleSettings
from edge.pipeline import PipelineSettings
from edge.plcinputs import PlcInputSettings
from edge.recipes import RecipesSettings
from models.config import ModelSettings
from models.drift import DriftSettings
from plc.config import PlcSettings
from uplink.config import UplinkSettings

DEMO_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "demo.yaml"


class ObservabilitySettings(BaseModel):
    model_config = ConfigDict(extra="forbid")
    host: str = "127.0.0.1"
    """Bind address of /metrics and /healthz; loopback unless a scraper must reach it."""
    port: int = Field(default=9108, ge=0, le=65535)
    """0 picks a free port (tests, the bench)."""
    enabled: bool = True


class LoggingSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")
    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["auto", "json", "console"] = "auto"
    """auto: JSON under systemd or when not on a TTY, readable console output on a TTY."""


class StatusSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")
    heartbeat_ms: float = Field(default=200.0, ge=50, le=10_000)
    """Period of the heartbeat word; the PLC's watchdog should allow a few periods. Below 50 ms a
    status write cannot be honoured beside the records, so it is refused here."""
    failsafe_alarm_hold_s: float = Field(default=5.0, ge=0)
    """FAILSAFE_ACTIVE stays set this long after the last fail-safe, so the PLC can see it."""
    plc_startup_wait_s: float = Field(default=5.0, ge=0, le=300)
    """At start, wait this long for the PLC connection before the cameras start."""
    no_verdict_alarm_s: float = Field(default=5.0, gt=0, le=3600)
    """Frames arriving but no real verdict for this long: MODEL_DOWN alarm and /healthz 503."""


class LineConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    line: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
    """Line id; appears in events, S3 keys, Kafka keys and metrics."""
    cameras: list[CameraSettings] = Field(min_length=1)
    model: ModelSettings
    decision: DecisionSettings = Field(default_factory=DecisionSettings)
    pipeline: PipelineSettings = Field(default_factory=PipelineSettings)
    plc: PlcSettings
    uplink: UplinkSettings
    status: StatusSettings = Field(default_factory=StatusSettings)
    observability: ObservabilitySettings = Field(default_factory=ObservabilitySettings)
    logging: LoggingSettings = Field(default_factory=LoggingSettings)
    recipes: RecipesSettings | None = None
    """Product recipes selected by the PLC or `edge recipe set` (None: the `decision` rules)."""
    plc_inputs: PlcInputSettings = Field(default_factory=PlcInputSettings)
    control: ControlSettings = Field(default_factory=ControlSettings)
    lifecycle: LifecycleSettings = Field(default_factory=LifecycleSettings)
    """Gates of `edge model promote` and of the canary's automatic rollback."""
    drift: DriftSettings = Field(default_factory=DriftSettings)
    """Drift watch: live frame and model statistics against a baseline, per camera."""
    state_dir: Path | None = None
    """Where the daemon keeps what it must remember across restarts (selected recipe, control
    socket, model store state); None: `state` beside the spool directory."""

    def state_path(self) -> Path:
        return self.state_dir or Path(self.uplink.spool_dir).parent / "state"

    def control_socket(self) -> Path:
        return self.control.socket or self.state_path() / "control.sock"

    @field_validator("cameras")
    @classmethod
    def _unique_cameras(cls, cams: list[Any]) -> list[Any]:
        ids = [c.id for c in cams]
        dup = sorted({i for i in ids if ids.count(i) > 1})
        if dup:
            raise ValueError(f"camera ids must be unique; repeated: {dup}")
        slots = [c.plc_slot for c in cams]
        dup_slots = sorted({s for s in slots if slots.count(s) > 1})
        if dup_slots:
            raise ValueError(f"camera plc_slot values must be unique; repeated: {dup_slots}")
        return cams

    @model_validator(mode="after")
    def _roi_cameras_exist(self) -> LineConfig:
        unknown = sorted(set(self.decision.camera_roi) - {c.id for c in self.cameras})
        if unknown:
            raise ValueError(f"decision.camera_roi names unknown cameras {unknown}")
        return self


class ConfigError(Exception):
    """A config that cannot be used; ``problems`` lists every error as 'key.path: message'."""

    def __init__(self, path: Path, problems: list[str]) -> None:
        self.path = path
        self.problems = problems
        super().__init__(f"{path}: {len(problems)} problem(s)\n" + "\n".join(problems))


def _yaml() -> YAML:
    y = YAML(typ="safe", pure=True)
    return y


MAX_CONFIG_BYTES = 1 << 20
"""A line config is a few KB; a file this big is a mistake (and would block a reload)."""
MAX_NESTING = 32
"""Deeper than any real config; deeper YAML is refused before it can exhaust the stack."""


def read_yaml(path: Path) -> dict[str, Any]:
    """The YAML's top-level mapping, or ConfigError for ANY way the file can be unusable.

    Every failure is a ConfigError (never UnicodeDecodeError, RecursionError, MemoryError...), so
    `edge run` exits 2 and a SIGHUP reload is refused with the old config kept.
    """
    try:
        with path.open("rb") as fh:
            raw = fh.read(MAX_CONFIG_BYTES + 1)
    except OSError as exc:
        raise ConfigError(path, [f"cannot read the file: {exc.strerror or exc}"]) from exc
    if len(raw) > MAX_CONFIG_BYTES:
        raise ConfigError(
            path, [f"file is larger than {MAX_CONFIG_BYTES // 1024} KiB: not a line config"]
        )
    if raw.startswith((b"\xff\xfe", b"\xfe\xff")) or b"\x00" in raw:
        raise ConfigError(path, ["not a UTF-8 text file (UTF-16 or binary?): save it as UTF-8"])
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(
            path,
            [f"not valid UTF-8 (byte {exc.start}: {raw[exc.start:exc.start + 1]!r}); "
             "save the file as UTF-8"],
        ) from None
    if _too_deep(text):
        # Refused before parsing: the parser would recurse into a RecursionError, and a caught
        # RecursionError can leave CPython 3.11's recursion accounting inconsistent.
        raise ConfigError(path, [f"YAML nested deeper than {MAX_NESTING} levels"])
    try:
        data = _yaml().load(text)
    except YAMLError as exc:
        raise ConfigError(path, [f"YAML syntax: {exc}".replace("\n", " ")]) from exc
    except RecursionError:
        raise ConfigError(path, [f"YAML nested deeper than {MAX_NESTING} levels"]) from None
    except Exception as exc:  # the parser's own bugs must not take a running line down
        raise ConfigError(path, [f"YAML could not be parsed: {type(exc).__name__}: {exc}"]) from exc
    if not isinstance(data, dict):
        raise ConfigError(path, ["top level must be a mapping (line:, cameras:, model:, ...)"])
    if _depth(data) > MAX_NESTING:
        raise ConfigError(path, [f"YAML nested deeper than {MAX_NESTING} levels"])
    return data


def _too_deep(text: str) -> bool:
    """Flow nesting ([ {) deeper than MAX_NESTING, or block indentation no line config needs:
    a linear scan, no recursion (quoted text and comments are skipped)."""
    depth = 0
    for line in text.splitlines():
        indent = len(line) - len(line.lstrip(" "))
        if indent > 4 * MAX_NESTING:
            return True
        quote = ""
        for ch in line:
            if quote:
                if ch == quote:
                    quote = ""
            elif ch in "'\"":
                quote = ch
            elif ch == "#":
                break
            elif ch in "[{":
                depth += 1
                if depth > MAX_NESTING:
                    return True
            elif ch in "]}":
                depth = max(0, depth - 1)
    return False


def _depth(node: Any, level: int = 0) -> int:
    if level > MAX_NESTING:
        return level
    if isinstance(node, dict):
        return max((_depth(v, level + 1) for v in node.values()), default=level + 1)
    if isinstance(node, list):
        return max((_depth(v, level + 1) for v in node), default=level + 1)
    return level


def format_errors(exc: ValidationError, data: Any = None) -> list[str]:
    problems = []
    for err in exc.errors(include_url=False):
        loc = _key_path(err["loc"], data)
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = "unknown key (misspelt? see the config reference in README.md)"
        elif err["type"] == "missing":
            msg = "required key is missing"
        problems.append(f"{loc}: {msg}")
    return problems


def _key_path(loc: tuple[int | str, ...], data: Any) -> str:
    """'cameras[0].fps' as the user wrote it: union tags pydantic inserts in loc are skipped."""
    out = ""
    node = data
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
            node = node[part] if isinstance(node, list) and part < len(node) else None
            continue
        if isinstance(node, dict) and part not in node and node.get("type") == part:
            continue  # discriminated-union tag, not a key in the YAML
        out += f".{part}" if out else str(part)
        node = node.get(part) if isinstance(node, dict) else None
    return out or "(top level)"


def load_config(path: Path, *, deep: bool = True) -> LineConfig:
    """Parse and validate a line YAML; ConfigError lists every problem with its key path.

    Validation is strict (JSON semantics): `budget_ms: true` or `port: "502"` are type errors,
    not 1 ms and 502. ``deep`` also checks what the schema alone cannot (the model package and
    its classes, files, the PLC map for the camera count, secrets): everything `edge run` would
    otherwise only discover at start-up.
    """
    path = Path(path)
    data = read_yaml(path)
    try:
        text = json.dumps(data, default=str)
    except (TypeError, ValueError, RecursionError) as exc:
        raise ConfigError(path, [f"YAML holds values a line config cannot: {exc}"]) from None
    try:
        cfg = LineConfig.model_validate_json(text, strict=True)
    except ValidationError as exc:
        raise ConfigError(path, format_errors(exc, data)) from None
    resolve_paths(cfg, path.resolve().parent)
    if deep:
        from edge.configcheck import deep_check

        problems = deep_check(cfg)
        if problems:
            raise ConfigError(path, problems)
    return cfg


def resolve_paths(model: BaseModel, base: Path) -> None:
    """Make every relative Path in the config relative to the YAML's folder."""
    for name in type(model).model_fields:
        value = getattr(model, name)
        if isinstance(value, Path) and not value.is_absolute():
            object.__setattr__(model, name, (base / value).resolve())
        elif isinstance(value, BaseModel):
            resolve_paths(value, base)
        elif isinstance(value, list):
            for i, item in enumerate(value):
                if isinstance(item, BaseModel):
                    resolve_paths(item, base)
                elif isinstance(item, Path) and not item.is_absolute():
                    value[i] = (base / item).resolve()
        elif isinstance(value, dict):
            for item in value.values():
                if isinstance(item, BaseModel):
                    resolve_paths(item, base)
