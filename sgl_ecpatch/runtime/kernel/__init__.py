"""CUDA kernel of expert-choice routing: the fast path of `expert_choice_topk` on GPUs.

Contract used by sgl_ecpatch.runtime's dispatcher (docs/TEAM.md):

    try_load(device=None) -> (module_or_None, reason_or_None)
        Never raises. On first use it builds the kernel (or finds the cached build)
        and returns this package as the module; later calls return at once.
    expert_choice_topk_cuda(router_logits, top_k, *, capacity_factor, renormalize,
                            scoring_func, correction_bias, num_token_non_padded, fill)
        -> (topk_weights [T, k] float32, topk_ids [T, k] int32)
    build_status() -> str        one line for `ecpatch status`
    build(arch=None, progress=None) -> Path   build now (e.g. `ecpatch build-kernel`)
    supports(num_experts, top_k) -> reason_or_None   shapes the kernel cannot take

Importing this package builds nothing and touches no GPU. The sources sit next to
this file (`expert_choice.cu`, `ec_*.cu`, `ec_*.cuh`), so the package can be vendored
into an SGLang tree as it is; see `_build.py` for the cache, the lock and the build
itself.
"""

from __future__ import annotations

import math
import os
import sys
import threading
from fractions import Fraction
from pathlib import Path
from typing import Callable, Optional

from . import _build
from ._build import KernelBuildError

__all__ = [
    "KNOBS",
    "KernelBuildError",
    "MAX_EXPERTS",
    "MAX_TOP_K",
    "build",
    "build_status",
    "expert_choice_topk_cuda",
    "knob",
    "knobs_set",
    "knobs_text",
    "supports",
    "try_load",
]

MAX_EXPERTS = 1024
MAX_TOP_K = 32
FUSED_MAX_DEFAULT = 16384  # largest T * E routed in one launch (T <= 32, E <= 512)
CLUSTER_MAX_T_DEFAULT = 256  # largest T routed by the one-cluster launch (sm_90+; at most 256)
SELECT_SPLIT_AUTO = -1  # blocks per expert of the large-T select: the kernel's choice (one, since v16)
ROW_MAX_T_DEFAULT = 16  # largest T routed by one block per row (T > 1: one cluster of T blocks, sm_90+,
                        # E > 64 or T >= 12)
RANK_MAX_DEFAULT = 96  # the one-cluster kernel where its ranks take at most this many compares per thread
SMEM_LIMIT_DEFAULT = 0  # shared memory a block may have, bytes (0: the device's opt-in maximum)
KEYS_HALF_MIN_T_DEFAULT = 4097  # from here the keys kernel takes two rows a warp where E <= 64 (v28)
KEYS_WIDE_MAX_T_DEFAULT = 256  # up to here the keys kernel takes two warps a row where 256 < E <= 512 (v30)
PDL_KNOB = "SGL_ECPATCH_KERNEL_PDL"  # "0": no programmatic dependent launch; anything else: on
# The integer tuning knobs, read from the environment per call: name -> default.
KNOBS = {
    "SGL_ECPATCH_KERNEL_FUSED_MAX": FUSED_MAX_DEFAULT,
    "SGL_ECPATCH_KERNEL_CLUSTER_MAX_T": CLUSTER_MAX_T_DEFAULT,
    "SGL_ECPATCH_KERNEL_SELECT_SPLIT": SELECT_SPLIT_AUTO,
    "SGL_ECPATCH_KERNEL_ROW_MAX_T": ROW_MAX_T_DEFAULT,
    "SGL_ECPATCH_KERNEL_RANK_MAX": RANK_MAX_DEFAULT,
    "SGL_ECPATCH_KERNEL_SMEM_LIMIT": SMEM_LIMIT_DEFAULT,
    "SGL_ECPATCH_KERNEL_KEYS_HALF_MIN_T": KEYS_HALF_MIN_T_DEFAULT,
    "SGL_ECPATCH_KERNEL_KEYS_WIDE_MAX_T": KEYS_WIDE_MAX_T_DEFAULT,
}

