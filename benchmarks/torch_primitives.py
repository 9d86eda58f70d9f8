#!/usr/bin/env python
"""Count first for the PyTorch path: what each candidate torch op costs at the bench sizes.

    python benchmarks/torch_primitives.py [--quick] [--profile]

For each (E, k, T) of the routing benchmark it times, as CUDA-graph replays over rotating
inputs (median µs per op), the building blocks a routing path can be made of: top-k down
the experts' token columns (float32 / int32 / int64 keys, C = ceil(T k 1.25 / E)), top-k
along the rows (k), stable sorts of columns and rows, a cumsum down the columns, a plain
elementwise op over [T, E], softmax, a 1-D sort of the E*C chosen pairs. With
``--profile`` it also prints the per-kernel CUDA time of the seed baseline and the fast
path (torch.profiler, eager). The numbers decide the design, so they live in NOTES.md.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.routing_torch import CONFIGS, TOKENS, time_cuda_graph  # noqa: E402


def _ops(T: int, E: int, k: int, device):
    C = min(T, math.ceil(T * k * 1.25 / E))
    g = torch.Generator(device=device).manual_seed(T * 1000 + E)
    logits = torch.randn(T, E, device=device, generator=g).to(torch.bfloat16)
    scores = torch.softmax(logits.float(), dim=-1)
    s_et = scores.t().contiguous()
    i_et, l_et = s_et.view(torch.int32), s_et.view(torch.int32).to(torch.int64)
    i_te, l_te = scores.view(torch.int32), scores.view(torch.int32).to(torch.int64)
    mask_et = s_et > s_et.mean()
    pairs = torch.randint(0, 2**50, (E * C,), device=device, generator=g)
    thr = s_et.narrow(1, 0, 1)
    ops = {
        "softmax bf16->f32": lambda x: torch.softmax(x, dim=-1, dtype=torch.float32),
        "where [T,E]": lambda x: torch.where(scores > 0.5, scores, -1.0),
        "transpose copy f32": lambda x: scores.t().contiguous(),
        f"topk cols f32 C={C}": lambda x: torch.topk(s_et, C, dim=1, sorted=False),
        "topk cols f32 sorted": lambda x: torch.topk(s_et, C, dim=1, sorted=True),
        "topk cols i32": lambda x: torch.topk(i_et, C, dim=1, sorted=False),
        "topk cols i64": lambda x: torch.topk(l_et, C, dim=1, sorted=False),
        "topk dim0 [T,E] i64": lambda x: torch.topk(l_te, C, dim=0, sorted=False),
        f"topk rows f32 k={k}": lambda x: torch.topk(scores, k, dim=1),
        "topk rows i32": lambda x: torch.topk(i_te, k, dim=1),
        "topk rows i64": lambda x: torch.topk(l_te, k, dim=1),
        "sort cols i32 stable": lambda x: torch.sort(i_et, dim=1, descending=True, stable=True),
        "sort rows i32 stable": lambda x: torch.sort(i_te, dim=1, descending=True, stable=True),
        "sort rows i64 stable": lambda x: torch.sort(l_te, dim=1, descending=True, stable=True),
        "cumsum cols bool->i32": lambda x: torch.cumsum(mask_et, dim=1, dtype=torch.int32),
        "eq+cumsum fixup (3 ops)": lambda x: torch.cumsum(s_et == thr, dim=1, dtype=torch.int32) <= 3,
        f"sort 1-D i64 E*C={E * C}": lambda x: torch.sort(pairs),
        "nonzero_static": lambda x: torch.nonzero_static(mask_et, size=E * C),
    }
    return logits, ops


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--profile", action="store_true", help="also the per-kernel profile of seed and fast")
    parser.add_argument("--profile-only", action="store_true", help="only the per-kernel profile")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to time")
        return 0
    device = torch.device("cuda")
    print(f"device: {torch.cuda.get_device_name()}; torch {torch.__version__}")
    if args.profile_only:
        _profile(device)
        return 0
    replays = 5 if args.quick else 15
    header = None
    rows = []
    for E, k in CONFIGS:
        for T in TOKENS:
            logits, ops = _ops(T, E, k, device)
            times = {}
            for name, fn in ops.items():
                try:
                    times[name] = time_cuda_graph(lambda x, _k, fn=fn: fn(x), [logits] * 4, k, replays)
                except Exception as exc:  # an op that cannot be captured: say so
                    times[name] = float("nan")
                    print(f"  E={E} T={T} {name}: {type(exc).__name__}: {str(exc).splitlines()[0][:120]}")
            names = [n.split(" C=")[0].split(" k=")[0].split(" E*C=")[0] for n in ops]
            if header is None:
                header = names
                print("| E | k | T | " + " | ".join(header) + " |")
                print("|---" * (3 + len(header)) + "|")
            row = f"| {E} | {k} | {T} | " + " | ".join(f"{v:.1f}" for v in times.values()) + " |"
            print(row, flush=True)
            rows.append(row)
    if args.profile:
        _profile(device)
    return 0


def _profile(device) -> None:
    """Per-kernel device time of one call (eager, torch.profiler): where the time goes."""
    from torch.profiler import ProfilerActivity, profile

    from sgl_ecpatch.bench.seed_baseline import seed_expert_choice_topk
    from sgl_ecpatch.runtime.fast import expert_choice_topk_torch

    calls = 5
    for E, k, T in [(60, 4, 1024), (60, 4, 16384), (128, 8, 16384), (512, 10, 4096), (512, 10, 16384)]:
        x = torch.randn(T, E, device=device).to(torch.bfloat16)
        n_dev = torch.tensor(T, device=device)
        for name, fn in [
            ("seed", lambda: seed_expert_choice_topk(x, k)),
            ("fast", lambda: expert_choice_topk_torch(x, k)),
            ("fast n=dev", lambda: expert_choice_topk_torch(x, k, num_token_non_padded=n_dev)),
        ]:
            for _ in range(3):
                fn()
            torch.cuda.synchronize()
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                for _ in range(calls):
                    fn()
                torch.cuda.synchronize()
            rows = []
            for evt in prof.key_averages():
                us = getattr(evt, "device_time_total", None) or getattr(evt, "cuda_time_total", 0.0)
                if us > 0 and evt.count >= calls:
                    rows.append((us / calls, evt.count // calls, evt.key[:90]))
            rows.sort(reverse=True)
            total = sum(r[0] for r in rows)
            print(f"\n## E={E} k={k} T={T} {name}: {total:.1f} us of kernels per call (eager)")
            for us, count, key in rows[:12]:
                print(f"  {us:8.1f} us  x{count}  {key}")


if __name__ == "__main__":
    sys.exit(main())
