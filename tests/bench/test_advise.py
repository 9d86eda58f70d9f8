"""The advise verdict: the pure rule on hand-made points, and the full path on table fixtures."""

import pytest

from sgl_ecpatch.bench import advise as advise_mod
from sgl_ecpatch.bench.advise import Point, decide
from sgl_ecpatch.bench.presets import PRESETS

from bench_fixtures import make_table, needs_runtime


def points(speedups, *, gate_mass=0.97, base=100.0):
    """Points whose expert-choice time is token-choice time / speedup."""
    return [Point(tokens=t, route_tc_us=0.0, route_ec_us=0.0, moe_tc_us=base, moe_ec_us=base / s,
                  gate_mass=gate_mass) for t, s in speedups.items()]


def test_faster_everywhere_enables_without_options():
    d = decide(points({1: 1.0, 16: 1.1, 256: 1.3}), 256)
    assert d.verdict == "enable" and d.min_tokens is None
    assert any("no slower at any batch" in r for r in d.reasons)


def test_slower_at_small_batches_gives_min_tokens():
    d = decide(points({1: 0.6, 16: 0.8, 64: 0.99, 256: 1.2, 1024: 1.4}), 1024)
    assert d.verdict == "enable-with-options" and d.min_tokens == 256
    # the worst point is T=1 at speedup 0.6 -> 1/0.6 - 1 = 66.7% slower
    assert any("--min-tokens 256" in r and "66.7% slower at 1 tokens" in r for r in d.reasons)


def test_threshold_is_where_ec_stays_no_slower():
    # faster at 4, slower again at 16: the threshold must be 64, not 4
    d = decide(points({1: 0.9, 4: 1.1, 16: 0.95, 64: 1.1, 256: 1.2}), 256)
    assert d.min_tokens == 64


def test_slower_at_n_keeps_it_off():
    d = decide(points({1: 0.5, 256: 0.9}), 256)
    assert d.verdict == "keep-off" and d.min_tokens is None
    assert any("below the online margin" in r for r in d.reasons)


def test_scenario_margin():
    pts = points({1: 1.0, 256: 1.03})
    assert decide(pts, 256, "online").verdict == "keep-off"
    assert decide(pts, 256, "offline").verdict == "enable"
    with pytest.raises(ValueError, match="scenario"):
        decide(pts, 256, "batch")


def test_low_gate_mass_keeps_it_off_even_when_faster():
    d = decide(points({1: 1.2, 256: 1.5}, gate_mass=0.8), 256)
    assert d.verdict == "keep-off"
    assert any("80.0% of the gate mass" in r for r in d.reasons)


def test_decide_needs_the_point_at_n():
    with pytest.raises(ValueError, match="token count 512"):
        decide(points({1: 1.0, 256: 1.2}), 512)


def test_enable_command_shape():
    cmd = advise_mod.enable_command(PRESETS["qwen3-next"], min_tokens=256, capacity_factor=1.5, layers="0-15",
                                    sglang_root="/site/sglang")
    assert cmd == ("ecpatch enable /site/sglang/srt/models/qwen2_moe.py --min-tokens 256 --layers 0-15 "
                   "--capacity-factor 1.5")
    assert advise_mod.enable_command(PRESETS["mixtral"], min_tokens=None, capacity_factor=1.25,
                                     sglang_root="/x/sglang") == "ecpatch enable /x/sglang/srt/models/mixtral.py"


# ------------------------------------------------------------- full path (needs the routing runtime)



@needs_runtime
def test_very_slow_expert_choice_router_keeps_it_off():
    table = make_table(ec_route_us=lambda t: 1e5)
    result = advise_mod.advise(PRESETS["qwen3-moe"], 256, ep_ranks=8, table=table, sglang_root="/s")
    assert result["verdict"] == "keep-off" and result["command"] is None
    assert result["inputs"]["ep_ranks"] == 8
    assert [p["tokens"] for p in result["points"]] == [1, 4, 16, 64, 256]


