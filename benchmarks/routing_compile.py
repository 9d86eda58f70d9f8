#!/usr/bin/env python
"""Does torch.compile (Inductor) get the fast PyTorch path to 2x the seed? (issue #3)

How to run it on the lent GPU machine: one call, nothing to carry or install (it needs only
torch + triton, there already, and this checkout; it puts the repository on sys.path
itself). About 4-6 minutes on an H100/H200; every row is printed as soon as it is done
(T >= 1024 first), then the sorted table, also written to $OUT/routing_compile.md::

    PYTHONUNBUFFERED=1 python3 benchmarks/routing_compile.py

(The usual ``pip install -q --no-index --target /tmp/site .whl/py/*.whl;
PYTHONPATH=/tmp/site:$PWD`` prefix is harmless but not needed: .whl/py is only pytest.)

Options: ``--tokens 1024 4096`` (default 1 16 256 1024 4096 16384), ``--configs 60:4
512:10`` (default 60:4 128:8 512:10), ``--quick`` (5 replays instead of 15), ``--budget
S`` (no new compile after S seconds, default 330: the run stays under the 10-minute
limit), ``--no-fullgraph``, ``--compile-softmax``, ``--explain`` (graph breaks of the
unpatched and the patched path at every point; by default only at the first point).
On the CPU (no CUDA) it runs the same table with CPU times and the C++ Inductor backend
(default ``--tokens 4 32 --configs 60:4``): a check of the script and of the bits, not
a measurement.

Variants per (E, k, T), bf16 logits, cf=1.25, fill=drop, renormalize:

* ``seed``: `sgl_ecpatch.bench.seed_baseline`; ``fast`` / ``fast n=dev``: eager
  `runtime.fast.expert_choice_topk_torch`, ``num_token_non_padded`` None / a 0-d int64
  device tensor (what SGLang passes under CUDA graphs);
* ``compiled fast`` / ``compiled n=dev``: the *whole* ``expert_choice_topk_torch`` call
  (argument checks, stage choice, both pipelines) under ``torch.compile(dynamic=False,
  fullgraph=True)``, mode default, n passed as a graph input. Shapes are static: every
  stage choice is made on the host from T, so one compile per (E, k, T) is the honest
  unit (dynamic shapes would only add guards and slower kernels).

What is compiled is a private copy of `runtime/fast.py` (loaded from the same file, so the
eager ``fast`` columns run the untouched module) with six helpers swapped for forms with
the same bits that Inductor can take whole:

1. ``routing_scores`` -> an opaque custom op that calls the same ATen softmax kernel.
   Inductor's own softmax (its own max/sum reduction order and ``exp``) is not bitwise
   ATen's, and the contract wants the weights bit for bit (``--compile-softmax`` keeps it
   in the graph anyway and shows the mismatches).
2. ``_renormalized``: ``torch.div(..., out=out.t())`` is the one graph break Dynamo finds
   (non-contiguous ``out=``); here ``div(...).t().contiguous()``, fused by Inductor.
3. ``_slot_sum``: the sequential slot loop everywhere instead of ``cumsum`` on CUDA. CUDA's
   outer-dim scan adds slot by slot, but Inductor's Triton scan combines lanes as a tree
   (other rounding); the loop is exactly the contract's sum and fuses into one kernel.
4. ``_bounds``: no host cache, no stream sync, no capture test (Dynamo cannot trace the
   sync); the float64 ranks are computed in the graph, where Inductor fuses them into
   the compare with n.
5. ``_words`` / ``_flags`` (the int32 words / the flag byte of int64 keys and indices): by
   shifts and casts instead of dtype views between widths, which Inductor only does as an
   extern copy and which fail outright on the functionalised, transposed strides
   ("self.stride(-1) must be 1 to view Long as Int": the first compile error found).

Inductor settings: ``TORCHINDUCTOR_EMULATE_DIVISION_ROUNDING=1`` (else Triton's ``x / y``
is ``div.full``, approximate, and the renormalised weights differ from eager's IEEE
division), ``compile_threads = 1`` (kernels compile in this process, so a compile error
surfaces as itself, not as a one-line ``SubprocException`` of a worker), cache dirs under
/tmp, Dynamo's recompile limit raised, ``torch._dynamo.reset`` after each compiled variant
and after a failed point. A failure is caught per column and per point: the table keeps its
first line (the eager columns are timed and printed whatever the compile does), and the
last ~15 lines of its traceback go to stderr and to an ``errors`` section of the .md. Each compiled call is first run and checked, then captured in a CUDA
graph by `bench.timing.time_cuda_graph` (warm-up on a side stream, rotating inputs,
median us), like ``benchmarks/routing_torch.py``.

Checks (the ``mismatch`` column: differing ids + weights whose bits differ, summed over
checks; 0 is the goal): compiled vs eager on the first timed input and on quantised logits
(many exact ties) with NaN entries and a NaN row; for n=dev also with n = T // 2 and
n = 0 (same compiled graph: n is an input). Triton may flush fp32 subnormals (torch
2.13's ``eager_numerics.disable_ftz`` is set where it exists); weights that small do not
occur in these inputs.
"""

