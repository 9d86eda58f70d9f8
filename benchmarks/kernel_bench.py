"""Speed of the expert-choice CUDA kernel against SGLang's router and the PyTorch paths.

    python benchmarks/kernel_bench.py [--sglang-dir .whl/sgl0523] [--quick]

One run times, per point (E, k) x T with bf16 logits, as CUDA-graph replays timed by
device events (median over replays, inputs rotated over several graphs so repeated
replays do not re-read one buffer from L2):

  * sglang  SGLang 0.5.23's Triton router `moe_fused_gate` (softmax, renormalised,
            plain top-k: what SGLang runs without expert choice), loaded from the
            module file of the 0.5.23 wheel (see --sglang-dir);
  * seed    the seed-style dense PyTorch expert choice (`sgl_ecpatch.bench.seed_baseline`
            when present, else the local copy below);
  * torch   ecpatch's fast PyTorch path (`expert_choice_topk(impl="torch")`);
  * kernel  ecpatch's CUDA kernel (`expert_choice_topk_cuda`),

plus the byte floor of each point (logits read once, outputs written once, over the
measured device-to-device copy bandwidth), the cold build time and the time to load
a cached build in a fresh process. Prints a markdown table naming the card; writes
JSON to $OUT (or the working directory). A window of replays during which a clock probe
saw the SM clock below 3/4 of the fastest seen is timed again (graph_time_us).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import types
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SLEEP_CYCLES_PER_S = 2.0e9  # torch.cuda._sleep spins this many clock cycles a second, about
POINTS = [(60, 4), (64, 8), (128, 8), (256, 8), (512, 10)]
TOKENS = [1, 16, 32, 64, 256, 1024, 4096, 16384]


# ----------------------------------------------------------------------------- SGLang's router

def load_sglang_router(folder: Path):
    """Import moe_fused_gate.py of the SGLang 0.5.23 wheel on its own.

    Importing all of `sglang` needs dozens of packages; the router needs none of them.
    The four helpers the module imports are stubbed with what they compute on a CUDA
    machine: PDL on for sm_90+ (as `is_arch_support_pdl`), the sm_120-only path off,
    kernel-API logging off, and the sigmoid-only radix path unused here (softmax).
    """
    path = folder / "moe_fused_gate.py"
    if not path.is_file():
        raise FileNotFoundError(f"{path} missing (unpack sglang/kernels/ops/moe/moe_fused_gate.py there)")

    def mod(name, **attrs):
        m = types.ModuleType(name)
        m.__dict__.update(attrs)
        sys.modules[name] = m
        return m

    major, minor = torch.cuda.get_device_capability()
    arch = types.SimpleNamespace(major=major, minor=minor)
    for name in ("sglang", "sglang.kernels", "sglang.kernels.jit", "sglang.kernels.ops",
                 "sglang.kernels.ops.moe", "sglang.srt"):
        mod(name, __path__=[])
    mod("sglang.kernels.jit.utils", get_jit_cuda_arch=lambda: arch, is_arch_support_pdl=lambda: major >= 9)
    mod("sglang.kernels.kernel_api_logging", debug_kernel_api=lambda f: f)
    radix = mod("sglang.kernels.ops.moe.moe_route_radix", covered=lambda *a, **k: False)
    sys.modules["sglang.kernels.ops.moe"].moe_route_radix = radix
    flag = types.SimpleNamespace(get=lambda: False)
    mod("sglang.srt.environ", envs=types.SimpleNamespace(SGLANG_OPT_SM120_MTP_ROUTER_TOP22=flag))
    spec = importlib.util.spec_from_file_location("sglang.kernels.ops.moe.moe_fused_gate", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module.moe_fused_gate


# ----------------------------------------------------------------------------- seed baseline

def seed_expert_choice_local(router_logits, top_k, capacity_factor=1.25):
    """Seed-style dense expert choice: softmax, per-expert topk over tokens, dense mask,
    per-token topk of the masked scores, renormalise (float ops, no integer keys)."""
    T, E = router_logits.shape
    scores = torch.softmax(router_logits.float(), dim=-1)
    capacity = min(T, math.ceil(T * top_k * capacity_factor / E))
    chosen_tokens = torch.topk(scores.t(), capacity, dim=1).indices  # [E, C]
    mask = torch.zeros(E, T, dtype=torch.bool, device=scores.device)
    mask.scatter_(1, chosen_tokens, True)
    mask = mask.t()
    masked = torch.where(mask, scores, torch.full_like(scores, -1.0))
    weights, ids = torch.topk(masked, top_k, dim=1)
    kept = weights >= 0
    weights = torch.where(kept, weights, torch.zeros_like(weights))
    ids = torch.where(kept, ids, torch.full_like(ids, -1)).to(torch.int32)
    weights = weights / weights.sum(dim=1, keepdim=True).clamp_min(1e-20)
    return weights, ids


def seed_baseline():
    try:
        from sgl_ecpatch.bench import seed_baseline as sb
    except Exception:  # noqa: BLE001
        return seed_expert_choice_local, "local copy (sgl_ecpatch.bench.seed_baseline missing)"
    for name in dir(sb):
        fn = getattr(sb, name)
        if callable(fn) and not name.startswith("_") and getattr(fn, "__module__", "") == sb.__name__ \
                and ("expert_choice" in name or "seed" in name):
            return fn, f"sgl_ecpatch.bench.seed_baseline.{name}"
    return seed_expert_choice_local, "local copy (no function in sgl_ecpatch.bench.seed_baseline)"


# ----------------------------------------------------------------------------- timing

def copy_bandwidth() -> float:
    """Device-to-device copy, bytes read + written per second (median of 20)."""
    n = 1 << 28  # 1 GiB of float32
    a = torch.empty(n, dtype=torch.float32, device="cuda").uniform_()
    b = torch.empty_like(a)
    for _ in range(3):
        b.copy_(a)
    times = []
    for _ in range(20):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        b.copy_(a)
        e.record()
        e.synchronize()
        times.append(s.elapsed_time(e) / 1e3)
    del a, b
    return 2 * n * 4 / statistics.median(times)


CLOCK_PROBE_CYCLES = 200_000  # a probe's torch.cuda._sleep: ~0.1 ms at full clock
_clock_best = [0.0]  # the fastest SM clock (cycles a second) any probe of this process saw
slow_windows: list = []  # (SM clock GHz, median µs) of every window of replays timed again


def _clock_probe():
    """Device events around a short spin, queued now: its cycles over its time give the SM clock."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    torch.cuda._sleep(CLOCK_PROBE_CYCLES)
    end.record()
    return start, end