_DTYPE_CODES = {"torch.float32": 0, "torch.bfloat16": 1, "torch.float16": 2}
_load_lock = threading.Lock()
_libraries: dict = {}  # arch -> ctypes library
_failures: dict = {}   # arch -> reason (so a broken toolchain is tried once per process)
_fused_caps: dict = {}  # (device index, smem limit) -> largest T * E of the one-block kernel


def supports(num_experts: int, top_k: int) -> Optional[str]:
    """None if the kernel takes this shape, else why not (the PyTorch path takes any)."""
    if num_experts > MAX_EXPERTS:
        return f"the CUDA kernel takes at most {MAX_EXPERTS} experts (got {num_experts})"
    if top_k > MAX_TOP_K:
        return f"the CUDA kernel takes top_k up to {MAX_TOP_K} (got {top_k})"
    return None


def _library_for(device):
    """(ctypes library, None) or (None, reason) for a CUDA device; builds on first use."""
    import torch

    if not torch.cuda.is_available():
        return None, "no CUDA GPU is visible to torch"
    if getattr(torch.version, "hip", None):
        return None, "the kernel is CUDA-only (this torch is built for ROCm)"
    dev = torch.device("cuda", torch.cuda.current_device()) if device is None else torch.device(device)
    if dev.type != "cuda":
        return None, f"{dev} is not a CUDA device"
    major, minor = torch.cuda.get_device_capability(dev)
    if major < 7:
        return None, f"the GPU is sm_{major}{minor}; the kernel needs sm_70 or newer"
    arch = _build.normalize_arch((major, minor))
    with _load_lock:
        lib = _libraries.get(arch)
        if lib is not None:
            return lib, None
        if arch in _failures:
            return None, _failures[arch]
        try:
            path = _build.cached_library(arch)
            if path is None:
                if _build._cuda_home() is None:
                    raise KernelBuildError(
                        "no cached build for this environment and no CUDA toolkit (nvcc) to build one; "
                        "set CUDA_HOME, or run `ecpatch build-kernel` where a toolkit is installed"
                    )
                path = _build.build(arch)
            lib = _build.open_library(path)
        except Exception as exc:  # noqa: BLE001 - try_load reports, never raises
            _failures[arch] = str(exc) or type(exc).__name__
            return None, _failures[arch]
        _libraries[arch] = lib
        return lib, None


def try_load(device=None):
    """(this module, None) when the kernel can run on `device`, else (None, reason).

    Never raises. The first call per process builds the kernel if no cached build
    exists (once per machine, under a lock shared by the tensor-parallel ranks).
    """
    try:
        lib, reason = _library_for(device)
    except Exception as exc:  # noqa: BLE001
        return None, f"{type(exc).__name__}: {exc}"
    return (sys.modules[__name__], None) if lib is not None else (None, reason)


def build(arch=None, progress: Optional[Callable[[str], None]] = None) -> Path:
    """Build (or find cached) the kernel for `arch` (default: current GPU); returns the .so path."""
    return _build.build(arch, progress)


def knob(name: str) -> int:
    """Integer tuning knob `name` (a key of KNOBS) from the environment, its default when
    unset or empty. ValueError naming the knob where the value is not an integer."""
    text = os.environ.get(name, "").strip()
    if not text:
        return KNOBS[name]
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"{name}={text!r} is not an integer (default {KNOBS[name]}); unset it or fix it") from None


def pdl_on() -> bool:
    """Programmatic dependent launch allowed: SGL_ECPATCH_KERNEL_PDL unset or anything but "0"."""
    return os.environ.get(PDL_KNOB, "1").strip() != "0"


def knobs_set() -> list:
    """The kernel's tuning knobs set in this environment, as 'NAME=value' (with what is
    wrong where a value would make every kernel call raise): what `ecpatch status` shows."""
    out = []
    pdl = os.environ.get(PDL_KNOB)
    if pdl is not None:
        out.append(f"{PDL_KNOB}={pdl}" + ("" if pdl_on() else " (PDL off)"))
    for name in KNOBS:
        if name not in os.environ:
            continue
        try:
            value = knob(name)
        except ValueError:
            out.append(f"{name}={os.environ[name]!r} (not an integer: every kernel call would raise)")
            continue
        out.append(f"{name}={value}" + (" (the default)" if value == KNOBS[name] else ""))
    return out