from __future__ import annotations

import os

# Before torch is imported: Inductor reads these when its config module loads.
os.environ.setdefault("TORCHINDUCTOR_EMULATE_DIVISION_ROUNDING", "1")
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", "/tmp/ecpatch_inductor_cache")
os.environ.setdefault("TRITON_CACHE_DIR", "/tmp/ecpatch_triton_cache")
os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")  # also set in _configure_compiler

import argparse  # noqa: E402
import importlib.util  # noqa: E402
import math  # noqa: E402
import platform  # noqa: E402
import re  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
import warnings  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
import torch._dynamo  # noqa: E402  (here, never inside a function: see _report's note)
import torch._inductor.config as inductor_config  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sgl_ecpatch.bench.seed_baseline import seed_expert_choice_topk  # noqa: E402
from sgl_ecpatch.bench.timing import time_cpu_passes  # noqa: E402
from sgl_ecpatch.bench.timing import time_cuda_graph as graph_timer  # noqa: E402
from sgl_ecpatch.runtime import fast, scoring  # noqa: E402

CONFIGS = [(60, 4), (128, 8), (512, 10)]
TOKENS = [1, 16, 256, 1024, 4096, 16384]
CAPACITY_FACTOR = 1.25
ROTATE_BYTES = 128 * 2**20  # as routing_torch.py: rotate through > 2x the L2
PRIORITY_TOKENS = 1024  # points with T >= this run first (the goal)

warnings.filterwarnings("ignore", message=".*lru_cache.*")


# --- the compiled copy of runtime/fast.py ----------------------------------------------

@torch.library.custom_op("ecpatch_bench::routing_scores", mutates_args=())
def _opaque_scores(router_logits: torch.Tensor, scoring_func: str) -> torch.Tensor:
    """ATen's softmax / sigmoid kernel, opaque to Inductor (same bits as eager)."""
    return scoring.routing_scores(router_logits, scoring_func).contiguous()


@_opaque_scores.register_fake
def _(router_logits, scoring_func):
    return router_logits.new_empty(router_logits.shape, dtype=torch.float32)


def _load_fast_copy(compile_softmax: bool):
    """A second instance of runtime/fast.py (own globals) with the four swaps of the
    module docstring; the eager ``fast`` columns keep using the real module."""
    name = "sgl_ecpatch.runtime._fast_compiled" + ("_sm" if compile_softmax else "")
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, fast.__file__)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)

    def _slot_sum(weights_t):
        total = weights_t.select(0, 0)
        for slot in range(1, weights_t.shape[0]):
            total = total + weights_t.select(0, slot)
        return total

    def _renormalized(weights_t):
        out = torch.div(weights_t, mod._slot_sum(weights_t)).t().contiguous()
        return out.nan_to_num_(nan=0.0)

    def _bounds(T, num_ranks, start, end, step, device):
        bounds = torch.empty(T + num_ranks, dtype=torch.float64, device=device)
        torch.arange(T, out=bounds.narrow(0, 0, T))
        torch.arange(start, end, step, out=bounds.narrow(0, T, num_ranks))
        return bounds

    def _words(values, word):
        # The low / high int32 word of each int64 by arithmetic, not a dtype view:
        # Inductor takes views between different widths as an extern copy (and the
        # functionalised strides of `values` may not allow the view at all).
        return (values >> 32).to(torch.int32) if word else values.to(torch.int32)

    def _flags(values):
        return ((values >> 24) & 0xFF) != 0  # byte 3 of each int64, as the bool view reads it

    mod._slot_sum, mod._renormalized, mod._bounds = _slot_sum, _renormalized, _bounds
    mod._words, mod._flags = _words, _flags
    if not compile_softmax:
        mod.routing_scores = lambda logits, func: _opaque_scores(logits, func)
    return mod


