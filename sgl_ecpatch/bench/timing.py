"""Timers: CPU wall clock, CUDA events (eager), CUDA-graph replays.

Each timer takes `fn(x)` and a list of inputs that it rotates through (so that a
result is not the cost of re-reading one tensor that sits in L2), and returns
the time of one call in microseconds (median on CUDA, minimum on the CPU).

- CPU: `time.perf_counter` around each call, the *minimum* over repeats (CPU
  timings on a shared machine only ever err upwards: another process takes the
  core; `timeit` makes the same choice). These are CPU times: they say nothing
  about a GPU.
- CUDA eager: device events around `rounds` calls, median over repeats; this
  includes the launch overhead of every kernel the function starts.
- CUDA graph: all inputs' calls captured in one graph (after a warm-up on a side
  stream, as torch requires), replayed between device events; median over
  repeats, divided by the number of calls in the graph. This is how SGLang runs
  decode batches, so it is the number that matters for small batches.
"""

from __future__ import annotations

import statistics
import time
from typing import Callable, Sequence

import torch


def time_cpu(fn: Callable, inputs: Sequence, *, warmup: int = 2, repeats: int = 7,
             min_seconds: float = 0.0) -> float:
    for i in range(warmup):
        fn(inputs[i % len(inputs)])
    samples = []
    started = time.perf_counter()
    i = 0
    while len(samples) < repeats or (time.perf_counter() - started) < min_seconds:
        x = inputs[i % len(inputs)]
        t0 = time.perf_counter()
        fn(x)
        samples.append(time.perf_counter() - t0)
        i += 1
        if len(samples) >= 10 * repeats:
            break
    return min(samples) * 1e6


def time_cpu_passes(fn: Callable, inputs: Sequence, *, repeats: int) -> float:
    """Median microseconds per call over `repeats` passes, each one call per input, after
    one warm-up call: the CPU counterpart of the per-pass samples of `time_cuda_graph`
    (the routing benchmarks put both in one table)."""
    fn(inputs[0])
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for x in inputs:
            fn(x)
        times.append((time.perf_counter() - start) * 1e6 / len(inputs))
    return statistics.median(times)


def time_cuda_eager(fn: Callable, inputs: Sequence, *, warmup: int = 3, repeats: int = 11,
                    rounds: int = 4) -> float:
    for i in range(warmup):
        fn(inputs[i % len(inputs)])
    torch.cuda.synchronize()
    samples = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(rounds):
            for x in inputs:
                fn(x)
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end) * 1e3 / (rounds * len(inputs)))
    return statistics.median(samples)


def time_cuda_graph(fn: Callable, inputs: Sequence, *, repeats: int = 11, replays: int = 4) -> float:
    """Raises whatever capture raises (a function that syncs cannot be captured)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for x in inputs:  # warm-up outside the graph: lazy inits, autotuning
            fn(x)
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outputs = [fn(x) for x in inputs]  # noqa: F841 (kept alive with the graph)
    graph.replay()
    torch.cuda.synchronize()
    samples = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(replays):
            graph.replay()
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end) * 1e3 / (replays * len(inputs)))
    del graph
    return statistics.median(samples)


def time_fn(fn: Callable, inputs: Sequence, *, device: torch.device | str, mode: str = "eager",
            quick: bool = False) -> float:
    """Median microseconds of one `fn(x)`; `mode` is "eager" or "graph" (CUDA only)."""
    device = torch.device(device)
    if device.type == "cuda":
        if mode == "graph":
            return time_cuda_graph(fn, inputs, repeats=5 if quick else 11)
        return time_cuda_eager(fn, inputs, repeats=5 if quick else 11)
    if mode != "eager":
        raise ValueError("CUDA-graph timing needs a CUDA device")
    return time_cpu(fn, inputs, repeats=3 if quick else 7)