def knobs_text() -> str:
    """knobs_set() as one line: `ecpatch status`'s report of this environment's knobs."""
    found = knobs_set()
    return "; ".join(found) if found else "none set (the measured defaults)"


def build_status() -> str:
    """One line: is a build for this environment (GPU arch, torch, CUDA) cached?"""
    try:
        import torch

        arch = _build.current_arch()
        versions = f"torch {torch.__version__}, CUDA {torch.version.cuda or 'none'}"
        if arch is None:
            built = sorted(p.name for p in _build.cache_root().glob("sm*") if (p / "build.json").is_file()) \
                if _build.cache_root().is_dir() else []
            extra = f"; {len(built)} cached build(s) under {_build.cache_root()}" if built else ""
            return f"CUDA kernel: no GPU visible ({versions}){extra}; `ecpatch build-kernel --arch 90` builds ahead"
        lib = _build.cached_library(arch)
        if lib is not None:
            return f"CUDA kernel: built for sm_{arch} ({versions}), cached at {lib.parent}"
        return (f"CUDA kernel: not built for sm_{arch} ({versions}); it builds on first use, "
                f"or now with `ecpatch build-kernel`")
    except Exception as exc:  # noqa: BLE001 - a status line must not fail
        return f"CUDA kernel: status unknown ({type(exc).__name__}: {exc})"


def _fused_cap(lib, dev_index: int, smem_limit: int) -> int:
    """Largest T * E the one-block kernel fits in a block's shared memory on this device."""
    key = (dev_index, smem_limit)
    cap = _fused_caps.get(key)
    if cap is None:
        cap = _fused_caps[key] = int(lib.ec_fused_max_elems(dev_index, smem_limit))
    return cap


def _check_args(router_logits, top_k, capacity_factor, scoring_func, correction_bias, fill):
    import torch

    if not isinstance(router_logits, torch.Tensor) or router_logits.dim() != 2:
        shape = tuple(router_logits.shape) if isinstance(router_logits, torch.Tensor) else type(router_logits)
        raise ValueError(f"router_logits: expected a 2-D tensor [T, E], got {shape}")
    num_experts = router_logits.shape[1]
    if num_experts < 1:
        raise ValueError("router_logits: E (experts, dim 1) must be >= 1")
    if isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= num_experts:  # noqa: E501
        raise ValueError(f"top_k: must be an int in [1, E={num_experts}], got {top_k!r}")
    if isinstance(capacity_factor, bool) or not isinstance(capacity_factor, (int, float)) \
            or not math.isfinite(capacity_factor) or capacity_factor <= 0:
        raise ValueError(f"capacity_factor: must be a finite number > 0, got {capacity_factor!r}")
    if scoring_func not in ("softmax", "sigmoid"):
        raise ValueError(f"scoring_func: must be 'softmax' or 'sigmoid', got {scoring_func!r}")
    if fill not in ("drop", "topk"):
        raise ValueError(f"fill: must be 'drop' or 'topk', got {fill!r}")
    if correction_bias is not None and (
        not isinstance(correction_bias, torch.Tensor) or tuple(correction_bias.shape) != (num_experts,)
    ):
        shape = tuple(correction_bias.shape) if isinstance(correction_bias, torch.Tensor) else type(correction_bias)
        raise ValueError(f"correction_bias: expected a tensor of shape [E={num_experts}], got {shape}")


def capacity_fraction(capacity_factor: float, num_experts: int) -> tuple:
    """cf as the integers (num, den) of Fraction(cf).limit_denominator(1000), capped at E
    (any cf >= E gives C = n, and the cap keeps n * k * num inside 64 bits)."""
    frac = Fraction(capacity_factor).limit_denominator(1000)
    if frac >= num_experts:
        return num_experts, 1
    return frac.numerator, frac.denominator