def _configure_compiler():
    ind = inductor_config
    dyn = torch._dynamo.config
    for attr in ("recompile_limit", "cache_size_limit"):
        if hasattr(dyn, attr):
            setattr(dyn, attr, 64)
    for attr in ("accumulated_recompile_limit", "accumulated_cache_size_limit"):
        if hasattr(dyn, attr):
            setattr(dyn, attr, 4096)
    # Compile kernels in this process: a worker's failure only comes back as the one line
    # "SubprocException: An exception occurred in a subprocess:".
    flags = []
    if hasattr(ind, "compile_threads"):
        ind.compile_threads = 1
        flags.append("compile_threads=1")
    # Eager division rounding, whatever this torch calls the knob (2.11: a typo'd name).
    if hasattr(ind, "emulate_divison_rounding"):
        ind.emulate_divison_rounding = True
        flags.append("emulate_divison_rounding")
    numerics = getattr(ind, "eager_numerics", None)
    if numerics is not None and hasattr(numerics, "division_rounding"):
        numerics.division_rounding = True
        flags.append("eager_numerics.division_rounding")
    if numerics is not None and hasattr(numerics, "disable_ftz"):
        numerics.disable_ftz = True
        flags.append("disable_ftz")
    return flags


def _compiled(mod, top_k: int, with_n: bool, fullgraph: bool):
    if with_n:
        def routed(x, n):
            return mod.expert_choice_topk_torch(x, top_k, capacity_factor=CAPACITY_FACTOR, num_token_non_padded=n)
    else:
        def routed(x, n=None):
            return mod.expert_choice_topk_torch(x, top_k, capacity_factor=CAPACITY_FACTOR)
    return torch.compile(routed, dynamic=False, fullgraph=fullgraph)


def _eager(top_k: int, with_n: bool):
    if with_n:
        return lambda x, n: fast.expert_choice_topk_torch(x, top_k, capacity_factor=CAPACITY_FACTOR,
                                                          num_token_non_padded=n)
    return lambda x, n=None: fast.expert_choice_topk_torch(x, top_k, capacity_factor=CAPACITY_FACTOR)


def pipeline_name(x: torch.Tensor, top_k: int, n) -> str:
    """Which pipeline and stages `runtime.fast` takes here (decided on the host)."""
    plan = fast.validate(x, top_k, capacity_factor=CAPACITY_FACTOR, num_token_non_padded=n)
    everyone = fast._everyone_chosen(plan)
    capacity = plan.max_capacity if plan.num_valid is None else plan.host_capacity
    selecting = not everyone and capacity > 0
    stages = fast._stages(plan, selecting, fast.COLUMN_STAGE, fast.ROW_STAGE)
    name = "int64" if stages is None else "int32 " + "/".join(stages)
    return name + (" (no selection)" if everyone else "")


# --- checks -----------------------------------------------------------------------------

def hard_logits(num_tokens: int, num_experts: int, device, gen) -> torch.Tensor:
    """Quantised logits (exact ties everywhere), ~2% NaN entries, row 1 all NaN."""
    x = torch.randint(-3, 4, (num_tokens, num_experts), generator=gen).float() * 0.5
    x[torch.rand(num_tokens, num_experts, generator=gen) < 0.02] = float("nan")
    if num_tokens > 1:
        x[1] = float("nan")
    return x.to(device=device, dtype=torch.bfloat16)


def mismatch_count(ref, out) -> int:
    """Differing ids + weights whose bits differ (torch.equal on both as the gate)."""
    (w0, i0), (w1, i1) = ref, out
    if w0.shape != w1.shape or i0.shape != i1.shape or w0.dtype != w1.dtype or i0.dtype != i1.dtype:
        return max(w0.numel(), 1) * 2
    bits0, bits1 = w0.contiguous().view(torch.int32), w1.contiguous().view(torch.int32)
    if torch.equal(i0, i1) and torch.equal(bits0, bits1):
        return 0
    return int((i0 != i1).sum()) + int((bits0 != bits1).sum())


