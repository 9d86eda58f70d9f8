#!/usr/bin/env python3
"""The measured decision guide, in one command (on a CUDA machine; degrades without one).

    python3 benchmarks/bench_gpu.py [--out DIR] [--budget-s 230] [--quick]

Runs, in this order, and skips (saying why) whatever cannot run here:

1. per-expert MoE time vs tokens (the time model `ecpatch advise` projects with);
2. the routing micro-benchmark: presets qwen2-moe 60/4, olmoe 64/8, qwen3-moe 128/8,
   qwen3-next 512/10, mixtral 8/2 at T = 1 .. 16384, bf16 logits, every method
   (plain top-k, SGLang's router when `import sglang` works, the seed-style dense
   expert choice, the fast PyTorch path and the kernel, both fills), eager and
   CUDA graph;
3. the MoE layer benchmark (router GEMM + routing + fused experts, bf16) for
   Qwen3-30B-A3B-like (2048/768, 128 experts, top-8) and Qwen3-Next-like
   (2048/512, 512 experts, top-10) shapes, token choice vs expert choice drop/topk;
4. the load-balance study (CPU work): uniform, Zipf s = 0.25/0.5/1, correlated
   rho = 0.5; EP 1/2/4/8; token choice vs both fills; projected slowest-rank time.

Writes to DIR (default $OUT, else ./bench_out):
  measured_table.json   exactly the format of sgl_ecpatch/bench/measured_table.json
                        (copy it there to ship these numbers with `ecpatch advise`)
  bench.csv             the same numbers, long format
  summary.md            the README's "Measured decision guide" tables
  bench.png             plots (only when matplotlib is importable)
  log.txt               what ran, what was skipped and why

SGLang on the GPU machine: install the carried wheels first, e.g.
  python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from sgl_ecpatch.bench import output, table as table_mod  # noqa: E402
from sgl_ecpatch.bench.distributions import DEFAULT_SKEWS  # noqa: E402
from sgl_ecpatch.bench.presets import DEFAULT_PRESETS, PRESETS  # noqa: E402
from sgl_ecpatch.bench.routing import ALL_METHODS, bench_routing  # noqa: E402
from sgl_ecpatch.bench.study import load_study  # noqa: E402

TOKENS = (1, 16, 64, 256, 1024, 4096, 16384)
LOAD_TOKENS = (256, 4096)
RANKS = (1, 2, 4, 8)


class Log:
    def __init__(self, path: Path):
        self.lines: list[str] = []
        self.path = path
        self.started = time.monotonic()

    def __call__(self, message: str) -> None:
        line = f"[{time.monotonic() - self.started:7.1f}s] {message}"
        print(line, flush=True)
        self.lines.append(line)
        self.path.write_text("\n".join(self.lines) + "\n")

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT") or "bench_out"))
    parser.add_argument("--budget-s", type=float, default=230.0,
                        help="soft time budget: later sections shrink or are skipped past it")
    parser.add_argument("--quick", action="store_true", help="fewer timing repeats")
    parser.add_argument("--presets", default=",".join(DEFAULT_PRESETS))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    log = Log(args.out / "log.txt")
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    command = "python3 benchmarks/bench_gpu.py" + (" --quick" if args.quick else "")
    result = table_mod.new_table(device=device, command=command)
    notes = []
    log(f"device: {result['device']}; torch {torch.__version__}; software {json.dumps(result['software'])}")
    if not cuda:
        notes.append(output.CPU_NOTE)
        log("no CUDA device: routing runs on the CPU at small sizes, the layer benchmark and the expert-time "
            "measurement are skipped")
    try:
        import sglang  # noqa: F401

        log(f"sglang importable: {getattr(sglang, '__version__', '?')}")
    except Exception as exc:  # noqa: BLE001
        log(f"sglang not importable ({type(exc).__name__}: {exc}); SGLang's router and fused MoE are skipped")
    presets = [PRESETS[name.strip()] for name in args.presets.split(",") if name.strip()]
    shapes = list(dict.fromkeys((p.experts, p.top_k) for p in presets))
    sizes = {(p.experts, p.top_k): (p.hidden, p.inter) for p in presets}

    # 1. per-expert time vs tokens
    model = None
    if cuda:
        try:
            from sgl_ecpatch.bench.layer import measure_expert_time

            model = measure_expert_time()
            result["expert_time"] = model.to_dict()
            log(f"expert time ({model.note}): " + ", ".join(f"{n}: {t:.1f} us" for n, t in model.points))
        except Exception as exc:  # noqa: BLE001
            notes.append(f"expert time not measured ({type(exc).__name__}: {exc}); shipped roofline default used")
            log(notes[-1] + "\n" + traceback.format_exc())

    # 2. routing micro-benchmark
    tokens = TOKENS if cuda else (1, 16, 256)
    try:
        rows = bench_routing(shapes, tokens, device=device, methods=ALL_METHODS, quick=args.quick,
                             progress=lambda m: None)
        result["routing"] = [r.to_dict() for r in rows]
        skipped = sorted({f"{r.method}: {r.note}" for r in rows if r.us is None and r.note})
        for line in skipped:
            log(f"routing n/a: {line}")
        log(f"routing: {sum(r.us is not None for r in rows)} timings")
    except Exception as exc:  # noqa: BLE001
        notes.append(f"routing benchmark failed: {type(exc).__name__}: {exc}")
        log(notes[-1] + "\n" + traceback.format_exc())

    # 3. MoE layer benchmark
    if cuda:
        from sgl_ecpatch.bench.layer import LAYER_SHAPES, LAYER_TOKENS, bench_layer

        layer_tokens = LAYER_TOKENS
        if log.elapsed > args.budget_s * 0.6:
            layer_tokens = (1, 32, 256, 4096)
            log("time budget: layer benchmark at T = 1, 32, 256, 4096 only")
        try:
            rows, layer_notes = bench_layer(tuple(LAYER_SHAPES), layer_tokens, modes=("graph",), quick=args.quick,
                                            progress=lambda m: None)
            result["layer"] = rows
            notes += layer_notes
            for line in layer_notes:
                log(f"layer: {line}")
            for r in rows:
                if r["us"] is None:
                    log(f"layer n/a: {r['shape']} T={r['tokens']} {r['method']}: {r['note']}")
        except Exception as exc:  # noqa: BLE001
            notes.append(f"layer benchmark failed: {type(exc).__name__}: {exc}")
            log(notes[-1] + "\n" + traceback.format_exc())
    else:
        notes.append("MoE layer benchmark skipped: it needs a CUDA device")

    # 4. load balance (CPU)
    try:
        from sgl_ecpatch.bench.timemodel import DEFAULT_MODEL

        load_tokens = LOAD_TOKENS if log.elapsed < args.budget_s * 0.85 else (4096,)
        torch.set_num_threads(max(1, min(8, os.cpu_count() or 1)))
        result["load"] = load_study(shapes, load_tokens, DEFAULT_SKEWS, ranks=RANKS, seeds=2,
                                    model=model or DEFAULT_MODEL, sizes=sizes, device=device)
        log(f"load study: {len(result['load'])} rows")
    except Exception as exc:  # noqa: BLE001
        notes.append(f"load study failed: {type(exc).__name__}: {exc}")
        log(notes[-1] + "\n" + traceback.format_exc())

    result["note"] = " | ".join(notes)
    table_mod.save(result, args.out / "measured_table.json")
    (args.out / "bench.csv").write_text(output.to_csv(result))
    summary = output.markdown(result)

    # 5. what `ecpatch advise` concludes from this very table, per preset, EP size and skew
    if log.elapsed < args.budget_s:
        try:
            from sgl_ecpatch.bench.advise import threshold_markdown, threshold_rows

            rows = threshold_rows(result, presets, device=str(device))
            summary += ("\n**What `ecpatch advise` concludes from this table** (offline, T = 16384 tokens, "
                        "capacity factor 1.25; --min-tokens is where expert choice stops being slower):\n\n"
                        + threshold_markdown(rows) + "\n")
            log(f"advice summary: {len(rows)} rows")
        except Exception as exc:  # noqa: BLE001
            log(f"advice summary failed: {type(exc).__name__}: {exc}\n" + traceback.format_exc())
    else:
        log("time budget: advice summary skipped")
    (args.out / "summary.md").write_text(summary + "\n")
    try:
        output.plot(result, args.out / "bench.png")
    except output.PlotUnavailable as exc:
        log(f"plot skipped: {exc}")
    print(summary)
    log(f"done in {log.elapsed:.0f} s; wrote {', '.join(sorted(p.name for p in args.out.iterdir()))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