@needs_runtime
def test_equal_router_cost_with_ep_and_skew_enables_at_large_batch():
    # routing costs the same; with 8 EP ranks and a strong skew the slowest rank decides
    table = make_table(ec_route_us=lambda t: 5.0)
    result = advise_mod.advise(PRESETS["qwen3-moe"], 4096, ep_ranks=8, scenario="offline", table=table,
                               skew="zipf-0.5", sglang_root="/s")
    assert result["verdict"] in ("enable", "enable-with-options"), result["reasons"]
    at_n = result["points"][-1]
    assert at_n["rank_ratio_ec"] < at_n["rank_ratio_tc"]
    assert result["command"].startswith("ecpatch enable /s/srt/models/qwen3_moe.py")
    if result["verdict"] == "enable-with-options":
        assert f"--min-tokens {result['min_tokens']}" in result["command"]


@needs_runtime
def test_costly_router_at_small_batch_gives_min_tokens():
    # expert choice routing costs 200 us more up to 64 tokens, nothing above
    table = make_table(ec_route_us=lambda t: 205.0 if t <= 64 else 5.0)
    result = advise_mod.advise(PRESETS["qwen3-moe"], 4096, ep_ranks=8, scenario="offline", table=table,
                               skew="zipf-0.5", sglang_root="/s")
    assert result["verdict"] == "enable-with-options"
    assert result["min_tokens"] >= 256
    assert "--min-tokens" in result["command"]


@needs_runtime
def test_nearest_shape_is_said():
    table = make_table(ec_route_us=lambda t: 5.0)
    result = advise_mod.advise(PRESETS["mixtral"], 64, table=table, sglang_root="/s")
    assert any("nearest measured router shape, 128 experts / top-8" in r for r in result["reasons"])


@needs_runtime
def test_dropped_slots_are_not_counted_as_a_gain():
    # linear expert time (1 us per token, nothing fixed), equal routing cost, one rank, uniform router:
    # as routed, drop computes ~10% fewer slots and looks faster; at equal work it is not
    table = make_table(ec_route_us=lambda t: 5.0, expert_points=((1, 1.0), (16384, 16384.0)))
    result = advise_mod.advise(PRESETS["qwen3-moe"], 1024, ep_ranks=1, table=table, skew="uniform",
                               sglang_root="/s")
    at_n = result["points"][-1]
    assert at_n["slots_kept"] < 0.95
    assert at_n["moe_ec_as_routed_us"] < 0.95 * at_n["moe_tc_us"]
    assert at_n["moe_ec_us"] == pytest.approx(at_n["moe_tc_us"], rel=1e-6)  # T*k us either way
    assert result["verdict"] == "keep-off"
    assert any("quality given away" in r for r in result["reasons"])


@needs_runtime
def test_summary_rows_are_what_the_command_prints():
    """The README's advise table (threshold_rows, written by benchmarks/bench_gpu.py) gives for
    each row exactly what `ecpatch advise` computes with its defaults (session 8: the summary
    drew one sample where the command draws two, and Mixtral's --min-tokens differed)."""
    table = make_table(ec_route_us=lambda t: 205.0 if t <= 64 else 5.0)
    rows = advise_mod.threshold_rows(table, [PRESETS["mixtral"]], ep_ranks=(8,), skews=("zipf-0.5",),
                                     tokens=4096)
    result = advise_mod.advise(PRESETS["mixtral"], 4096, ep_ranks=8, scenario="offline", table=table,
                               skew="zipf-0.5", sglang_root="/s")
    assert len(rows) == 1
    assert (rows[0]["verdict"], rows[0]["min_tokens"]) == (result["verdict"], result["min_tokens"])
    assert rows[0]["speedup"] == result["points"][-1]["speedup"]
    assert rows[0]["gate_mass"] == result["points"][-1]["gate_mass"]
