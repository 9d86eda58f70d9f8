#!/usr/bin/env python
"""Time the fast PyTorch expert-choice path against the seed-style dense baseline.

    python benchmarks/routing_torch.py            # full table on a CUDA machine
    python benchmarks/routing_torch.py --quick    # fewer replays

On a CUDA device every variant is captured in a CUDA graph that routes R different
(rotating) bf16 logits tensors, so inputs do not sit in L2; each graph is replayed
several times between CUDA events and the table shows the median time per routing
call in microseconds. Variants:

* ``seed``: `sgl_ecpatch.bench.seed_baseline` (softmax, per-expert topk, dense scatter,
  per-token topk, top-k back-fill);
* ``fast``: `sgl_ecpatch.runtime.fast` with ``num_token_non_padded=None``;
* ``fast n=dev``: the same with ``num_token_non_padded`` as a device tensor, what SGLang
  passes under CUDA graphs (capacity decided on the device);
* ``int64 n=dev``: ``fast n=dev`` forced onto the int64 pipeline (`runtime.fast`,
  ``row_stage="topk"``: unique int64 keys and two `torch.topk`; the only one with a
  correction bias, and the default before the int32 pipeline);
* ``<column>/<row> n=dev``: ``fast n=dev`` with the int32 pipeline's stages forced
  (column: stable sort of the [E, T] keys or top-k of unique int64 keys; row: stable
  sort of the flagged [T, E] keys or a sort of the E*C chosen pairs): where these cross
  sets `runtime.fast.SORT_MAX_TOKENS` and `PAIRS_MIN_ELEMENTS`;
* ``cuda``: the CUDA kernel, when ``runtime.kernel.try_load()`` gives one.

Without a GPU it runs one tiny size on the CPU and says that the times are not GPU times.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sgl_ecpatch.bench.seed_baseline import seed_expert_choice_topk  # noqa: E402
from sgl_ecpatch.bench.timing import time_cpu_passes  # noqa: E402
from sgl_ecpatch.bench.timing import time_cuda_graph as graph_timer  # noqa: E402
from sgl_ecpatch.runtime.config import validate  # noqa: E402
from sgl_ecpatch.runtime.fast import expert_choice_topk_torch, run_torch  # noqa: E402

CONFIGS = [(60, 4), (128, 8), (512, 10)]
TOKENS = [1, 16, 256, 1024, 4096, 16384]
CAPACITY_FACTOR = 1.25
ROTATE_BYTES = 128 * 2**20  # rotate through at least this much input (> 2x H100 L2)


def _variants(num_tokens: int, device, with_kernel: bool):
    n_dev = torch.tensor(num_tokens, device=device, dtype=torch.int64)
    out = {
        "seed": lambda x, k: seed_expert_choice_topk(x, k, capacity_factor=CAPACITY_FACTOR),
        "fast": lambda x, k: expert_choice_topk_torch(x, k, capacity_factor=CAPACITY_FACTOR),
        "fast n=dev": lambda x, k: expert_choice_topk_torch(
            x, k, capacity_factor=CAPACITY_FACTOR, num_token_non_padded=n_dev
        ),
        "int64 n=dev": lambda x, k: _staged(x, k, n_dev, row_stage="topk"),
        "sort/sort n=dev": lambda x, k: _staged(x, k, n_dev, column_stage="sort", row_stage="sort"),
        "topk/sort n=dev": lambda x, k: _staged(x, k, n_dev, column_stage="topk", row_stage="sort"),
        "topk/pairs n=dev": lambda x, k: _staged(x, k, n_dev, column_stage="topk", row_stage="pairs"),
        "sort/pairs n=dev": lambda x, k: _staged(x, k, n_dev, column_stage="sort", row_stage="pairs"),
    }
    if with_kernel:
        from sgl_ecpatch.runtime.kernel import expert_choice_topk_cuda

        out["cuda"] = lambda x, k: expert_choice_topk_cuda(
            x,
            k,
            capacity_factor=CAPACITY_FACTOR,
            renormalize=True,
            scoring_func="softmax",
            correction_bias=None,
            num_token_non_padded=n_dev,
            fill="drop",
        )
    return out


def _staged(x, k, n_dev, **stages):
    plan = validate(x, k, capacity_factor=CAPACITY_FACTOR, num_token_non_padded=n_dev)
    return run_torch(x, plan, **stages)


def _kernel_available(device) -> bool:
    try:
        from sgl_ecpatch.runtime.kernel import try_load

        module, _reason = try_load(device)
        return module is not None
    except Exception:
        return False


def time_cuda_graph(fn, inputs, top_k: int, replays: int) -> float:
    """Median microseconds per call of fn over the rotating inputs: ``replays`` samples,
    each one replay of a graph that routes every input once (`bench.timing`)."""
    return graph_timer(lambda x: fn(x, top_k), inputs, repeats=replays, replays=1)


def time_cpu(fn, inputs, top_k: int, replays: int) -> float:
    return time_cpu_passes(lambda x: fn(x, top_k), inputs, repeats=replays)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer replays")
    parser.add_argument("--tokens", type=int, nargs="*", help=f"token counts (default {TOKENS})")
    parser.add_argument("--no-kernel", action="store_true", help="skip the CUDA kernel column")
    args = parser.parse_args(argv)

    on_gpu = torch.cuda.is_available()
    device = torch.device("cuda" if on_gpu else "cpu")
    if on_gpu:
        card = torch.cuda.get_device_name(device)
        tokens = args.tokens or TOKENS
        configs = CONFIGS
        replays = 5 if args.quick else 15
    else:
        card = "CPU, 1 thread (not GPU times: run on a CUDA machine for the real table)"
        torch.set_num_threads(1)
        tokens = args.tokens or [1, 16, 256]
        configs = [(60, 4), (128, 8)]
        replays = 3
    with_kernel = on_gpu and not args.no_kernel and _kernel_available(device)

    print("# expert-choice routing: fast PyTorch path vs seed-style dense baseline\n")
    print(f"device: {card}; torch {torch.__version__}; bf16 logits; cf={CAPACITY_FACTOR}; fill=drop; renormalize")
    print("times: median us per routing call" + (" (CUDA graph replays, rotating inputs)" if on_gpu else " (CPU)"))
    print()
    names = list(_variants(1, device, with_kernel))
    header = ["E", "k", "T"] + [f"{n} (us)" for n in names] + ["seed / fast", "seed / fast n=dev"]
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join("---:" for _ in header) + "|")
    gen = torch.Generator(device="cpu").manual_seed(0)
    for num_experts, top_k in configs:
        for num_tokens in tokens:
            per_input = num_tokens * num_experts * 2
            rotate = max(2, min(16, math.ceil(ROTATE_BYTES / max(per_input, 1)))) if on_gpu else 2
            inputs = [
                torch.randn(num_tokens, num_experts, generator=gen).to(device=device, dtype=torch.bfloat16)
                for _ in range(rotate)
            ]
            times = {}
            for name, fn in _variants(num_tokens, device, with_kernel).items():
                if on_gpu:
                    times[name] = time_cuda_graph(fn, inputs, top_k, replays)
                else:
                    times[name] = time_cpu(fn, inputs, top_k, replays)
            row = [str(num_experts), str(top_k), str(num_tokens)]
            row += [f"{times[n]:.1f}" for n in names]
            row += [f"{times['seed'] / times['fast']:.2f}x", f"{times['seed'] / times['fast n=dev']:.2f}x"]
            print("| " + " | ".join(row) + " |", flush=True)
            del inputs
            if on_gpu:
                torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
