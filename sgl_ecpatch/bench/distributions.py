"""Router logits with a documented, controllable skew.

`router_logits(T, E, skew, seed=...)` returns `[T, E]` logits built as

    logits[t, e] = scale * ( -s * log(r_e)  +  G[t, e]  +  a * u[g(t), e] )

- `G[t, e]` is i.i.d. standard Gumbel noise. By the Gumbel-max trick the plain
  top-1 choice of a token is then distributed exactly as `softmax` of the rest,
  which makes the skew below an exact, testable statement rather than a vibe.
- **Zipf-like popularity** (`s`): expert `e` has popularity rank `r_e` in
  1..E (a seeded random permutation, so popular experts are spread over the
  expert-parallel ranks rather than stacked on rank 0). With `a = 0`,
  `P(top-1 of a token = e) = r_e**-s / H(E, s)` where `H(E, s) = sum_r r**-s`;
  so the expected max/mean top-1 expert load is `E / H(E, s)`. `s = 0` is
  uniform; and top-k is sampling k experts without replacement with those
  weights (the Gumbel-top-k trick).
- **Correlated tokens** (`rho`): tokens come in `groups` contiguous runs (like
  the sequences of a prefill batch); each group g draws a latent direction
  `u[g] ~ N(0, 1)^E`, and `a = sqrt(rho / (1 - rho) * pi**2 / 6)`. Then for two
  tokens of the same group the logits of an expert have correlation exactly
  `rho` (Gumbel noise has variance pi**2/6); tokens of different groups are
  independent. Tokens of one group crowd the same experts: a batch-level skew
  that no per-expert popularity can show.
- `scale` (default 1) only sharpens or flattens the softmax scores (the gate
  mass numbers); it never changes which experts are ranked first.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch

_SKEW_PART = re.compile(r"^(uniform|zipf|corr)(?:[-:=]([0-9.eE+-]+))?(?:x(\d+))?$")


@dataclass(frozen=True)
class Skew:
    """Zipf strength `s` (>= 0), within-group logit correlation `rho` in [0, 1), and
    the number of token groups for the correlated part."""

    s: float = 0.0
    rho: float = 0.0
    groups: int = 8

    def __post_init__(self):
        if not (math.isfinite(self.s) and self.s >= 0):
            raise ValueError(f"Zipf strength s must be a finite number >= 0, got {self.s}")
        if not (0.0 <= self.rho < 1.0):
            raise ValueError(f"correlation rho must be in [0, 1), got {self.rho}")
        if self.groups < 1:
            raise ValueError(f"groups must be >= 1, got {self.groups}")

    @property
    def label(self) -> str:
        parts = []
        if self.s > 0:
            parts.append(f"zipf-{self.s:g}")
        if self.rho > 0:
            parts.append(f"corr-{self.rho:g}" + (f"x{self.groups}" if self.groups != 8 else ""))
        return "+".join(parts) or "uniform"

    @property
    def latent_scale(self) -> float:
        """`a` above: the std of the shared latent offset."""
        return math.sqrt(self.rho / (1.0 - self.rho) * math.pi**2 / 6.0)

    def top1_popularity(self, num_experts: int) -> torch.Tensor:
        """Exact P(top-1 = expert by popularity rank), rank order (only with rho = 0)."""
        ranks = torch.arange(1, num_experts + 1, dtype=torch.float64)
        weights = ranks.pow(-self.s)
        return weights / weights.sum()

    def expected_top1_max_mean(self, num_experts: int) -> float:
        """E / H(E, s): the expected max/mean top-1 expert load (only with rho = 0)."""
        return float(self.top1_popularity(num_experts)[0] * num_experts)


def parse_skew(text: str) -> Skew:
    """`uniform`, `zipf-1.0`, `corr-0.5`, `corr-0.5x4` (4 groups), `zipf-0.5+corr-0.3`."""
    s, rho, groups = 0.0, 0.0, 8
    for part in text.strip().lower().split("+"):
        match = _SKEW_PART.match(part.strip())
        if not match:
            raise ValueError(
                f"bad skew {part!r} in {text!r}: use uniform, zipf-S, corr-RHO[xGROUPS] or a '+' of them"
            )
        kind, value, count = match.groups()
        if kind == "uniform":
            if value or count:
                raise ValueError(f"bad skew {part!r}: 'uniform' takes no value")
            continue
        if value is None:
            raise ValueError(f"bad skew {part!r}: {kind} needs a value, e.g. {kind}-0.5")
        try:
            number = float(value)
        except ValueError:
            raise ValueError(f"bad skew {part!r}: {value!r} is not a number") from None
        if kind == "zipf":
            if count:
                raise ValueError(f"bad skew {part!r}: a group count goes with corr only")
            s = number
        else:
            rho = number
            if count:
                groups = int(count)
    return Skew(s=s, rho=rho, groups=groups)


DEFAULT_SKEWS = ("uniform", "zipf-0.25", "zipf-0.5", "zipf-1", "corr-0.5")


def popularity_ranks(num_experts: int, seed: int) -> torch.Tensor:
    """`r_e` (1..E): a seeded permutation, the same for every call with this seed."""
    gen = torch.Generator().manual_seed(seed * 7919 + 17)
    return torch.randperm(num_experts, generator=gen) + 1


def router_logits(
    tokens: int,
    num_experts: int,
    skew: Skew | str = Skew(),
    *,
    seed: int = 0,
    scale: float = 1.0,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
) -> torch.Tensor:
    """`[tokens, num_experts]` router logits with the skew described in this module.

    Generated in float32 on the CPU from `seed` (the same seed gives the same
    logits on every machine), then cast and moved.
    """
    if isinstance(skew, str):
        skew = parse_skew(skew)
    gen = torch.Generator().manual_seed(seed)
    uniform = torch.rand(tokens, num_experts, generator=gen, dtype=torch.float64)
    uniform = uniform.clamp_(min=1e-12, max=1.0 - 1e-12)
    logits = -torch.log(-torch.log(uniform))  # standard Gumbel
    if skew.s > 0:
        ranks = popularity_ranks(num_experts, seed).to(torch.float64)
        logits += -skew.s * torch.log(ranks)
    if skew.rho > 0 and tokens > 0:
        groups = min(skew.groups, tokens)
        latent = torch.randn(groups, num_experts, generator=gen, dtype=torch.float64)
        group_of_token = torch.arange(tokens) * groups // tokens
        logits += skew.latent_scale * latent[group_of_token]
    return (scale * logits).to(torch.float32).to(dtype=dtype, device=device)


def token_groups(tokens: int, skew: Skew) -> torch.Tensor:
    """The group index of each token (what `router_logits` used for the latent part)."""
    groups = min(skew.groups, max(tokens, 1))
    return torch.arange(tokens) * groups // max(tokens, 1)