def _clock_rate(probe) -> float:
    start, end = probe
    return CLOCK_PROBE_CYCLES / (start.elapsed_time(end) * 1e-3)


def calibrate_clock() -> float:
    """The SM clock after 50 ms of load (cycles a second): the reference graph_time_us checks."""
    torch.cuda._sleep(int(0.05 * SLEEP_CYCLES_PER_S))
    probe = _clock_probe()
    torch.cuda.synchronize()
    _clock_best[0] = max(_clock_best[0], _clock_rate(probe))
    return _clock_best[0]


def graph_time_us(fn, inputs, replays: int, tries: int = 3) -> float:
    """Median device time of one graph replay holding one call; one graph per input.

    A clock probe runs right before and right after the replays. Where either saw the SM
    clock below 3/4 of the fastest seen, the replays are timed again (up to `tries` times in
    all): on a lent H100 (session 9) whole windows of replays ran ~6x slow, as at the idle
    clock (345 MHz against 1980), at one point and not at the next.
    """
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for x in inputs[:3]:
            fn(x)
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    graphs = []
    for x in inputs:
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            fn(x)
        graphs.append(g)
    for g in graphs:
        g.replay()
    torch.cuda.synchronize()
    for attempt in range(tries):
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(replays)]
        # Keep the GPU busy while the host queues every replay, so that the events time
        # the device (graph launch included) and not the host's submission gaps.
        torch.cuda._sleep(int(replays * 40e-6 * SLEEP_CYCLES_PER_S))
        before = _clock_probe()
        for i, (s, e) in enumerate(events):
            s.record()
            graphs[i % len(graphs)].replay()
            e.record()
        after = _clock_probe()
        torch.cuda.synchronize()
        median = statistics.median(s.elapsed_time(e) * 1e3 for s, e in events)
        rate = min(_clock_rate(before), _clock_rate(after))
        _clock_best[0] = max(_clock_best[0], rate)
        if rate >= 0.75 * _clock_best[0]:
            return median
        slow_windows.append((rate / 1e9, median))
        print(f"graph_time_us: SM clock {rate / 1e9:.2f} GHz around the replays (fastest seen "
              f"{_clock_best[0] / 1e9:.2f}), median {median:.1f} us; timing again ({attempt + 1}/{tries})",
              file=sys.stderr, flush=True)
    return median


