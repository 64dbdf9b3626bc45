"""The published event schema matches what PartEvent actually emits (and rejects what it must)."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import numpy as np
import pytest

from tests.uplink.helpers import make_event
from uplink.event import SCHEMA_VERSION, new_event_id

SCHEMA = json.loads((Path(__file__).parents[2] / "uplink" / "event.schema.json").read_text())
CHECKER = jsonschema.Draft202012Validator.FORMAT_CHECKER


V1_ONLY = ("recipe", "model_digest", "kind", "canary", "amends", "changes", "image_dropped")


def test_schema_is_valid_and_versioned() -> None:
    jsonschema.Draft202012Validator.check_schema(SCHEMA)
    assert SCHEMA_VERSION == 2 == max(SCHEMA["properties"]["schema_version"]["enum"])


def test_v2_fields_validate_and_v1_records_still_do() -> None:
    ev = make_event("L1", "cam0", 7, "DEFECT")
    ev.sequence = None  # no record went on the wire
    ev.recipe, ev.model_digest, ev.canary = 12, "sha256:" + "ab" * 32, True
    doc = ev.to_dict()
    assert doc["schema_version"] == 2 and doc["kind"] == "part" and doc["image_dropped"] is False
    jsonschema.validate(doc, SCHEMA, format_checker=CHECKER)
    # A v2 record must carry the v2 fields ...
    partial = {k: v for k, v in doc.items() if k != "recipe"}
    with pytest.raises(jsonschema.ValidationError, match="recipe"):
        jsonschema.validate(partial, SCHEMA, format_checker=CHECKER)
    # ... while a v1 record spooled before the upgrade (no v2 fields) is still valid as it is.
    v1 = {k: v for k, v in doc.items() if k not in V1_ONLY}
    v1.update(schema_version=1, sequence=7)
    jsonschema.validate(v1, SCHEMA, format_checker=CHECKER)


def test_amendment_must_name_what_it_amends() -> None:
    ev = make_event("L1", "cam0", 7)
    ev.kind, ev.amends, ev.changes = "amendment", new_event_id(), {"plc_outcome": "confirmed"}
    jsonschema.validate(ev.to_dict(), SCHEMA, format_checker=CHECKER)
    ev.amends = None
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(ev.to_dict(), SCHEMA, format_checker=CHECKER)


def test_defect_event_with_numpy_values_validates_and_is_about_1_5_kb() -> None:
    ev = make_event("L1", "cam0", 42, "DEFECT")
    ev.detections[0]["score"] = np.float32(0.87)
    ev.detections[0]["outline"] = np.array([[10, 12], [40, 12], [40, 48], [10, 48]] * 6)
    ev.image_ref = "L1/2026-11-28/cam0/x.jpg"
    doc = json.loads(ev.to_json())
    jsonschema.validate(doc, SCHEMA, format_checker=CHECKER)
    assert 500 < len(ev.to_json()) < 2000


def test_event_ids_are_unique_and_sort_by_time() -> None:
    ids = [new_event_id(wall_ns=t * 1_000_000) for t in range(1000, 3000)]
    assert ids == sorted(ids) and len(set(ids)) == len(ids)
    assert all(len(i) == 26 for i in ids)


@pytest.mark.parametrize(
    ("field", "value"),
    [("verdict", "MAYBE"), ("event_id", "not-a-ulid"), ("part_id", -1), ("camera", "")],
)
def test_schema_rejects_bad_fields(field: str, value: object) -> None:
    doc = make_event("L1", "cam0", 1).to_dict()
    doc[field] = value
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(doc, SCHEMA, format_checker=CHECKER)