def check_cases(num_tokens: int, with_n: bool, first_input, hard, device):
    """(input, n) pairs to compare compiled and eager on."""
    cases = [(first_input, num_tokens), (hard, num_tokens)]
    if with_n:
        cases += [(hard, num_tokens // 2), (first_input, num_tokens // 2), (hard, 0)]
    return [(x, torch.tensor(n, dtype=torch.int64, device=device) if with_n else None) for x, n in cases]


# --- timing -------------------------------------------------------------------------------

def time_graph(fn, inputs, replays: int) -> float:
    """Median us per call: one replay of a graph routing every input once per sample."""
    return graph_timer(fn, inputs, repeats=replays, replays=1)


_ERROR_LINE = re.compile(r"^\s*(\w+(Error|Exception|Unsupported)): ")


def _first_line(exc: BaseException) -> str:
    """The error's first informative line (for a wrapped backend error, the inner one)."""
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    inner = [line for line in lines[1:] if _ERROR_LINE.match(line)]
    line = inner[0] if inner else f"{type(exc).__name__}: {lines[0] if lines else ''}"
    return line[:140].replace("|", "/")


ERRORS: list[str] = []  # every failure's traceback tail, for stderr and the .md
ERROR_LINES = 15


def _report(label: str, exc: BaseException) -> None:
    """The last ERROR_LINES lines of the traceback (with the message) to stderr and ERRORS.

    (Every function here uses the module's `torch`: an ``import torch._x`` inside a
    function would make `torch` local to all of it, an UnboundLocalError wherever it is
    read before that import ran, e.g. in CUDA-only branches. Hence the module-level imports.)
    """
    lines = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__)).rstrip().splitlines()
    shown = lines[-ERROR_LINES:]
    chain, seen = [], set()  # exc and its causes: a long message's head (the cause) is cut off above
    while exc is not None and id(exc) not in seen and len(chain) < 8:
        seen.add(id(exc))
        chain.append(exc)
        exc = exc.__cause__ or (None if exc.__suppress_context__ else exc.__context__)
    for cause in reversed(chain):
        message = str(cause).strip().splitlines()
        if len(message) > ERROR_LINES - 3 or (cause is not chain[0] and message):
            head = "\n".join(message[:8]).strip()
            shown = [f"{type(cause).__name__}: {head}", "    [...]"] + shown
    exc = chain[0]
    text = f"---- {label}: {type(exc).__name__} (last {min(ERROR_LINES, len(lines))} of {len(lines)} " \
           f"traceback lines)\n" + "\n".join(shown)
    ERRORS.append(text)
    print(text, file=sys.stderr, flush=True)


def _is_graph_break(exc: BaseException) -> bool:
    try:
        from torch._dynamo.exc import Unsupported
    except ImportError:  # pragma: no cover
        return False
    return isinstance(exc, Unsupported)


def _unique_graphs() -> int:
    from torch._dynamo.utils import counters

    return int(counters["stats"].get("unique_graphs", 0))


def explain(fn, args, label: str) -> None:
    torch._dynamo.reset()
    try:
        ex = torch._dynamo.explain(fn)(*args)
    except Exception as exc:  # noqa: BLE001
        print(f"explain {label}: failed: {_first_line(exc)}")
        _report(f"explain {label}", exc)
        torch._dynamo.reset()
        return
    print(f"explain {label}: {ex.graph_count} graph(s), {ex.graph_break_count} break(s), {ex.op_count} ops")
    seen = set()
    for brk in ex.break_reasons:
        frame = brk.user_stack[-1] if brk.user_stack else None
        where = f"{frame.name}:{frame.lineno} `{(frame.line or '').strip()}`" if frame else "?"
        reason = str(brk.reason).strip().splitlines()[0][:140]
        if (reason, where) not in seen:
            seen.add((reason, where))
            print(f"  break: {reason} @ {where}")
    torch._dynamo.reset()


# --- one point ----------------------------------------------------------------------------

