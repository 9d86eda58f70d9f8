"""Helpers of the bench/advise tests: measured tables with hand-written numbers."""

import importlib

import pytest

from sgl_ecpatch.bench import table as table_mod
from sgl_ecpatch.bench.timemodel import ExpertTimeModel

GRID = (1, 4, 16, 64, 256, 1024, 4096, 16384)


def _runtime_ready() -> bool:
    try:
        return hasattr(importlib.import_module("sgl_ecpatch.runtime"), "expert_choice_topk")
    except ImportError:
        return False


needs_runtime = pytest.mark.skipif(not _runtime_ready(), reason="the routing runtime is not in this tree yet")


def make_table(ec_route_us, tc_route_us=lambda t: 5.0, *, shape=(128, 8), placeholder=False,
               expert_points=((1, 4.0), (256, 4.0), (16384, 256.0))) -> dict:
    """A table with routing rows for token choice (`topk`) and `ec-torch-drop`."""
    table = table_mod.new_table(device="cpu", command="fixture", placeholder=placeholder)
    table["device"] = "Fixture GPU"
    for tokens in GRID:
        for method, fn in (("topk", tc_route_us), ("ec-torch-drop", ec_route_us)):
            table["routing"].append({"experts": shape[0], "top_k": shape[1], "tokens": tokens, "method": method,
                                     "mode": "graph", "us": float(fn(tokens)), "note": None})
    table["expert_time"] = ExpertTimeModel(2048, 768, list(expert_points), "fixture").to_dict()
    return table_mod.validate(table)