def build_timings(tmp: Path) -> dict:
    """Cold build in a fresh cache, then a cached load in a fresh process."""
    env = {**os.environ, "SGL_ECPATCH_CACHE": str(tmp), "PYTHONPATH": str(ROOT)}
    cold = ("import time, torch; torch.cuda.init(); t = time.perf_counter(); "
            "from sgl_ecpatch.runtime import kernel; kernel.build(); print(time.perf_counter() - t)")
    warm = ("import time, torch; torch.cuda.init(); t = time.perf_counter(); "
            "from sgl_ecpatch.runtime import kernel; m, r = kernel.try_load(); assert m is not None, r; "
            "print(time.perf_counter() - t)")
    out = {}
    for name, code in (("cold_build_s", cold), ("cached_load_s", warm)):
        p = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=400)
        if p.returncode != 0:
            out[name] = None
            out[name + "_error"] = p.stderr[-2000:]
        else:
            out[name] = float(p.stdout.strip().splitlines()[-1])
    return out


def profile_kernels(kernel) -> None:
    """Per-kernel device time of the kernel's launches at a few sizes (eager, profiler)."""
    from torch.profiler import ProfilerActivity, profile

    points = [(1, 128, 8, None), (64, 512, 10, None), (1024, 512, 10, None), (16384, 512, 10, None),
              (16384, 128, 8, None), (16384, 60, 4, None), (4096, 128, 8, None),
              (16384, 60, 4, "0"), (4096, 128, 8, "0")]  # split select on (automatic) and off
    for T, E, k, split in points:
        if split is None:
            os.environ.pop("SGL_ECPATCH_KERNEL_SELECT_SPLIT", None)
        else:
            os.environ["SGL_ECPATCH_KERNEL_SELECT_SPLIT"] = split
        x = torch.randn(T, E, device="cuda").to(torch.bfloat16)
        for _ in range(3):
            kernel.expert_choice_topk_cuda(x, k)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(20):
                kernel.expert_choice_topk_cuda(x, k)
            torch.cuda.synchronize()
        rows = []
        for ev in prof.key_averages():
            dev = getattr(ev, "device_time", None) or getattr(ev, "cuda_time", 0)
            if ev.count and dev:
                rows.append(f"{ev.key[:60]}: {dev:.1f} us x{ev.count}")
        label = "" if split is None else f" SELECT_SPLIT={split}"
        print(f"profile T={T} E={E} k={k}{label}: " + "; ".join(rows), flush=True)
    os.environ.pop("SGL_ECPATCH_KERNEL_SELECT_SPLIT", None)


# ----------------------------------------------------------------------------- main

