"""GPU checks of the fast PyTorch path: same bits as the reference, no host sync, CUDA graphs.

Run on a CUDA machine: ``pytest -m gpu tests/runtime``. Skipped without a GPU.
"""

from __future__ import annotations

import pytest
import torch

from routing_oracles import DTYPES, assert_same_routing, make_logits
from sgl_ecpatch.runtime import expert_choice_topk
from sgl_ecpatch.runtime.config import validate
from sgl_ecpatch.runtime.fast import run_torch
from sgl_ecpatch.runtime.scoring import sequential_row_sum

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

SHAPES = [(1, 60, 4), (16, 128, 8), (257, 60, 4), (1024, 128, 8), (300, 512, 10), (33, 7, 7),
          (16, 512, 10), (8, 256, 8)]  # the last two: C == 1, the column max


@pytest.mark.parametrize("dtype", sorted(DTYPES))
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("mode", ["normal", "quantised"])
@pytest.mark.parametrize("fill", ["drop", "topk"])
def test_cuda_fast_path_equals_reference(dtype, shape, mode, fill):
    T, E, k = shape
    logits = make_logits(T, E, seed=T + E + k, dtype=DTYPES[dtype], mode=mode, special_fraction=0.01, device="cuda")
    bias = torch.randn(E, device="cuda") * 0.05 if mode == "quantised" else None
    for n in (None, torch.tensor(max(T - 5, 0), device="cuda")):
        kwargs = dict(fill=fill, num_token_non_padded=n, correction_bias=bias)
        # The reference scores the CUDA tensor with the same CUDA softmax, then routes
        # on the host; IEEE float32 adds and divides give the same bits there.
        expected = expert_choice_topk(logits, k, impl="reference", **kwargs)
        actual = expert_choice_topk(logits, k, impl="torch", **kwargs)
        assert actual[0].device.type == "cuda" and actual[1].device.type == "cuda"
        assert_same_routing(expected, actual, context=f"{shape} {dtype} {mode} {fill} n={n}")
        plan = validate(logits, k, **kwargs)
        for layout in ("tokens", "experts"):
            assert_same_routing(expected, run_torch(logits, plan, column_layout=layout), context=f"{shape} {layout}")
        for stages in STAGES:
            actual = run_torch(logits, plan, column_stage=stages[0], row_stage=stages[1])
            assert_same_routing(expected, actual, context=f"{shape} stages {stages}")


STAGES = [("sort", "sort"), ("topk", "sort"), ("sort", "pairs"), ("topk", "pairs")]


