"""The measured-table format: validation, round trip, lookups, and the shipped table."""

import json

import pytest

from sgl_ecpatch.bench import table as table_mod
from sgl_ecpatch.bench.timemodel import ExpertTimeModel

from bench_fixtures import make_table


def test_round_trip(tmp_path):
    table = make_table(lambda t: 10.0 + t)
    path = table_mod.save(table, tmp_path / "t.json")
    assert table_mod.load(path) == json.loads(json.dumps(table))


@pytest.mark.parametrize("breakage,message", [
    (lambda t: t.pop("device"), "missing keys device"),
    (lambda t: t.update(format="other"), "format is 'other'"),
    (lambda t: t.update(version=99), "version 99"),
    (lambda t: t.update(routing={}), "'routing' must be a list"),
    (lambda t: t["routing"][0].pop("us"), "lacks 'us'"),
    (lambda t: t.update(expert_time={"hidden": 1, "inter": 1, "points": []}), "bad expert_time"),
])
def test_validate_names_the_problem(breakage, message):
    table = make_table(lambda t: 1.0)
    breakage(table)
    with pytest.raises(table_mod.TableError, match=message):
        table_mod.validate(table, "x.json")


def test_load_errors(tmp_path):
    with pytest.raises(table_mod.TableError, match="cannot read"):
        table_mod.load(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(table_mod.TableError, match="not JSON"):
        table_mod.load(bad)


def test_routing_lookup_interpolates_log_log_and_picks_the_nearest_shape():
    table = make_table(lambda t: float(t))  # us == tokens: a straight line in log-log
    us, shape = table_mod.routing_us(table, "ec-torch-drop", 128, 8, 32)
    assert shape == (128, 8) and us == pytest.approx(32.0)
    assert table_mod.routing_us(table, "ec-torch-drop", 128, 8, 32768)[0] == pytest.approx(32768.0)
    assert table_mod.routing_us(table, "ec-torch-drop", 512, 10, 16)[1] == (128, 8)  # only shape there
    assert table_mod.routing_us(table, "sglang", 128, 8, 16) is None


def test_shipped_table_is_valid_and_says_what_it_is():
    table = table_mod.load()
    assert table["device"] and table["date"] and table["command"]
    if table["placeholder"]:
        assert table["device_kind"] != "cuda" or "placeholder" in table["note"].lower()
    model = ExpertTimeModel.from_dict(table["expert_time"])
    assert model.us(1) > 0
    assert {"topk", "ec-torch-drop"} <= {r["method"] for r in table["routing"] if r["us"] is not None}