def expert_choice_topk_cuda(router_logits, top_k, *, capacity_factor=1.25, renormalize=True,
                            scoring_func="softmax", correction_bias=None, num_token_non_padded=None,
                            fill="drop", out=None):
    """Expert-choice routing on the GPU (ROUTING.md). One launch: T = 1 (one block, a thread
    per expert); on sm_90+ T <= 16 with E > 64 or T >= 12 (one cluster of T such blocks);
    T <= 32 with E <= 256 and T <= 24 with E <= 512 (one block; on sm_90+ a 16-block
    cluster first for 17 <= T <= 32); on sm_90+ T <= 256 with E <= 512 where the cluster's
    ranks take few compares (SGL_ECPATCH_KERNEL_RANK_MAX: to T = 96 with 60-64 experts,
    64 with 128, 48 with 256, 32 with 512; one 16-block cluster). Else three launches.

    router_logits: [T, E] float32/bfloat16/float16 CUDA tensor (other float dtypes are
    upcast). Returns (topk_weights [T, k] float32, topk_ids [T, k] int32). Launches on
    the current stream with no host sync: `num_token_non_padded` given as a CUDA
    tensor is read on the device, so the call can be captured in a CUDA graph.
    `out=(weights, ids)` writes into given tensors (tests poison them first).
    Knobs, read per call: SGL_ECPATCH_KERNEL_PDL=0 (no programmatic dependent launch),
    SGL_ECPATCH_KERNEL_FUSED_MAX (largest T * E of the one-launch path),
    SGL_ECPATCH_KERNEL_CLUSTER_MAX_T (largest T of the one-cluster path on sm_90+; 0: off),
    SGL_ECPATCH_KERNEL_SELECT_SPLIT (blocks per expert of the large-T select on sm_90+,
    a thread-block cluster: unset, 0 or 1 = one block per expert, which measured faster
    everywhere since v16; 2, 4 or 8 = that many, raised where a slice would not fit),
    SGL_ECPATCH_KERNEL_ROW_MAX_T (largest T routed by one block per row: T = 1 as one
    block, up to 16 on sm_90+ as one cluster of T blocks; 0: off),
    SGL_ECPATCH_KERNEL_RANK_MAX (the one-cluster path where its ranks take at most this
    many compares per thread, ceil(E / 16) * T32 * T / 512 with T32 = T rounded up to 32;
    default 96; 0: off),
    SGL_ECPATCH_KERNEL_SMEM_LIMIT (bytes of shared memory a block may have; default and 0:
    the device's opt-in maximum. The one-block path and the large-T select's cached column
    are sized to it, so a lower value reproduces a smaller card's limits, e.g. 65536 for
    sm_75 or 101376 for sm_86/89),
    SGL_ECPATCH_KERNEL_KEYS_HALF_MIN_T (the smallest T at which the first of the three
    launches takes two rows a warp, one per half-warp, where E <= 64; default 4097; a value
    above T turns it off),
    SGL_ECPATCH_KERNEL_KEYS_WIDE_MAX_T (the largest T at which that launch takes two warps a
    row where 256 < E <= 512; default 256; 0 turns it off).
    Raises ValueError for bad arguments, NotImplementedError for E > 1024 or
    top_k > 32, RuntimeError when the kernel cannot be loaded or launched.
    """
    import torch

    _check_args(router_logits, top_k, capacity_factor, scoring_func, correction_bias, fill)
    num_tokens, num_experts = router_logits.shape
    unsupported = supports(num_experts, top_k)
    if unsupported:
        raise NotImplementedError(unsupported)
    if not router_logits.is_cuda:
        raise ValueError(f"router_logits: the CUDA kernel needs a CUDA tensor, got one on {router_logits.device}")
    device = router_logits.device
    lib, reason = _library_for(device)
    if lib is None:
        raise RuntimeError(f"the expert-choice CUDA kernel is unavailable: {reason}")

    if out is None:
        weights = torch.empty((num_tokens, top_k), dtype=torch.float32, device=device)
        ids = torch.empty((num_tokens, top_k), dtype=torch.int32, device=device)
    else:
        weights, ids = out
        for name, t, dt in (("weights", weights, torch.float32), ("ids", ids, torch.int32)):
            if t.shape != (num_tokens, top_k) or t.dtype != dt or t.device != device or not t.is_contiguous():
                raise ValueError(f"out: {name} must be a contiguous {dt} tensor [T, k] on {device}")
    if num_tokens == 0:
        return weights, ids

    x = router_logits
    code = _DTYPE_CODES.get(str(x.dtype))
    if code is None:
        x, code = x.float(), 0
    x = x.contiguous()

    bias_ptr, bias_code = None, 0
    if correction_bias is not None:
        bias = correction_bias
        if bias.device != device:
            raise ValueError(f"correction_bias: must be on {device}, got {bias.device}")
        bias_code = _DTYPE_CODES.get(str(bias.dtype))
        if bias_code is None:
            bias, bias_code = bias.float(), 0
        bias = bias.contiguous()
        bias_ptr = bias.data_ptr()

    n_ptr, n_is_64, n_host = None, 0, num_tokens
    count = num_token_non_padded
    if count is not None:
        if isinstance(count, torch.Tensor):
            if count.numel() != 1:
                raise ValueError(f"num_token_non_padded: expected one element, got shape {tuple(count.shape)}")
            if not count.is_cuda:
                n_host = int(count.reshape(()).item())  # host memory: no device sync
            else:
                if count.device != device:
                    raise ValueError(f"num_token_non_padded: must be on {device}, got {count.device}")
                if count.dtype not in (torch.int32, torch.int64):
                    count = count.to(torch.int32)
                n_ptr, n_is_64 = count.data_ptr(), int(count.dtype == torch.int64)
        else:
            n_host = int(count)
        n_host = max(0, min(num_tokens, n_host))

    num, den = capacity_fraction(float(capacity_factor), num_experts)
    # tuning knobs, read per call (a captured graph keeps the choice made at capture)
    pdl = int(pdl_on())
    fused_max = knob("SGL_ECPATCH_KERNEL_FUSED_MAX")
    cluster_max_t = knob("SGL_ECPATCH_KERNEL_CLUSTER_MAX_T")
    select_split = knob("SGL_ECPATCH_KERNEL_SELECT_SPLIT")
    row_max_t = knob("SGL_ECPATCH_KERNEL_ROW_MAX_T")
    rank_max = knob("SGL_ECPATCH_KERNEL_RANK_MAX")
    smem_limit = knob("SGL_ECPATCH_KERNEL_SMEM_LIMIT")
    keys_half_min_t = knob("SGL_ECPATCH_KERNEL_KEYS_HALF_MIN_T")
    keys_wide_max_t = knob("SGL_ECPATCH_KERNEL_KEYS_WIDE_MAX_T")
    dev_index = device.index if device.index is not None else torch.cuda.current_device()
    # the one-block path keeps T * E keys and scores in shared memory: at most what the card
    # holds (the workspace and the launch must agree on it)
    fused_max = min(fused_max, _fused_cap(lib, dev_index, smem_limit))
    workspace = torch.empty(int(lib.ec_workspace_bytes(num_tokens, num_experts, fused_max)), dtype=torch.uint8,
                            device=device)
    stream = torch.cuda.current_stream(device).cuda_stream
    rc = lib.ec_route(
        x.data_ptr(), code, num_tokens, num_experts, top_k,
        bias_ptr, bias_code,
        n_ptr, n_is_64, n_host,
        num, den,
        int(scoring_func == "sigmoid"), int(fill == "topk"), int(bool(renormalize)),
        workspace.data_ptr(), weights.data_ptr(), ids.data_ptr(),
        dev_index, stream,
        pdl, fused_max, cluster_max_t, select_split, row_max_t, rank_max, smem_limit, keys_half_min_t, keys_wide_max_t,
    )
    if rc != 0:
        raise RuntimeError(f"expert-choice kernel launch failed: {lib.ec_error_string(rc).decode()}")
    return weights, ids