def compiled_variant(mod, top_k, with_n, inputs, hard, n_dev, device, on_gpu, replays, fullgraph, label):
    """(time us or None, compile s, mismatches, note) of one compiled variant; never raises
    (an Exception): a failure becomes the note's first line plus a traceback tail on stderr."""
    eager = _eager(top_k, with_n)
    note, stage, compile_s, bad = "", "compile", None, None
    graphs0 = _unique_graphs()
    started = time.perf_counter()

    def failed(exc, what=None):
        _report(f"{label} {stage}", exc)
        prefix = (note + "; " if note else "") + ("" if stage == "compile" else stage + ": ")
        return None, compile_s, bad, prefix + (what or _first_line(exc))

    try:
        try:
            cfn = _compiled(mod, top_k, with_n, fullgraph)
            cfn(inputs[0], n_dev)  # compile (and autotune) here, outside any capture
        except Exception as exc:  # noqa: BLE001
            if not fullgraph or not _is_graph_break(exc):
                compile_s = time.perf_counter() - started
                return failed(exc)
            note = "fullgraph: " + _first_line(exc)
            _report(f"{label} fullgraph (retrying with graph breaks)", exc)
            torch._dynamo.reset()
            cfn = _compiled(mod, top_k, with_n, False)
            cfn(inputs[0], n_dev)  # a failure here: the outer except, stage "compile"
        if on_gpu:
            torch.cuda.synchronize()
        compile_s = time.perf_counter() - started
        graphs = _unique_graphs() - graphs0

        stage = "check"
        bad = 0
        for x, n in check_cases(inputs[0].shape[0], with_n, inputs[0], hard, device):
            bad += mismatch_count(eager(x, n), cfn(x, n))
        graphs_after_checks = _unique_graphs() - graphs0

        stage = "timing"
        if on_gpu:
            us = time_graph(lambda x: cfn(x, n_dev), inputs, replays)
        else:
            us = time_cpu_passes(lambda x: cfn(x, n_dev), inputs, repeats=replays)
    except Exception as exc:  # noqa: BLE001
        if compile_s is None:
            compile_s = time.perf_counter() - started
        if stage == "check":
            bad = None
        return failed(exc)
    recompiles = _unique_graphs() - graphs0 - graphs
    extra = f"{graphs} graphs" if graphs != 1 else ""
    if recompiles:
        extra += f"{', ' if extra else ''}{recompiles} recompiles ({graphs_after_checks - graphs} in checks)"
    if extra:
        note = (note + "; " if note else "") + extra
    return us, compile_s, bad, note


COMPILED = ("compiled fast", "compiled n=dev")


def empty_row(num_experts, top_k, num_tokens) -> dict:
    row = {"E": num_experts, "k": top_k, "T": num_tokens, "pipeline": "?", "seed": None, "fast": None,
           "fast n=dev": None, "eager note": ""}
    for key in COMPILED:
        row[key], row[key + " s"], row[key + " bad"], row[key + " note"] = None, None, None, ""
    return row


