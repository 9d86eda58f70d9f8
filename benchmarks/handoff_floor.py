"""What a hand-off between two phases of a grid costs, with no routing work around it.

    python benchmarks/handoff_floor.py [--grids 8 16 32 132 528] [--phases 1 2 3]

Expert choice needs every block's keys before any expert's threshold, and every threshold
before any token's slots: two grid-wide hand-offs, where SGLang's router needs none. This
times, as CUDA-graph replays between device events (the timing of kernel_bench.py), a
trivial phase (one float read from another block, one written, per thread) repeated 1-3
times: as separate launches in stream order, as launches with programmatic dependent
launch (what the routing kernels use), as one launch with a grid-wide barrier between
phases, and (grids of 8-16 blocks) as one thread-block cluster with its hardware barrier.
The difference between 1 and 3 phases, halved, is the cost of one hand-off. Builds
handoff_floor.cu with nvcc (a few seconds, no torch headers). Needs a GPU; writes
handoff_floor.json to $OUT (or the working directory).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from kernel_bench import calibrate_clock, graph_time_us  # noqa: E402

VARIANTS = {0: "launches", 1: "launches + PDL", 2: "one launch + grid barrier", 3: "one cluster + cluster barrier"}


def nvcc_command(lib: Path, arch: str) -> list:
    """The command that builds handoff_floor.cu into the shared library `lib` for sm_<arch>."""
    return ["nvcc", "-O3", "-std=c++17", "-shared", "-Xcompiler", "-fPIC",
            f"-gencode=arch=compute_{arch},code=sm_{arch}", str(HERE / "handoff_floor.cu"), "-o", str(lib)]


def open_library(lib: Path) -> ctypes.CDLL:
    """The built library with hf_run's C signature set."""
    dll = ctypes.CDLL(str(lib))
    dll.hf_run.argtypes = [ctypes.c_int] * 3 + [ctypes.c_void_p] * 3
    dll.hf_run.restype = ctypes.c_int
    return dll


def build(tmp: Path) -> ctypes.CDLL:
    major, minor = torch.cuda.get_device_capability()
    lib = tmp / "handoff_floor.so"
    subprocess.run(nvcc_command(lib, f"{major}{minor}"), check=True)
    return open_library(lib)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--grids", type=int, nargs="+", default=[8, 16, 32, 132, 528])
    ap.add_argument("--phases", type=int, nargs="+", default=[1, 2, 3])
    ap.add_argument("--replays", type=int, default=300)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("handoff_floor: no CUDA GPU, nothing to time", file=sys.stderr)
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        dll = build(Path(tmp))
        calibrate_clock()
        sms = torch.cuda.get_device_properties(0).multi_processor_count
        rows = []
        for grid in args.grids:
            if grid > sms * 8:  # 8 blocks of 256 threads an SM: the barrier needs them co-resident
                continue
            bufs = [torch.zeros(2 * grid * 256, device="cuda") for _ in range(4)]
            sync = torch.zeros(64, dtype=torch.int32, device="cuda")
            for variant, name in VARIANTS.items():
                if variant == 3 and grid > 16:  # a cluster holds at most 16 blocks
                    continue
                for phases in args.phases:
                    def run(buf, variant=variant, phases=phases, grid=grid):
                        err = dll.hf_run(variant, grid, phases, buf.data_ptr(), sync.data_ptr(),
                                         torch.cuda.current_stream().cuda_stream)
                        if err:
                            raise RuntimeError(f"hf_run: CUDA error {err}")
                    us = graph_time_us(run, bufs, args.replays)
                    run(bufs[0])
                    torch.cuda.synchronize()
                    # the last phase wrote 1, 2, ... phases into every element: the hand-offs held
                    got = bufs[0][(phases - 1) % 2 * grid * 256:][: grid * 256]
                    ok = bool(torch.all(got == phases))
                    rows.append({"grid": grid, "variant": name, "phases": phases, "us": us, "ok": ok})
                    print(f"grid {grid:4d}  {name:27s} phases {phases}: {us:6.2f} us  {'ok' if ok else 'WRONG'}",
                          flush=True)
        print()
        print(f"### {torch.cuda.get_device_name(0)}: hand-off floor, CUDA-graph replays, median µs")
        print()
        print("| grid | variant | " + " | ".join(f"{p} phase{'s' if p > 1 else ''}" for p in args.phases)
              + " | per hand-off |")
        print("|---|---|" + "---|" * (len(args.phases) + 1))
        for grid in sorted({r["grid"] for r in rows}):
            for name in VARIANTS.values():
                cells = {r["phases"]: r["us"] for r in rows if r["grid"] == grid and r["variant"] == name}
                if not cells:
                    continue
                lo, hi = min(cells), max(cells)
                per = (cells[hi] - cells[lo]) / (hi - lo) if hi > lo else float("nan")
                print(f"| {grid} | {name} | " + " | ".join(f"{cells[p]:.2f}" for p in args.phases)
                      + f" | {per:.2f} |")
        out = Path(os.environ.get("OUT", "."))
        (out / "handoff_floor.json").write_text(json.dumps({"device": torch.cuda.get_device_name(0),
                                                            "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
