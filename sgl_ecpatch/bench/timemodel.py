"""Per-expert MoE time vs tokens, and the projected time of the slowest EP rank.

`ExpertTimeModel.us(n)` is the time one expert's MLP (gate/up GEMM, SiLU-and-mul,
down GEMM, bf16) takes for `n` tokens inside a fused MoE, for the shape
(`hidden`, `inter`) it was measured at. Between measured points it interpolates
linearly in n; past the last point it extrapolates along the last segment; below
the first point it uses the first point's time (one token costs a full read of
the expert's weights). `n = 0` costs nothing: an expert with no tokens is skipped.

Other shapes are scaled by `hidden * inter`: both the weight bytes (the
memory-bound regime) and the FLOPs per token (the compute-bound regime) grow
with that product.

Measured points are made non-decreasing in n when a model is built: each time
becomes the least time measured at that n or above. More tokens never take less
time, and on a shared machine interference only ever adds time, so a point above
a later one is noise.

`DEFAULT_MODEL` is a roofline, not a measurement: H100 SXM at 70% of 3.35 TB/s
for weights and 60% of 989 TFLOP/s dense bf16, for hidden 2048 / inter 768
(Qwen3-30B-A3B), `us(n) = max(weight_bytes / bw, n * flops_per_token / peak)`.
`benchmarks/bench_gpu.py` replaces it with measured points.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .load import rank_slices

H100_BANDWIDTH = 3.35e12 * 0.70
H100_BF16 = 989e12 * 0.60
DEFAULT_POINTS = (1, 8, 32, 128, 256, 512, 1024, 2048, 4096, 16384)


def roofline_us(tokens: int, hidden: int, inter: int, *, bandwidth: float = H100_BANDWIDTH,
                flops: float = H100_BF16) -> float:
    weight_bytes = 3 * hidden * inter * 2  # gate, up, down; bf16
    flops_per_token = 2 * 3 * hidden * inter
    return max(weight_bytes / bandwidth, tokens * flops_per_token / flops) * 1e6


@dataclass
class ExpertTimeModel:
    hidden: int
    inter: int
    points: list[tuple[int, float]]  # (tokens, microseconds), tokens increasing
    source: str = "default-roofline"
    device: str | None = None
    note: str = ""
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        points = sorted((int(n), float(t)) for n, t in self.points)
        if not points or any(n < 1 or t < 0 for n, t in points):
            raise ValueError("an expert time model needs points (tokens >= 1, us >= 0)")
        least = float("inf")
        for i in range(len(points) - 1, -1, -1):  # right to left: least time at this n or above
            least = min(least, points[i][1])
            points[i] = (points[i][0], least)
        self.points = points

    def us(self, tokens: float, *, hidden: int | None = None, inter: int | None = None) -> float:
        if tokens <= 0:
            return 0.0
        pts = self.points
        if tokens <= pts[0][0]:
            t = pts[0][1]
        elif len(pts) == 1:
            t = pts[0][1] * tokens / pts[0][0]
        else:
            for (n0, t0), (n1, t1) in zip(pts, pts[1:]):
                if tokens <= n1:
                    break
            t = t0 + (t1 - t0) * (tokens - n0) / (n1 - n0)
            t = max(t, 0.0)
        scale = 1.0
        if hidden is not None and inter is not None:
            scale = (hidden * inter) / (self.hidden * self.inter)
        return t * scale

    def to_dict(self) -> dict:
        return {"hidden": self.hidden, "inter": self.inter, "points": [list(p) for p in self.points],
                "source": self.source, "device": self.device, "note": self.note}

    @classmethod
    def from_dict(cls, data: dict) -> "ExpertTimeModel":
        return cls(hidden=int(data["hidden"]), inter=int(data["inter"]),
                   points=[tuple(p) for p in data["points"]], source=data.get("source", "table"),
                   device=data.get("device"), note=data.get("note", ""))


DEFAULT_MODEL = ExpertTimeModel(
    2048, 768, [(n, roofline_us(n, 2048, 768)) for n in DEFAULT_POINTS], "default-roofline", "H100 SXM (roofline)",
    "roofline at 70% of 3.35 TB/s and 60% of 989 TFLOP/s bf16; not a measurement",
)


def slowest_rank_us(load: torch.Tensor, ranks: int, model: ExpertTimeModel, *,
                    hidden: int | None = None, inter: int | None = None) -> float:
    """Projected MoE compute time of the slowest of `ranks` EP ranks: per rank, the
    sum over its experts of `model.us(tokens of that expert)`; the max over ranks."""
    per_rank = []
    values = [float(v) for v in load.tolist()]
    for experts in rank_slices(len(values), ranks):
        per_rank.append(sum(model.us(values[e], hidden=hidden, inter=inter) for e in experts))
    return max(per_rank)