def run_point(num_experts, top_k, num_tokens, args, device, on_gpu, gen, mod, deadline, do_explain):
    """One table row. Each column is guarded: a failing column is a note (and a traceback
    tail on stderr), the others are still timed; only the inputs' setup can raise."""
    label = f"E={num_experts} k={top_k} T={num_tokens}"
    per_input = num_tokens * num_experts * 2
    rotate = max(2, min(16, math.ceil(ROTATE_BYTES / max(per_input, 1)))) if on_gpu else 2
    inputs = [torch.randn(num_tokens, num_experts, generator=gen).to(device=device, dtype=torch.bfloat16)
              for _ in range(rotate)]
    hard = hard_logits(num_tokens, num_experts, device, gen)
    n_dev = torch.tensor(num_tokens, device=device, dtype=torch.int64)
    replays = args.replays
    timer = ((lambda f: time_graph(f, inputs, replays)) if on_gpu
             else (lambda f: time_cpu_passes(f, inputs, repeats=replays)))

    row = empty_row(num_experts, top_k, num_tokens)
    eager_notes = []
    try:
        row["pipeline"] = pipeline_name(inputs[0], top_k, n_dev)
    except Exception as exc:  # noqa: BLE001
        row["pipeline"] = "pipeline: " + _first_line(exc)
        _report(f"{label} pipeline_name", exc)
    eager_fast, eager_n = _eager(top_k, False), _eager(top_k, True)
    for key, fn in (("seed", lambda x: seed_expert_choice_topk(x, top_k, capacity_factor=CAPACITY_FACTOR)),
                    ("fast", lambda x: eager_fast(x)),
                    ("fast n=dev", lambda x: eager_n(x, n_dev))):
        try:
            row[key] = timer(fn)
        except Exception as exc:  # noqa: BLE001
            eager_notes.append(f"{key}: {_first_line(exc)}")
            _report(f"{label} eager {key}", exc)
    row["eager note"] = "; ".join(eager_notes)

    if do_explain:
        explain(eager_n, (inputs[0], n_dev), f"unpatched fast.py n=dev E={num_experts} T={num_tokens}")
        explain(lambda x, n: mod.expert_choice_topk_torch(x, top_k, capacity_factor=CAPACITY_FACTOR,
                                                          num_token_non_padded=n),
                (inputs[0], n_dev), f"patched copy n=dev E={num_experts} T={num_tokens}")

    for key, with_n in zip(COMPILED, (False, True)):
        if time.perf_counter() > deadline:
            row[key + " note"] = "skipped (budget)"
            continue
        try:
            us, secs, bad, note = compiled_variant(mod, top_k, with_n, inputs, hard, n_dev if with_n else None,
                                                   device, on_gpu, replays, args.fullgraph, f"{label} {key}")
        except Exception as exc:  # noqa: BLE001  (compiled_variant catches its own; a safety net)
            us, secs, bad, note = None, None, None, _first_line(exc)
            _report(f"{label} {key}", exc)
        finally:
            torch._dynamo.reset()
        row[key], row[key + " s"], row[key + " bad"], row[key + " note"] = us, secs, bad, note
    return row


# --- table ----------------------------------------------------------------------------------

HEADER = ["E", "k", "T", "seed", "fast", "fast n=dev", "compiled fast", "compiled n=dev", "seed/compiled",
          "seed/compiled n=dev", "compile s (fast / n=dev)", "mismatch (fast / n=dev)", "notes"]


def _us(v):
    return "-" if v is None else f"{v:.1f}"


def _ratio(a, b):
    return "-" if a is None or b is None or b <= 0 else f"{a / b:.2f}x"


def format_row(row) -> str:
    notes = [row["pipeline"]] + ([row["eager note"]] if row.get("eager note") else [])
    for key, short in zip(COMPILED, ("fast", "n=dev")):
        if row[key + " note"]:
            notes.append(f"{short}: {row[key + ' note']}")
    secs = " / ".join("-" if row[k + " s"] is None else f"{row[k + ' s']:.1f}"
                      for k in ("compiled fast", "compiled n=dev"))
    bad = " / ".join("-" if row[k + " bad"] is None else str(row[k + " bad"])
                     for k in ("compiled fast", "compiled n=dev"))
    cells = [str(row["E"]), str(row["k"]), str(row["T"]), _us(row["seed"]), _us(row["fast"]),
             _us(row["fast n=dev"]), _us(row["compiled fast"]), _us(row["compiled n=dev"]),
             _ratio(row["seed"], row["compiled fast"]), _ratio(row["seed"], row["compiled n=dev"]),
             secs, bad, "; ".join(notes)]
    return "| " + " | ".join(cells) + " |"


def _table(rows) -> str:
    lines = ["| " + " | ".join(HEADER) + " |", "|" + "|".join("---:" for _ in HEADER[:-1]) + "|:---|"]
    lines += [format_row(r) for r in rows]
    return "\n".join(lines)


