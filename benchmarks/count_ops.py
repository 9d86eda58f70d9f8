#!/usr/bin/env python
"""Count the aten ops (about one GPU kernel each) of one routing call, without a GPU.

    .venv/bin/python benchmarks/count_ops.py            # table
    .venv/bin/python benchmarks/count_ops.py --list     # and every op of each call

Each variant runs once on *fake* CUDA tensors (``FakeTensorMode``: shapes, dtypes and
the CUDA code paths, no data, no GPU) under a ``TorchDispatchMode`` that records every
aten op. Views, allocations, CPU scalars and ``prim`` queries launch no kernel and are
not counted; a ``cumsum`` of a non-contiguous tensor counts 2 (CUDA copies it first).
``topk``/``sort`` count 1 here but launch a few kernels on CUDA (radix select, gather,
bitonic sort of the result), so the count is a lower bound of the launches. A
``_local_scalar_dense`` (``.item()``, a host sync) is reported as ``SYNC``.

Variants: ``seed`` (`sgl_ecpatch.bench.seed_baseline`), ``fast`` with
``num_token_non_padded=None`` and ``fast n=dev`` with a 0-d int64 device tensor; all
bf16 logits, cf=1.25, fill="drop", renormalize, softmax, no bias (the benchmark's
setting, `benchmarks/routing_torch.py`).

Counts before -> after the op-count rewrite of `sgl_ecpatch.runtime.fast` (2026-11-26;
"before" is commit 6c775ec, counted with this script). They do not depend on E or k,
only on T through the host shortcuts: T = 1 (no expert can be full: no column
selection) and T >= 1024, where the default column layout ("auto") takes the [E, T]
key, one transpose copy more (forced ``column_layout="tokens"`` it is one op less):

==================  ====  ===========  ============
T                   seed  fast (None)  fast (n=dev)
==================  ====  ===========  ============
1                    13    12 -> 11     17 -> 14
16, 256              13    19 -> 13     25 -> 18
1024, 4096, 16384    13    19 -> 14     25 -> 19
==================  ====  ===========  ============

Where the ops went (T=16): the key is still ``nan_to_num``, one ``arange`` and one
``add``, but it is built already lowered (the constant is folded into the tie line),
so n on the host needs one ``scatter_(reduce="add")`` of a constant (was an add of
the values + scatter); the row and rank masks share one float64
buffer and one ``lt`` (was ``arange``, ``lt``, ``arange``, ``floor_divide``, ``lt``);
ids are one ``where`` on a bool view of the keys' flag byte (was ``ge``, ``where``,
``_to_copy``); weights are the keys' high words clamped at 0 (was ``gather``,
``nan_to_num``, ``where``, and a hidden transpose copy inside ``cumsum``); the padding
rows need no final fill with "drop". Each call also has one ``topk`` fewer than the
seed (2 against 3; a ``topk`` is a few kernel launches on CUDA).

Prediction for the H200 table (benchmarks/routing_torch_h200.md; about 2.5 us per
small kernel in a graph replay): at T <= 256 "fast n=dev" drops by about 15 us (e.g.
E=128, T=16: 69 -> about 52 us, the seed 51) and "fast" by about 12 us (55 -> about
42, faster than the seed); at T >= 4096 the int64 selections dominate, so the gain is
the [E, T] layout's (the old "col=E,T" column) plus a few us: about even with the seed
at E=512, T=16384, nowhere near 2x. Measured (routing_torch_h200.md, same day): "fast
n=dev" at E=128 T=16 58.4 -> 46.1 us; seed / fast 1.03-1.64x, n=dev 0.87-1.23x.

Session 2 (the int32 pipeline of `runtime.fast`, no bias): T=1 9 ops (n=dev 12), T=16 to
4096 14 (n=dev 19), T*E >= 2**23 ("pairs" row stage) 35 (40). On CUDA the softmax of
bf16 logits is one kernel (here ``_to_copy`` + ``_softmax``: 1 op less on the GPU), and
with n on the device the float64 mask buffer (``arange`` x2) is made once per shape and
stream and kept (`runtime.fast._bounds`): fake tensors are never kept, so these counts
are a first call's, and later calls launch 2 kernels fewer.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sgl_ecpatch.bench.seed_baseline import seed_expert_choice_topk  # noqa: E402
from sgl_ecpatch.runtime.fast import expert_choice_topk_torch  # noqa: E402

SHAPES = [(1, 128, 8), (16, 128, 8), (1024, 128, 8), (4096, 60, 4), (16384, 512, 10)]
CAPACITY_FACTOR = 1.25
_FREE = ("aten.empty", "aten.scalar_tensor", "aten.lift_fresh", "aten.detach", "aten.alias")


class OpCounter(TorchDispatchMode):
    """Records the aten ops that would launch a device kernel."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = str(func)
        if name == "aten._local_scalar_dense.default":
            self.ops.append("SYNC " + name)
        elif not (getattr(func, "is_view", False) or name.startswith("prim.") or name.startswith(_FREE)):
            self.ops.append(name)
        if "out" in kwargs and name.startswith("aten.arange"):
            # FakeTensor runs arange(out=view) as a copy, which fails like above; real
            # arange writes the (contiguous) view directly. Fake tensors hold no data.
            return kwargs["out"]
        return func(*args, **kwargs)


