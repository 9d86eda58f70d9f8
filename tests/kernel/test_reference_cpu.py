"""The test oracle (ref_routing.py) against a plain loop over the contract, on the CPU."""

from __future__ import annotations

import math
import random
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ref_routing import capacity, expert_choice_reference, scores_of  # noqa: E402


def loop_reference(logits, k, cf, fill, n, renormalize=True):
    """ROUTING.md read literally: Python lists, float keys, explicit tie rules."""
    T, E = logits.shape
    S = scores_of(logits, "softmax").tolist()

    def rank_key(v):  # NaN below every number
        return -math.inf if math.isnan(v) else v

    C = capacity(n, k, E, cf)
    chosen = [[False] * E for _ in range(T)]
    for e in range(E):
        order = sorted(range(n), key=lambda t: (-rank_key(S[t][e]), t))
        for t in order[:C]:
            chosen[t][e] = True
    weights, ids = [], []
    for t in range(T):
        if t >= n:
            weights.append([0.0] * k)
            ids.append([-1] * k)
            continue
        nan_rank = lambda e: (1 if math.isnan(S[t][e]) else 0, -rank_key(S[t][e]), e)  # noqa: E731
        kept = sorted((e for e in range(E) if chosen[t][e]), key=nan_rank)[:k]
        slots = list(kept)
        if fill == "topk":
            rest = sorted((e for e in range(E) if e not in kept), key=nan_rank)
            slots += rest[: k - len(slots)]
        row_w = [0.0 if math.isnan(S[t][e]) else S[t][e] for e in slots] + [0.0] * (k - len(slots))
        row_w = torch.tensor(row_w, dtype=torch.float32)
        total = torch.zeros((), dtype=torch.float32)
        for j in range(k):
            total = total + row_w[j]
        if renormalize and total > 0:
            row_w = row_w / total
        weights.append(row_w.tolist())
        ids.append(slots + [-1] * (k - len(slots)))
    return torch.tensor(weights, dtype=torch.float32), torch.tensor(ids, dtype=torch.int32)


@pytest.mark.parametrize("seed", range(12))
def test_oracle_matches_the_loop(seed):
    rnd = random.Random(seed)
    T, E = rnd.randint(1, 24), rnd.randint(1, 12)
    k = rnd.randint(1, E)
    cf = rnd.choice([0.5, 1.0, 1.25, 2.0, 1 / 3])
    fill = rnd.choice(["drop", "topk"])
    n = rnd.choice([T, T, rnd.randint(0, T)])
    g = torch.Generator().manual_seed(seed)
    if seed % 3 == 0:  # quantised: ties in rows and columns
        logits = torch.randint(0, 3, (T, E), generator=g).float()
    else:
        logits = torch.randn(T, E, generator=g)
    if seed % 4 == 1 and T > 2:
        logits[1] = float("nan")
    w, ids, _ = expert_choice_reference(logits, k, capacity_factor=cf, fill=fill, num_token_non_padded=n)
    lw, lids = loop_reference(logits, k, cf, fill, n)
    assert torch.equal(ids, lids), (ids, lids)
    assert torch.allclose(w, lw, atol=0, rtol=0)
