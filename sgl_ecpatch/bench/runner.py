"""One bench run -> one result in the measured-table format (`table.py`)."""

from __future__ import annotations

from typing import Callable, Iterable

import torch

from . import table as table_mod
from .output import CPU_NOTE
from .presets import Preset
from .routing import ALL_METHODS, bench_routing
from .study import DEFAULT_RANKS, load_study
from .timemodel import DEFAULT_MODEL

PARTS = ("routing", "load", "layer", "expert-time")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is visible to torch here")
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"--device must be auto, cpu or cuda, got {name!r}")
    return device


def run_bench(
    presets: Iterable[Preset],
    *,
    device: torch.device,
    parts: Iterable[str] = ("routing", "load"),
    tokens: Iterable[int],
    methods: Iterable[str] = ALL_METHODS,
    skews: Iterable[str],
    ranks: Iterable[int] = DEFAULT_RANKS,
    load_tokens: Iterable[int],
    capacity_factor: float = 1.25,
    seeds: int = 2,
    quick: bool = False,
    command: str = "ecpatch bench",
    layer_shapes: Iterable[str] | None = None,
    layer_tokens: Iterable[int] | None = None,
    progress: Callable[[str], None] | None = None,
) -> dict:
    parts = tuple(parts)
    unknown = [p for p in parts if p not in PARTS]
    if unknown:
        raise ValueError(f"unknown part(s) {', '.join(unknown)}; use {', '.join(PARTS)}")
    presets = list(presets)
    shapes = list(dict.fromkeys((p.experts, p.top_k) for p in presets))
    notes = []
    if device.type != "cuda":
        notes.append(CPU_NOTE)
    result = table_mod.new_table(device=device, command=command)
    model = DEFAULT_MODEL
    if "expert-time" in parts:
        from .layer import measure_expert_time

        if progress:
            progress("expert time vs tokens")
        model = measure_expert_time(device=device)
        result["expert_time"] = model.to_dict()
        if device.type != "cuda":
            notes.append("expert time measured on the CPU: CPU times, for CPU advice only")
    if "routing" in parts:
        result["routing"] = [r.to_dict() for r in bench_routing(
            shapes, tokens, device=device, methods=methods, capacity_factor=capacity_factor, quick=quick,
            progress=progress)]
    if "layer" in parts:
        if device.type == "cuda":
            from .layer import LAYER_SHAPES, LAYER_TOKENS, bench_layer

            rows, layer_notes = bench_layer(tuple(layer_shapes or LAYER_SHAPES), tuple(layer_tokens or LAYER_TOKENS),
                                            capacity_factor=capacity_factor, progress=progress, quick=quick)
            result["layer"] = rows
            notes += layer_notes
        else:
            notes.append("MoE layer benchmark skipped: it needs a CUDA device")
    if "load" in parts:
        if "expert-time" not in parts:
            notes.append("slowest-rank times use the shipped per-expert model (an H100 roofline, not a "
                         "measurement); add expert-time to --parts to measure it here")
        sizes = {(p.experts, p.top_k): (p.hidden, p.inter) for p in presets}
        result["load"] = load_study(shapes, load_tokens, skews, ranks=ranks, capacity_factor=capacity_factor,
                                    seeds=seeds, model=model, sizes=sizes, progress=progress)
    result["note"] = " | ".join(notes)
    return result