@pytest.mark.parametrize("shape", [(4096, 512, 10), (16384, 60, 4), (16384, 512, 10), (5000, 128, 8)],
                         ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("mode", ["normal", "quantised"])
def test_cuda_stages_agree_at_bench_sizes(shape, mode):
    """At the large bench sizes every stage gives the int64 pipeline's bits (which the
    reference pins at the sizes above), with n on the host and on the device."""
    T, E, k = shape
    logits = make_logits(T, E, seed=T + E, dtype=torch.bfloat16, mode=mode, special_fraction=0.001, device="cuda")
    for n in (None, T - 7, torch.tensor(T - 7, device="cuda")):
        plan = validate(logits, k, num_token_non_padded=n)
        expected = run_torch(logits, plan, row_stage="topk")
        for stages in STAGES + [("auto", "auto")]:
            actual = run_torch(logits, plan, column_stage=stages[0], row_stage=stages[1])
            assert_same_routing(expected, actual, context=f"{shape} {mode} n={n} stages {stages}")


@pytest.mark.parametrize("dtype", sorted(DTYPES))
def test_cuda_softmax_with_dtype_is_softmax_of_float(dtype):
    """routing_scores runs softmax(x, dtype=float32): the bits of softmax(x.float())."""
    for T, E in [(1, 60), (4096, 128), (300, 512), (7, 1024), (2, 2000)]:
        x = make_logits(T, E, seed=T * E, dtype=DTYPES[dtype], special_fraction=0.01, device="cuda")
        a = torch.softmax(x.float(), dim=-1).view(torch.int32)
        b = torch.softmax(x, dim=-1, dtype=torch.float32).view(torch.int32)
        assert torch.equal(a, b), (T, E, dtype)


@pytest.mark.parametrize("shape", [(16, 60, 4), (1024, 128, 8)], ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("fill", ["drop", "topk"])
def test_no_host_sync_with_device_padding_count(shape, fill):
    T, E, k = shape
    logits = make_logits(T, E, seed=7, dtype=torch.bfloat16, device="cuda")
    n = torch.tensor(T - 3, device="cuda", dtype=torch.int32)
    bias = torch.randn(E, device="cuda") * 0.01
    expert_choice_topk(logits, k, impl="torch", fill=fill, num_token_non_padded=n, correction_bias=bias)  # warm up
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        expert_choice_topk(logits, k, impl="torch", fill=fill, num_token_non_padded=n, correction_bias=bias)
        expert_choice_topk(logits, k, impl="torch", fill=fill, num_token_non_padded=n)
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.parametrize("shape", [(1, 60, 4), (256, 128, 8), (64, 512, 10)], ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("fill", ["drop", "topk"])
def test_cuda_graph_capture_and_replay(shape, fill):
    """Capture once with a device n, replay with new logits and new n: reference results."""
    T, E, k = shape
    static_logits = make_logits(T, E, seed=1, dtype=torch.bfloat16, device="cuda")
    static_n = torch.tensor(T, device="cuda", dtype=torch.int64)

    def route():
        return expert_choice_topk(static_logits, k, impl="torch", fill=fill, num_token_non_padded=static_n)

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            route()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = route()

    for seed, n in [(2, T), (3, max(T // 2, 1)), (4, 0), (5, T - 1)]:
        static_logits.copy_(make_logits(T, E, seed=seed, dtype=torch.bfloat16, mode="quantised", device="cuda"))
        static_n.fill_(n)
        static_out[0].fill_(float("nan"))  # poison: replay must overwrite everything
        static_out[1].fill_(12345)
        graph.replay()
        torch.cuda.synchronize()
        expected = expert_choice_topk(static_logits, k, impl="reference", fill=fill, num_token_non_padded=n)
        assert_same_routing(expected, static_out, context=f"replay seed={seed} n={n}")


@pytest.mark.parametrize("num_slots", [3, 4, 8, 10, 64])
def test_cuda_row_sum_is_sequential(num_slots):
    """The cumsum-based CUDA row sum adds in slot order, bit for bit like a float32 loop."""
    gen = torch.Generator().manual_seed(num_slots)
    # Wide exponent range and many tiny terms: any other summation order shows.
    mantissa = torch.rand(4096, num_slots, generator=gen)
    exponent = torch.randint(-30, 2, (4096, num_slots), generator=gen).float()
    weights = (mantissa * torch.pow(2.0, exponent)).cuda()
    loop = weights[:, 0]
    for slot in range(1, num_slots):
        loop = loop + weights[:, slot]
    assert torch.equal(sequential_row_sum(weights).view(torch.int32), loop.view(torch.int32))


@pytest.mark.parametrize("fill", ["drop", "topk"])
def test_deterministic_algorithms_mode(fill):
    """Under torch.use_deterministic_algorithms the fast path takes no scatter with a
    reduction (CUDA atomics): it alerts on no scatter and gives the reference bits."""
    import warnings

    logits = make_logits(300, 60, seed=9, dtype=torch.bfloat16, mode="quantised", device="cuda")
    expected = expert_choice_topk(logits, 4, fill=fill, impl="reference")
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            actual = expert_choice_topk(logits, 4, fill=fill, impl="torch")
    finally:
        torch.use_deterministic_algorithms(previous)
    assert not [w for w in caught if "scatter" in str(w.message)], [str(w.message) for w in caught]
    assert_same_routing(expected, actual)
