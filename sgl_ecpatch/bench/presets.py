"""Model presets for `ecpatch bench` and `ecpatch advise`.

Router shapes come from the public model cards (see shared/SGLANG_NOTES.md):
number of routed experts E, slots per token k, and whether the router
renormalises the kept weights (`norm_topk_prob`). `hidden` and `inter` (the
expert MLP's intermediate size) size the per-expert time model; `model_file` is
the SGLang model file whose `TopK(...)` call routes that model (Qwen3-Next reuses
`Qwen2MoeSparseMoeBlock` from qwen2_moe.py, so patching qwen2_moe.py is what
switches it).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class Preset:
    name: str
    experts: int
    top_k: int
    renormalize: bool
    hidden: int
    inter: int
    model_file: str  # relative to the sglang package root
    layers: int | None = None
    note: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


PRESETS: dict[str, Preset] = {
    p.name: p
    for p in (
        Preset("qwen2-moe", 60, 4, False, 2048, 1408, "srt/models/qwen2_moe.py", 24,
               "Qwen1.5-MoE-A2.7B; shared expert not modelled"),
        Preset("qwen3-moe", 128, 8, True, 2048, 768, "srt/models/qwen3_moe.py", 48,
               "Qwen3-30B-A3B (Qwen3-235B-A22B has the same router shape)"),
        Preset("qwen3-next", 512, 10, True, 2048, 512, "srt/models/qwen2_moe.py", 48,
               "Qwen3-Next-80B-A3B; routed by qwen2_moe.py's MoE block; shared expert not modelled"),
        Preset("mixtral", 8, 2, True, 4096, 14336, "srt/models/mixtral.py", 32,
               "Mixtral-8x7B"),
        Preset("olmoe", 64, 8, False, 2048, 1024, "srt/models/olmoe.py", 16,
               "OLMoE-1B-7B"),
    )
}

DEFAULT_PRESETS = ("qwen2-moe", "qwen3-moe", "qwen3-next", "mixtral", "olmoe")


def custom(experts: int, top_k: int, *, hidden: int = 2048, inter: int = 768) -> Preset:
    """A preset for `--experts E --top-k K`; raises ValueError for impossible shapes."""
    if experts < 1:
        raise ValueError(f"--experts must be >= 1, got {experts}")
    if not 1 <= top_k <= experts:
        raise ValueError(f"--top-k must be in [1, {experts}] (the number of experts), got {top_k}")
    return Preset(f"custom-{experts}x{top_k}", experts, top_k, True, hidden, inter,
                  "srt/models/<your_model>.py", None, "custom router shape")


def resolve(model: str | None, experts: int | None, top_k: int | None) -> Preset:
    """One preset from `--model` or `--experts/--top-k` (exactly one of the two forms)."""
    if model is not None and (experts is not None or top_k is not None):
        raise ValueError("give either --model or --experts/--top-k, not both")
    if model is not None:
        key = model.strip().lower()
        if key not in PRESETS:
            raise ValueError(f"unknown --model {model!r}; known presets: {', '.join(PRESETS)}")
        return PRESETS[key]
    if experts is None or top_k is None:
        raise ValueError("give --model PRESET, or both --experts and --top-k")
    return custom(experts, top_k)
