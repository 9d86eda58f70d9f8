"""The MoE layer benchmark's expert backends agree with a per-expert loop (CPU, tiny shapes)."""

import pytest
import torch

from sgl_ecpatch.bench import layer


def _routing(tokens, experts, k, seed):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.stack([torch.randperm(experts, generator=gen)[:k] for _ in range(tokens)]).to(torch.int32)
    weights = torch.rand(tokens, k, generator=gen)
    return weights, ids


@pytest.mark.parametrize("tokens", [1, 7, 64])
def test_grouped_mm_matches_the_loop_and_skips_vacant_slots(tokens):
    if not hasattr(torch, "_grouped_mm"):
        pytest.skip("this torch has no _grouped_mm")
    w = layer.make_weights(64, 32, 8, "cpu", seed=tokens)
    x = torch.randn(tokens, 64, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    weights, ids = _routing(tokens, 8, 3, tokens)
    ids[0, 1] = -1  # a vacant slot
    weights[0, 1] = 0.0
    try:
        got = layer.grouped_mm_experts(w)(x, weights, ids).float()
    except RuntimeError as exc:  # CPU grouped GEMM missing in this build
        pytest.skip(f"torch._grouped_mm does not run on this CPU: {exc}")
    want = layer.loop_experts(w)(x, weights, ids).float()
    assert torch.isfinite(got).all()
    assert torch.allclose(got, want, rtol=2e-2, atol=2e-2)


def test_fill_vacant_gives_a_valid_expert_with_zero_weight():
    weights = torch.tensor([[0.7, 0.3], [0.0, 0.0], [1.0, 0.0]])
    ids = torch.tensor([[3, 1], [-1, -1], [2, -1]], dtype=torch.int32)
    w2, i2 = layer._fill_vacant(weights, ids)
    assert i2.tolist() == [[3, 1], [0, 0], [2, 2]]
    assert torch.equal(w2, weights)
    assert (i2 >= 0).all()


def test_layer_benchmark_says_why_it_skips_without_cuda():
    if torch.cuda.is_available():
        pytest.skip("has CUDA")
    rows, notes = layer.bench_layer()
    assert rows == [] and "no CUDA device" in notes[0]