_ACTIVE = []


def _dense_like(tensor):
    return torch.empty(tensor.shape, dtype=tensor.dtype, device=tensor.device)


def _contiguous(self, memory_format=torch.contiguous_format):
    # A strided copy of a fake CUDA tensor fails inside C++ on a CPU-only build, and
    # fake tensors hold no data: count the copy and hand back a dense fake tensor.
    if self.is_contiguous(memory_format=memory_format):
        return self
    if _ACTIVE:
        _ACTIVE[-1].ops.append("aten.clone (contiguous)")
    return _dense_like(self)


def _index(key, size):
    """(start, length) or an int for the basic keys the routing code uses."""
    if isinstance(key, int):
        return key
    start, stop, step = key.indices(size)
    assert step == 1, key
    return start, max(stop - start, 0)


def _getitem(self, key):
    # Python indexing of a fake CUDA tensor fails inside C++ too: spell it as views.
    keys = key if isinstance(key, tuple) else (key,)
    out = self
    dim = 0
    for item in keys:
        where = _index(item, out.shape[dim])
        if isinstance(where, int):
            out = out.select(dim, where)
        else:
            out = out.narrow(dim, *where)
            dim += 1
    return out


def _setitem(self, key, value):
    assert not isinstance(value, torch.Tensor), "only scalar fills are counted"
    if _ACTIVE:
        _ACTIVE[-1].ops.append("aten.fill_.Scalar (setitem)")


def _cumsum(input, dim, *, dtype=None, out=None):
    # torch.cumsum of a fake CUDA tensor fails inside C++ on a CPU-only build as well.
    # CUDA's scan copies a non-contiguous input first: one more kernel.
    assert out is None and dtype is None
    if _ACTIVE:
        if not input.is_contiguous():
            _ACTIVE[-1].ops.append("aten.clone (contiguous, inside cumsum)")
        _ACTIVE[-1].ops.append("aten.cumsum.default")
    return _dense_like(input)


def count(fn):
    counter = OpCounter()
    _ACTIVE.append(counter)
    try:
        with counter:
            fn()
    finally:
        _ACTIVE.pop()
    return counter.ops


def variants(num_tokens, num_experts, top_k):
    x = torch.empty(num_tokens, num_experts, device="cuda", dtype=torch.bfloat16)
    n_dev = torch.empty((), device="cuda", dtype=torch.int64)
    return {
        "seed": lambda: seed_expert_choice_topk(x, top_k, capacity_factor=CAPACITY_FACTOR),
        "fast": lambda: expert_choice_topk_torch(x, top_k, capacity_factor=CAPACITY_FACTOR),
        "fast n=dev": lambda: expert_choice_topk_torch(
            x, top_k, capacity_factor=CAPACITY_FACTOR, num_token_non_padded=n_dev
        ),
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--list", action="store_true", help="print every counted op of each call")
    args = parser.parse_args(argv)
    patched = [
        (torch.Tensor, "contiguous", _contiguous),
        (torch.Tensor, "__getitem__", _getitem),
        (torch.Tensor, "__setitem__", _setitem),
        (torch, "cumsum", _cumsum),
    ]
    originals = [(owner, name, getattr(owner, name)) for owner, name, _ in patched]
    for owner, name, replacement in patched:
        setattr(owner, name, replacement)
    try:
        with FakeTensorMode(allow_non_fake_inputs=True):
            rows = []
            listings = []
            for shape in SHAPES:
                counts = {}
                for name, fn in variants(*shape).items():
                    ops = count(fn)
                    counts[name] = len(ops)
                    listings.append((shape, name, ops))
                rows.append((shape, counts))
    finally:
        for owner, name, original in originals:
            setattr(owner, name, original)
    names = list(rows[0][1])
    print("| T | E | k | " + " | ".join(f"{n} (ops)" for n in names) + " |")
    print("|---:|---:|---:|" + "---:|" * len(names))
    for (T, E, k), counts in rows:
        print(f"| {T} | {E} | {k} | " + " | ".join(str(counts[n]) for n in names) + " |")
    if args.list:
        for shape, name, ops in listings:
            print(f"\n{shape} {name}: {len(ops)} ops\n  " + "\n  ".join(ops))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