def _parse_config(text: str):
    try:
        experts, top_k = (int(v) for v in text.split(":"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"config must be E:k, e.g. 60:4, got {text!r}") from None
    if not 1 <= top_k <= experts:
        raise argparse.ArgumentTypeError(f"config {text!r}: need 1 <= k <= E")
    return experts, top_k


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, nargs="+", help=f"token counts (GPU default {TOKENS})")
    parser.add_argument("--configs", type=_parse_config, nargs="+", metavar="E:k",
                        help="expert configs (GPU default 60:4 128:8 512:10)")
    parser.add_argument("--quick", action="store_true", help="5 replays per timing instead of 15")
    parser.add_argument("--budget", type=float, default=330.0,
                        help="seconds after which no new compile starts (default 330)")
    parser.add_argument("--no-fullgraph", dest="fullgraph", action="store_false",
                        help="allow graph breaks (default: fullgraph, falling back per point on failure)")
    parser.add_argument("--compile-softmax", action="store_true",
                        help="let Inductor compile the softmax too (not bitwise ATen's)")
    parser.add_argument("--explain", action="store_true", help="torch._dynamo.explain at every point")
    parser.add_argument("--out", default=os.environ.get("OUT"), help="folder for routing_compile.md (default $OUT)")
    args = parser.parse_args(argv)

    started = time.perf_counter()
    on_gpu = torch.cuda.is_available()
    device = torch.device("cuda" if on_gpu else "cpu")
    if on_gpu:
        card = torch.cuda.get_device_name(device)
        tokens = args.tokens or TOKENS
        configs = args.configs or CONFIGS
        args.replays = 5 if args.quick else 15
    else:
        card = "CPU (not GPU times; a check of the script and of the bits)"
        torch.set_num_threads(min(4, os.cpu_count() or 1))
        tokens = args.tokens or [4, 32]
        configs = args.configs or [(60, 4)]
        args.replays = 3
    flags = _configure_compiler()
    mod = _load_fast_copy(args.compile_softmax)
    try:
        import triton

        triton_version = triton.__version__
    except Exception:  # noqa: BLE001
        triton_version = "n/a"

    head = [
        "# expert-choice routing: torch.compile of the fast PyTorch path vs eager and the seed\n",
        f"device: {card}; torch {torch.__version__}; triton {triton_version}; Python {platform.python_version()}; "
        f"bf16 logits; cf={CAPACITY_FACTOR}; fill=drop; renormalize",
        f"compile: whole expert_choice_topk_torch, dynamic=False, fullgraph={args.fullgraph}, mode default; "
        f"softmax {'compiled' if args.compile_softmax else 'opaque (ATen)'}; inductor flags: "
        f"{', '.join(flags) or 'none'}",
        "times: median us per routing call" + (" (CUDA graph replays, rotating inputs)" if on_gpu else " (CPU)"),
        "",
    ]
    print("\n".join(head), flush=True)
    print("| " + " | ".join(HEADER) + " |")
    print("|" + "|".join("---:" for _ in HEADER[:-1]) + "|:---|", flush=True)

    points = [(e, k, t) for e, k in configs for t in tokens]
    ordered = [p for p in points if p[2] >= PRIORITY_TOKENS] + [p for p in points if p[2] < PRIORITY_TOKENS]
    gen = torch.Generator(device="cpu").manual_seed(0)
    deadline = started + args.budget
    rows = {}
    for index, (num_experts, top_k, num_tokens) in enumerate(ordered):
        try:
            row = run_point(num_experts, top_k, num_tokens, args, device, on_gpu, gen, mod, deadline,
                            args.explain or index == 0)
        except Exception as exc:  # noqa: BLE001  (the inputs' setup failed: report and go on)
            row = empty_row(num_experts, top_k, num_tokens)
            row["pipeline"] = "point failed: " + _first_line(exc)
            _report(f"E={num_experts} k={top_k} T={num_tokens} point", exc)
        rows[(num_experts, top_k, num_tokens)] = row
        print(format_row(row), flush=True)
        try:  # whatever happened, the next point starts clean
            torch._dynamo.reset()
            if on_gpu:
                torch.cuda.synchronize()
                torch.cuda.empty_cache()  # the point's inputs and graphs are gone with run_point's frame
        except Exception as exc:  # noqa: BLE001
            _report(f"E={num_experts} k={top_k} T={num_tokens} cleanup", exc)

    table = _table([rows[p] for p in points if p in rows])
    total = time.perf_counter() - started
    text = "\n".join(head) + "\n" + table + f"\n\ntotal wall time {total:.0f} s\n"
    if ERRORS:
        text += f"\n## errors (last {ERROR_LINES} traceback lines each)\n\n```\n" + "\n\n".join(ERRORS) + "\n```\n"
    print(f"\n## sorted\n\n{table}\n\ntotal wall time {total:.0f} s", flush=True)
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "routing_compile.md").write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
