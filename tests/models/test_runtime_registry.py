"""The runtime registry: one settings class per runtime, selected by `runtime:`, validated and
dispatched from one table; old flat ONNX Runtime keys keep loading."""

from __future__ import annotations

import typing
from pathlib import Path

import onnxruntime as ort
import pytest
from pydantic import ValidationError
from ruamel.yaml import YAML

from models.config import ModelSettings
from models.loader import load_detector
from models.onnx_runtime import OnnxDetector
from models.runtimes import RUNTIMES, OnnxRuntimeSettings, RuntimeName, TensorRTSettings

REPO = Path(__file__).resolve().parents[2]


def test_registry_names_fields_and_type_agree() -> None:
    """Adding a runtime means a registry entry, a section field and a RuntimeName literal."""
    assert set(RUNTIMES) == set(typing.get_args(RuntimeName))
    fields = ModelSettings.model_fields
    for name, spec in RUNTIMES.items():
        assert name in fields, f"ModelSettings has no section field for runtime {name}"
        assert fields[name].annotation is spec.settings
    assert RUNTIMES["tensorrt"].settings is TensorRTSettings


def test_legacy_flat_keys_move_into_the_onnxruntime_section(demo_package: Path) -> None:
    s = ModelSettings.model_validate(
        {"package": str(demo_package), "intra_op_threads": 1, "spin_wait": True}
    )
    assert s.onnxruntime.intra_op_threads == 1 and s.onnxruntime.spin_wait
    assert s.intra_op_threads == 1 and s.spin_wait  # read-only views for old callers
    assert s.runtime_settings is s.onnxruntime
    nested = ModelSettings.model_validate(
        {"package": str(demo_package), "onnxruntime": {"intra_op_threads": 1, "spin_wait": True}}
    )
    assert nested == s


@pytest.mark.parametrize(
    ("doc", "message"),
    [
        ({"intra_op_threads": 1, "onnxruntime": {"intra_op_threads": 2}}, "given both"),
        ({"runtime": "tensorrt", "intra_op_threads": 2}, "runtime is 'tensorrt'"),
        ({"runtime": "onnxruntime", "tensorrt": {"precision": "int8"}}, "model.tensorrt is set"),
        ({"runtime": "tensorrt", "onnxruntime": {"intra_op_threads": 2}}, "model.onnxruntime"),
        ({"onnxruntime": {"thredas": 2}}, "thredas"),
        ({"onnxruntime": {"graph_optimization": "max"}}, "graph_optimization"),
        ({"onnxruntime": {"intra_op_threads": 2, "thread_affinity": "1;2"}}, "thread_affinity"),
        ({"runtime": "tflite"}, "runtime"),
    ],
    ids=[
        "both",
        "flat-on-trt",
        "trt-section-on-ort",
        "ort-section-on-trt",
        "typo",
        "bad-level",
        "affinity-count",
        "unknown-runtime",
    ],
)
def test_wrong_runtime_sections_are_refused_by_name(
    demo_package: Path, doc: dict[str, object], message: str
) -> None:
    with pytest.raises(ValidationError, match=message):
        ModelSettings.model_validate({"package": str(demo_package), **doc})


def test_tensorrt_section_is_its_own_class(demo_package: Path) -> None:
    s = ModelSettings.model_validate(
        {"package": str(demo_package), "runtime": "tensorrt", "tensorrt": {"precision": "int8"}}
    )
    assert isinstance(s.runtime_settings, TensorRTSettings)
    assert s.runtime_settings.precision == "int8"


@pytest.mark.parametrize("name", ["demo.yaml", "dev-local.yaml", "line.example.yaml"])
def test_shipped_configs_model_sections_validate(name: str) -> None:
    doc = YAML(typ="safe", pure=True).load((REPO / "configs" / name).read_text())
    s = ModelSettings.model_validate(doc["model"])
    assert s.runtime == "onnxruntime" and s.onnxruntime.intra_op_threads >= 1


def test_the_registry_dispatches_and_the_options_reach_the_session(demo_package: Path) -> None:
    s = ModelSettings(
        package=demo_package,
        warmup_runs=0,
        onnxruntime=OnnxRuntimeSettings(
            intra_op_threads=2,
            graph_optimization="basic",
            mem_pattern=False,
            cpu_mem_arena=False,
            thread_affinity="2",
        ),
    )
    d = load_detector(s)
    assert isinstance(d, OnnxDetector)
    opts = d.session.get_session_options()
    assert opts.graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    assert not opts.enable_mem_pattern and not opts.enable_cpu_mem_arena
    assert opts.intra_op_num_threads == 2
    assert opts.get_session_config_entry("session.intra_op_thread_affinities") == "2"
    assert d.info.digest and len(d.info.digest) == 64
    d.close()
