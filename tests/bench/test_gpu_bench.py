"""GPU checks of the benchmark machinery (skipped without CUDA; the lead runs them on the GPU machine)."""

import pytest
import torch

from sgl_ecpatch.bench import layer, timing
from sgl_ecpatch.bench.routing import bench_routing

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def test_grouped_mm_layer_matches_the_loop_and_is_graph_capturable():
    w = layer.make_weights(256, 128, 16, "cuda")
    fn = layer.grouped_mm_experts(w)
    x = torch.randn(37, 256, device="cuda", dtype=torch.bfloat16)
    ids = torch.stack([torch.randperm(16, device="cuda")[:4] for _ in range(37)]).to(torch.int32)
    weights = torch.rand(37, 4, device="cuda")
    ids[3, 2], weights[3, 2] = -1, 0.0
    want = layer.loop_experts(w)(x, weights, ids).float()
    assert torch.allclose(fn(x, weights, ids).float(), want, rtol=3e-2, atol=3e-2)
    us = timing.time_fn(lambda xi: fn(xi, weights, ids), [x], device="cuda", mode="graph", quick=True)
    assert us > 0


def test_routing_bench_times_plain_and_fast_path_in_graphs():
    rows = bench_routing([(128, 8)], [1, 256], device="cuda", methods=("topk", "ec-torch-drop"), quick=True)
    timed = {(r.method, r.tokens, r.mode): r.us for r in rows}
    assert all(us is not None and us > 0 for us in timed.values()), [r for r in rows if r.us is None]
    assert {m for _, _, m in timed} == {"eager", "graph"}


def test_layer_bench_and_expert_time_run():
    rows, notes = layer.bench_layer(("qwen3-30b-a3b",), (1, 64), quick=True)
    assert any("experts run with" in n for n in notes)
    assert all(r["us"] is not None for r in rows), [r for r in rows if r["us"] is None]
    model = layer.measure_expert_time(points=(1, 64, 512), experts=8)
    assert model.source == "measured" and model.us(1) > 0 and model.us(512) >= model.us(1)
