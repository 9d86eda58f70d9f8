#!/usr/bin/env python
"""A target for Nsight Compute: a few kernel calls at one size (no timing of its own).

    ncu --clock-control none -k regex:'keys|select|token' -c 3 \
        python benchmarks/ncu_target.py --tokens 16384 --experts 512 --top-k 10
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sgl_ecpatch.runtime.kernel import expert_choice_topk_cuda  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=16384)
    parser.add_argument("--experts", type=int, default=512)
    parser.add_argument("--top-k", type=int, default=10)
    parser.add_argument("--calls", type=int, default=2)
    args = parser.parse_args(argv)
    x = torch.randn(args.tokens, args.experts, device="cuda").to(torch.bfloat16)
    for _ in range(args.calls):
        expert_choice_topk_cuda(x, args.top_k, capacity_factor=1.25, renormalize=True, scoring_func="softmax",
                                correction_bias=None, num_token_non_padded=None, fill="drop")
    torch.cuda.synchronize()
    return 0


if __name__ == "__main__":
    sys.exit(main())
