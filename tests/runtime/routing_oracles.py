"""Helpers for the routing tests: random inputs, bitwise comparison, and plain top-k.

Imported by the test modules of this folder (pytest puts the folder on sys.path).
"""

from __future__ import annotations

import math

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def make_logits(
    num_tokens: int,
    num_experts: int,
    *,
    seed: int,
    dtype: torch.dtype = torch.float32,
    mode: str = "normal",
    special_fraction: float = 0.0,
    device="cpu",
) -> torch.Tensor:
    """Random logits [T, E].

    mode "normal": N(0, 2); "quantised": a handful of levels so that ties are common
    within rows and within columns; "constant": every entry equal (all ties).
    special_fraction: share of entries replaced by NaN, +inf or -inf.
    """
    gen = torch.Generator().manual_seed(seed)
    if mode == "normal":
        x = torch.randn(num_tokens, num_experts, generator=gen) * 2
    elif mode == "quantised":
        x = torch.randint(-2, 3, (num_tokens, num_experts), generator=gen).float() * 0.5
    elif mode == "constant":
        x = torch.zeros(num_tokens, num_experts)
    else:
        raise ValueError(mode)
    if special_fraction > 0 and x.numel():
        pick = torch.rand(x.shape, generator=gen) < special_fraction
        which = torch.randint(0, 3, x.shape, generator=gen)
        specials = torch.tensor([math.nan, math.inf, -math.inf])[which]
        x = torch.where(pick, specials, x)
    return x.to(dtype).to(device)


def assert_same_routing(expected, actual, context="") -> None:
    """Same ids and bitwise-identical float32 weights."""
    (w_ref, id_ref), (w, ids) = expected, actual
    assert w.dtype == torch.float32 and ids.dtype == torch.int32, (w.dtype, ids.dtype)
    assert w.shape == w_ref.shape and ids.shape == id_ref.shape, (w.shape, w_ref.shape)
    if not torch.equal(ids.cpu(), id_ref.cpu()):
        diff = (ids.cpu() != id_ref.cpu()).any(dim=1).nonzero().flatten()[:5].tolist()
        raise AssertionError(f"ids differ in rows {diff} {context}\nref={id_ref[diff]}\ngot={ids[diff]}")
    bits_ref = w_ref.cpu().contiguous().view(torch.int32)
    bits = w.cpu().contiguous().view(torch.int32)
    if not torch.equal(bits, bits_ref):
        diff = (bits != bits_ref).any(dim=1).nonzero().flatten()[:5].tolist()
        raise AssertionError(f"weights differ in rows {diff} {context}\nref={w_ref[diff]}\ngot={w[diff]}")


def rank_of(value: float):
    """Python sort key of a ranking-key value: NaN lowest."""
    return (0, 0.0) if math.isnan(value) else (1, value)


def plain_topk_ids(key: torch.Tensor, top_k: int):
    """Token choice on a float key [T, E]: per row the k best experts, ties to the lower index."""
    rows = key.tolist()
    return [
        sorted(range(len(row)), key=lambda e: (rank_of(row[e]), -e), reverse=True)[:top_k]
        for row in rows
    ]