def _secs(value) -> str:
    return "not measured" if value is None else f"{value:.2f} s"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sglang-dir", default=str(ROOT / ".whl" / "sgl0523"))
    ap.add_argument("--quick", action="store_true", help="fewer replays and points (a smoke run)")
    ap.add_argument("--tokens", type=int, nargs="*", help=f"token counts (default {TOKENS})")
    ap.add_argument("--configs", nargs="*", metavar="E:k",
                    help="(experts, top-k) pairs, e.g. 8:2 60:4 (default " + " ".join(f"{e}:{k}" for e, k in POINTS) + ")")
    ap.add_argument("--replays", type=int, default=300)
    ap.add_argument("--skip-build-timing", action="store_true")
    ap.add_argument("--profile", action="store_true", help="also print per-kernel device times (torch.profiler)")
    ap.add_argument("--only", nargs="*", metavar="METHOD",
                    help="time only these methods (launch_floor sglang seed torch kernel kernel_no_pdl kernel_no_cluster "
                         "kernel_no_fused kernel_no_split kernel_no_row kernel_no_rank; kernel_rank_all only "
                         "when named); default all")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("kernel_bench: no CUDA GPU, nothing to time", file=sys.stderr)
        return 0
    out_dir = Path(os.environ.get("OUT", "."))
    card = torch.cuda.get_device_name()
    props = torch.cuda.get_device_properties(0)
    result = {"card": card, "sms": props.multi_processor_count, "torch": torch.__version__,
              "cuda": torch.version.cuda, "points": []}

    if not args.skip_build_timing:
        with tempfile.TemporaryDirectory() as tmp:
            result.update(build_timings(Path(tmp)))
        print(f"cold build {_secs(result.get('cold_build_s'))}, cached load {_secs(result.get('cached_load_s'))}", flush=True)

    from sgl_ecpatch.runtime import expert_choice_topk, kernel

    mod, reason = kernel.try_load()
    if mod is None:
        print(f"kernel unavailable: {reason}", file=sys.stderr)
        return 1
    bw = copy_bandwidth()
    result["copy_bandwidth_GBps"] = bw / 1e9
    result["sm_clock_GHz"] = calibrate_clock() / 1e9
    print(f"{card}: copy bandwidth {bw / 1e9:.0f} GB/s (read + write)", flush=True)

    methods = {}
    tiny = torch.zeros(1, device="cuda")
    methods["launch_floor"] = lambda x, k: tiny.fill_(1.0)  # one 1-element kernel: the launch floor
    try:
        router = load_sglang_router(Path(args.sglang_dir))
        methods["sglang"] = lambda x, k: router(x, None, k, scoring_func="softmax", renormalize=True)
        result["sglang"] = "moe_fused_gate from the 0.5.23 wheel's module file"
    except Exception as exc:  # noqa: BLE001
        result["sglang"] = f"unavailable: {type(exc).__name__}: {exc}"
        print(f"sglang router unavailable: {exc}", file=sys.stderr)
    seed_fn, seed_src = seed_baseline()
    result["seed"] = seed_src
    methods["seed"] = lambda x, k: seed_fn(x, k)
    methods["torch"] = lambda x, k: expert_choice_topk(x, k, impl="torch")
    methods["kernel"] = lambda x, k: kernel.expert_choice_topk_cuda(x, k)

    def kernel_with(knob, value):
        """The kernel with one of its environment knobs set for the call (read per call)."""
        def run(x, k):
            os.environ[knob] = value
            try:
                return kernel.expert_choice_topk_cuda(x, k)
            finally:
                os.environ.pop(knob, None)
        return run

    methods["kernel_no_pdl"] = kernel_with("SGL_ECPATCH_KERNEL_PDL", "0")
    methods["kernel_no_cluster"] = kernel_with("SGL_ECPATCH_KERNEL_CLUSTER_MAX_T", "0")
    methods["kernel_no_fused"] = kernel_with("SGL_ECPATCH_KERNEL_FUSED_MAX", "0")
    methods["kernel_no_split"] = kernel_with("SGL_ECPATCH_KERNEL_SELECT_SPLIT", "0")
    methods["kernel_no_row"] = kernel_with("SGL_ECPATCH_KERNEL_ROW_MAX_T", "0")
    methods["kernel_no_rank"] = kernel_with("SGL_ECPATCH_KERNEL_RANK_MAX", "0")
    if args.only and "kernel_rank_all" in args.only:  # a sweep column: only when asked for
        methods["kernel_rank_all"] = kernel_with("SGL_ECPATCH_KERNEL_RANK_MAX", "1000000")
    if args.only:
        unknown = sorted(set(args.only) - set(methods))
        if unknown:
            ap.error(f"--only: unknown methods {unknown}; known: {sorted(methods)}")
        methods = {name: fn for name, fn in methods.items() if name in args.only}

    if args.profile:
        profile_kernels(kernel)

    points = POINTS
    if args.configs:
        try:
            points = [tuple(int(v) for v in c.split(":")) for c in args.configs]
            if any(len(pt) != 2 or not 1 <= pt[1] <= pt[0] for pt in points):
                raise ValueError
        except ValueError:
            ap.error(f"--configs: expected E:k pairs with 1 <= k <= E, got {args.configs}")
    tokens = args.tokens or (TOKENS if not args.quick else [1, 64, 1024, 16384])
    replays = args.replays if not args.quick else 100
    l2 = getattr(props, "L2_cache_size", 50 << 20)
    for E, k in points:
        for T in tokens:
            per_set = T * E * 2
            sets = max(2, min(8, math.ceil(2 * l2 / per_set)))
            inputs = [torch.randn(T, E, device="cuda", dtype=torch.float32).mul_(2).to(torch.bfloat16)
                      for _ in range(sets)]
            row = {"E": E, "k": k, "T": T}
            floor_bytes = T * E * 2 + T * k * 8
            row["floor_us"] = floor_bytes / bw * 1e6
            for name, fn in methods.items():
                try:
                    row[name] = graph_time_us(lambda x, fn=fn: fn(x, k), inputs, replays)
                except Exception as exc:  # noqa: BLE001
                    row[name] = None
                    row[name + "_error"] = f"{type(exc).__name__}: {str(exc)[:200]}"
            # sanity: kernel against the torch path on one input
            kw, kid = kernel.expert_choice_topk_cuda(inputs[0], k)
            tw, tid = expert_choice_topk(inputs[0], k, impl="torch")
            row["rows_differing_from_torch"] = int((kid != tid).any(dim=1).sum().item())
            result["points"].append(row)
            print(json.dumps(row), flush=True)
            del inputs

    result["slow_clock_windows"] = slow_windows  # timed again (graph_time_us); the last try's median is kept
    (out_dir / "kernel_bench.json").write_text(json.dumps(result, indent=1))
    print()
    print(f"### {card} ({result['sms']} SMs), torch {result['torch']}, CUDA {result['cuda']}, bf16 logits, "
          f"CUDA-graph replays, median µs")
    print(f"copy bandwidth {bw / 1e9:.0f} GB/s; SM clock {result['sm_clock_GHz']:.2f} GHz (spin probe); "
          f"cold build {_secs(result.get('cold_build_s'))}; cached load {_secs(result.get('cached_load_s'))}"
          + (f"; {len(slow_windows)} window(s) of replays timed again (SM clock below 3/4 of the fastest seen)"
             if slow_windows else ""))
    print()
    columns = [("launch_floor", "one tiny kernel"), ("sglang", "SGLang router"), ("seed", "seed dense"),
               ("torch", "fast torch"), ("kernel", "kernel"),
               ("kernel_no_pdl", "kernel (no PDL)"), ("kernel_no_cluster", "kernel (no cluster)"),
               ("kernel_no_fused", "kernel (no fused)"), ("kernel_no_split", "kernel (no split)"),
               ("kernel_no_row", "kernel (no row)"), ("kernel_no_rank", "kernel (no rank)"),
               ("kernel_rank_all", "kernel (rank always)")]
    columns = [(name, title) for name, title in columns if name in methods]
    print("| E | k | T | " + " | ".join(title for _, title in columns) + " | kernel / SGLang | seed / kernel | byte floor |")
    print("|---" * (len(columns) + 6) + "|")

    def f(v):
        return "n/a" if v is None else f"{v:.1f}"

    for r in result["points"]:
        ratio = r["kernel"] / r["sglang"] if r.get("sglang") and r.get("kernel") else None
        speedup = r["seed"] / r["kernel"] if r.get("seed") and r.get("kernel") else None
        print(f"| {r['E']} | {r['k']} | {r['T']} | " + "".join(f"{f(r.get(name))} | " for name, _ in columns) +
              f"{'n/a' if ratio is None else f'{ratio:.2f}x'} | {'n/a' if speedup is None else f'{speedup:.1f}x'} | "
              f"{r['floor_us']:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
