"""Build, cache and load the expert-choice CUDA kernel (torch + stdlib only).

The kernel sources (`expert_choice.cu` and the `ec_*.cu` / `ec_*.cuh` files next to this
file) have no torch include: they export plain C functions that `__init__.py` calls
through ctypes. They are compiled with `torch.utils.cpp_extension.load(is_python_module=False)`
on first use (ninja compiles the .cu files in parallel), into

    $SGL_ECPATCH_CACHE/kernels/<key>/     (default ~/.cache/sgl-ecpatch/kernels/<key>/)

where <key> hashes the sources, the compiler flags, the torch and CUDA versions and
the GPU arch. A file lock (fcntl) next to that folder makes the tensor-parallel ranks
of one server build once: the first rank builds, the others wait and load. A build
is complete once `build.json` is written; a cached load only hashes the sources and
opens the shared library (no compiler, no ninja run): 0.26-0.42 s in a fresh process on
the H200 machine.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import json
import logging
import os
import re
import shutil
import sys
import time
from pathlib import Path
from typing import Callable, Optional

logger = logging.getLogger(__name__)

KERNEL_DIR = Path(__file__).resolve().parent
# compiled (in parallel), expert_choice.cu (the C interface) first
SOURCES = ("expert_choice.cu", "ec_keys.cu", "ec_select.cu", "ec_token.cu", "ec_fused.cu", "ec_cluster.cu")
HEADERS = ("ec_common.cuh", "ec_token.cuh")  # included; hashed into the cache key with the sources
ABI_VERSION = 11  # must match ec_abi_version() in expert_choice.cu
BASE_CUDA_FLAGS = ("-O3", "-lineinfo", "-std=c++17")
LIB_STEM = "sgl_ecpatch_expert_choice"


class KernelBuildError(RuntimeError):
    """The kernel could not be compiled; the message names the log and first error."""


def cache_root() -> Path:
    base = os.environ.get("SGL_ECPATCH_CACHE")
    root = Path(base).expanduser() if base else Path.home() / ".cache" / "sgl-ecpatch"
    return root / "kernels"


def normalize_arch(arch) -> str:
    """'90', '9.0', 'sm_90', 'sm90', (9, 0), '90a' -> '90' / '90a'; ValueError otherwise."""
    if isinstance(arch, tuple):
        major, minor = arch
        return f"{int(major)}{int(minor)}"
    text = str(arch).strip().lower()
    text = text.removeprefix("sm_").removeprefix("sm").removeprefix("compute_")
    m = re.fullmatch(r"(\d+)\.(\d)([af]?)", text) or re.fullmatch(r"(\d+)(\d)([af]?)", text)
    if not m:
        raise ValueError(f"--arch: {arch!r} is not a CUDA arch (expected e.g. 90, 9.0 or sm_90)")
    major, minor, suffix = m.groups()
    if int(major) < 7:
        raise ValueError(f"--arch: {arch!r} is too old; the kernel needs sm_70 or newer")
    return f"{int(major)}{minor}{suffix}"


def current_arch(device=None) -> Optional[str]:
    """Arch of the given (or current) CUDA device, or None without a usable GPU."""
    try:
        import torch

        if not torch.cuda.is_available():
            return None
        return normalize_arch(torch.cuda.get_device_capability(device))
    except Exception:  # noqa: BLE001 - no GPU is an answer, not an error
        return None


def cuda_flags(arch: str) -> list[str]:
    return [*BASE_CUDA_FLAGS, f"-gencode=arch=compute_{arch},code=sm_{arch}"]


def _cuda_home() -> Optional[str]:
    try:
        from torch.utils.cpp_extension import CUDA_HOME
    except Exception:  # noqa: BLE001
        CUDA_HOME = None  # noqa: N806
    home = CUDA_HOME or os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if not home and shutil.which("nvcc"):
        home = str(Path(shutil.which("nvcc")).resolve().parent.parent)
    return home


def nvcc_version(cuda_home: Optional[str] = None) -> Optional[str]:
    """CUDA toolkit version read from version.json (no subprocess), else from nvcc."""
    home = cuda_home or _cuda_home()
    if not home:
        return None
    vj = Path(home) / "version.json"
    with contextlib.suppress(Exception):
        return json.loads(vj.read_text())["cuda_nvcc"]["version"]
    nvcc = Path(home) / "bin" / "nvcc"
    if nvcc.exists():
        import subprocess

        with contextlib.suppress(Exception):
            out = subprocess.run([str(nvcc), "--version"], capture_output=True, text=True, timeout=30).stdout
            m = re.search(r"release [\d.]+, V([\d.]+)", out)
            if m:
                return m.group(1)
    return None


def environment(arch: str) -> dict:
    """Everything a build depends on besides the sources."""
    import torch

    return {
        "abi": ABI_VERSION,
        "arch": arch,
        "flags": cuda_flags(arch),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "nvcc": nvcc_version(),
        "python": f"{sys.version_info.major}.{sys.version_info.minor}",
    }


def cache_key(arch: str, env: Optional[dict] = None, sources: Optional[dict] = None) -> str:
    """Hash of the sources, flags, torch and CUDA versions and GPU arch."""
    env = env if env is not None else environment(arch)
    if sources is None:
        sources = {name: (KERNEL_DIR / name).read_bytes() for name in SOURCES + HEADERS}
    h = hashlib.sha256()
    for name in sorted(sources):
        h.update(name.encode() + b"\0" + sources[name] + b"\0")
    h.update(json.dumps(env, sort_keys=True).encode())
    return f"sm{arch}-{h.hexdigest()[:16]}"


def build_dir(arch: str) -> Path:
    return cache_root() / cache_key(arch)


def cached_library(arch: str) -> Optional[Path]:
    """Path of a complete cached build for this environment, or None."""
    d = build_dir(arch)
    info = d / "build.json"
    if not info.is_file():
        return None
    with contextlib.suppress(Exception):
        lib = d / json.loads(info.read_text())["library"]
        if lib.is_file():
            return lib
    return None


@contextlib.contextmanager
def file_lock(path: Path):
    """Exclusive advisory lock (fcntl.flock); released by the OS if the holder dies."""
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def first_error_line(log: str) -> str:
    for line in log.splitlines():
        if re.search(r"\berror\b", line, re.IGNORECASE):
            return line.strip()
    lines = [ln.strip() for ln in log.splitlines() if ln.strip()]
    return lines[-1] if lines else "no output"


def _compile(arch: str, out_dir: Path) -> Path:
    """Compile with torch.utils.cpp_extension into out_dir; returns the .so path."""
    from torch.utils import cpp_extension

    name = f"{LIB_STEM}_{out_dir.name.replace('-', '_')}"
    sources = [str(KERNEL_DIR / s) for s in SOURCES]
    # -gencode in the flags makes torch add no arch flags of its own.
    path = cpp_extension.load(
        name=name,
        sources=sources,
        extra_cuda_cflags=cuda_flags(arch),
        build_directory=str(out_dir),
        is_python_module=False,
        verbose=False,
        with_cuda=True,
    )
    return Path(path)


def build(arch: Optional[str] = None, progress: Optional[Callable[[str], None]] = None,
          *, compile_fn: Callable[[str, Path], Path] = _compile) -> Path:
    """Build the kernel for `arch` (default: the current GPU) unless cached; returns the .so.

    `progress(message)` is called at each stage (the CLI shows it under a spinner).
    Raises KernelBuildError with the log path and the first error line on failure.
    """
    say = progress or (lambda _msg: None)
    if arch is None:
        arch = current_arch()
        if arch is None:
            raise KernelBuildError("no CUDA GPU visible: give the target arch (e.g. --arch 90)")
    arch = normalize_arch(arch)
    lib = cached_library(arch)
    if lib is not None:
        return lib
    out_dir = build_dir(arch)
    lock = out_dir.with_name(out_dir.name + ".lock")
    say(f"waiting for the build lock ({lock.name})")
    with file_lock(lock):
        lib = cached_library(arch)  # another rank may have finished it meanwhile
        if lib is not None:
            return lib
        if out_dir.exists():
            shutil.rmtree(out_dir, ignore_errors=True)  # leftovers of a failed build
        out_dir.mkdir(parents=True, exist_ok=True)
        log_path = out_dir / "build.log"
        say(f"compiling {len(SOURCES)} kernel sources for sm_{arch}")
        if progress is None:
            logger.info("expert-choice: building the CUDA kernel for sm_%s once (about 20 s), cache %s",
                        arch, out_dir)
        t0 = time.perf_counter()
        try:
            lib = compile_fn(arch, out_dir)
        except Exception as exc:  # noqa: BLE001 - reported with the log below
            text = f"{type(exc).__name__}: {exc}"
            log_path.write_text(text)
            raise KernelBuildError(
                f"building the expert-choice kernel for sm_{arch} failed: {first_error_line(text)} "
                f"(full log: {log_path})"
            ) from None
        seconds = time.perf_counter() - t0
        info = {"library": lib.name, "seconds": round(seconds, 2), **environment(arch)}
        log_path.write_text(f"built {lib.name} in {seconds:.1f} s\n")
        tmp = out_dir / "build.json.tmp"
        tmp.write_text(json.dumps(info, indent=1))
        tmp.replace(out_dir / "build.json")  # the marker of a complete build
        say(f"built in {seconds:.1f} s")
        return lib


def open_library(path: Path):
    """ctypes handle with the C signatures of expert_choice.cu's interface set."""
    lib = ctypes.CDLL(str(path))
    c = ctypes
    lib.ec_abi_version.restype = c.c_int
    lib.ec_abi_version.argtypes = []
    if lib.ec_abi_version() != ABI_VERSION:
        raise KernelBuildError(f"{path}: C interface version {lib.ec_abi_version()}, expected {ABI_VERSION}")
    lib.ec_workspace_bytes.restype = c.c_longlong
    lib.ec_workspace_bytes.argtypes = [c.c_int, c.c_int, c.c_int]
    lib.ec_fused_max_elems.restype = c.c_int
    lib.ec_fused_max_elems.argtypes = [c.c_int, c.c_int]  # device, shared-memory limit (0: the device's)
    lib.ec_error_string.restype = c.c_char_p
    lib.ec_error_string.argtypes = [c.c_int]
    lib.ec_route.restype = c.c_int
    lib.ec_route.argtypes = [
        c.c_void_p, c.c_int, c.c_int, c.c_int, c.c_int,  # logits, dtype, T, E, k
        c.c_void_p, c.c_int,  # bias, bias dtype
        c.c_void_p, c.c_int, c.c_longlong,  # n_ptr, n_is_64, n_host
        c.c_longlong, c.c_longlong,  # cf num, den
        c.c_int, c.c_int, c.c_int,  # sigmoid, fill_topk, renorm
        c.c_void_p, c.c_void_p, c.c_void_p,  # workspace, out_w, out_id
        c.c_int, c.c_void_p, c.c_int, c.c_int,  # device, stream, PDL allowed, fused max T*E
        c.c_int,  # largest T of the one-cluster path
        c.c_int,  # blocks per expert of the large-T select (-1, 0 or 1: one; 2/4/8: forced)
        c.c_int,  # largest T of the block-per-row path (0: off)
        c.c_int,  # most compares per thread of the one-cluster path's rank form (0: off)
        c.c_int,  # shared memory a block may have, bytes (0: the device's opt-in maximum)
        c.c_int,  # smallest T whose keys kernel takes two rows a warp (E <= 64)
        c.c_int,  # largest T whose keys kernel takes two warps a row (256 < E <= 512)
    ]
    return lib
