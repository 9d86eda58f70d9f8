"""A direct, slow transcription of ROUTING.md used as a second oracle for the kernel.

The project's own reference (`sgl_ecpatch.runtime.expert_choice_topk(impl="reference")`)
is the first oracle when it is importable; this one exists so the kernel tests run on
their own too, and so two independent readings of the contract check each other.
Scores come from torch.softmax / torch.sigmoid on the input's device (the same
float32 numbers the PyTorch paths use); the selection runs on exact integer keys.
"""

from __future__ import annotations

from fractions import Fraction

import torch


def order_key(x: torch.Tensor) -> torch.Tensor:
    """float32 -> int64 key with the same order; -0 == +0; NaN below every number."""
    x = torch.where(x == 0, torch.zeros_like(x), x)  # -0 -> +0
    bits = x.view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    neg = bits >= 0x80000000
    key = torch.where(neg, 0xFFFFFFFF - bits, bits | 0x80000000)
    return torch.where(torch.isnan(x), torch.zeros_like(key), key)


def capacity(n: int, k: int, E: int, cf: float) -> int:
    if n == 0:
        return 0
    f = Fraction(cf).limit_denominator(1000)
    num = n * k * f.numerator
    den = E * f.denominator
    return min(n, -(-num // den))


def scores_of(logits: torch.Tensor, scoring: str) -> torch.Tensor:
    x = logits.float()
    return torch.softmax(x, dim=-1) if scoring == "softmax" else torch.sigmoid(x)


def expert_choice_reference(logits, top_k, *, capacity_factor=1.25, renormalize=True,
                            scoring_func="softmax", correction_bias=None,
                            num_token_non_padded=None, fill="drop", scores=None):
    """(weights [T, k] float32, ids [T, k] int32, chosen [T, E] bool) on logits.device."""
    T, E = logits.shape
    dev = logits.device
    if num_token_non_padded is None:
        n = T
    else:
        n = int(num_token_non_padded.item() if isinstance(num_token_non_padded, torch.Tensor)
                else num_token_non_padded)
        n = max(0, min(T, n))
    S = scores if scores is not None else scores_of(logits, scoring_func)
    key_f = S + correction_bias.float() if correction_bias is not None else S
    key = order_key(key_f)  # [T, E] int64 in [0, 2^32)
    C = capacity(n, top_k, E, capacity_factor)
    t_idx = torch.arange(T, device=dev, dtype=torch.int64)
    chosen = torch.zeros(T, E, dtype=torch.bool, device=dev)
    if C > 0:
        # column order: larger key first, then lower token index
        col = key * (T + 1) + (T - t_idx)[:, None]
        col[n:] = -1
        top = torch.topk(col, C, dim=0).indices  # [C, E]
        chosen.scatter_(0, top, True)
    e_idx = torch.arange(E, device=dev, dtype=torch.int64)
    row = (chosen.to(torch.int64) << 43) | (key << 11) | (1024 - e_idx)[None, :]
    order = torch.sort(row, dim=1, descending=True).indices[:, :top_k]  # [T, k]
    picked_chosen = torch.gather(chosen, 1, order)
    valid = picked_chosen if fill == "drop" else torch.ones_like(picked_chosen)
    w = torch.gather(S, 1, order)
    w = torch.where(torch.isnan(w), torch.zeros_like(w), w)
    w = torch.where(valid, w, torch.zeros_like(w))
    ids = torch.where(valid, order, torch.full_like(order, -1)).to(torch.int32)
    if renormalize:
        total = torch.zeros(T, dtype=torch.float32, device=dev)
        for j in range(top_k):  # slot order, float32, as every path does
            total = total + w[:, j]
        safe = torch.where(total > 0, total, torch.ones_like(total))
        w = torch.where((total > 0)[:, None], w / safe[:, None], w)
    w = w.clone()
    ids = ids.clone()
    w[n:] = 0
    ids[n:] = -1
    chosen[n:] = False
    return w.float(), ids, chosen
