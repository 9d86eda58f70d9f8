"""The kernel's build, cache, lock, status line and CLI: everything that runs without a GPU."""

from __future__ import annotations

import ast
import ctypes
import json
import multiprocessing
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from sgl_ecpatch.runtime import kernel
from sgl_ecpatch.runtime.kernel import _build

KERNEL_DIR = Path(kernel.__file__).parent


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SGL_ECPATCH_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "kernels"


def fake_compile(log: Path, seconds: float = 0.0, fail: bool = False):
    """A compile_fn that records each call in `log` and writes a dummy library."""

    def compile_fn(arch, out_dir):
        with open(log, "a") as fh:
            fh.write(f"{arch}\n")
        time.sleep(seconds)
        if fail:
            raise RuntimeError("ninja: build stopped\nexpert_choice.cu(12): error: identifier \"x\" is undefined\n")
        lib = out_dir / "fake.so"
        lib.write_bytes(b"not really a library")
        return lib

    return compile_fn


# ----------------------------------------------------------------------------- key and arch

@pytest.mark.parametrize("text,expected", [
    ("90", "90"), ("9.0", "90"), ("sm_90", "90"), ("sm90", "90"), ((9, 0), "90"),
    ("sm_90a", "90a"), ("8.9", "89"), ("100", "100"), ("10.0", "100"), ("120", "120"),
])
def test_normalize_arch(text, expected):
    assert _build.normalize_arch(text) == expected


@pytest.mark.parametrize("bad", ["", "hopper", "5x", "6.1", "sm_"])
def test_normalize_arch_rejects(bad):
    with pytest.raises(ValueError, match="--arch"):
        _build.normalize_arch(bad)


def test_cache_key_depends_on_every_input():
    env = {"abi": 1, "arch": "90", "flags": ["-O3"], "torch": "2.11.0", "torch_cuda": "13.0", "nvcc": "13.0.88"}
    src = {"expert_choice.cu": b"kernel source"}
    key = _build.cache_key("90", env, src)
    assert key == _build.cache_key("90", dict(env), dict(src)), "the key must be stable"
    assert key.startswith("sm90-")
    changed = [
        _build.cache_key("90", env, {"expert_choice.cu": b"kernel source 2"}),
        _build.cache_key("90", {**env, "flags": ["-O2"]}, src),
        _build.cache_key("90", {**env, "torch": "2.12.0"}, src),
        _build.cache_key("90", {**env, "torch_cuda": "12.8"}, src),
        _build.cache_key("90", {**env, "nvcc": "12.9.1"}, src),
        _build.cache_key("80", {**env, "arch": "80"}, src),
    ]
    assert len({key, *changed}) == len(changed) + 1


def test_cache_key_covers_every_kernel_source_file():
    """A header edit must give a new build: every .cu and .cuh next to the Python files is
    hashed (and every .cu is compiled), so a source added later cannot escape the key."""
    on_disk = {p.name for p in KERNEL_DIR.iterdir() if p.suffix in (".cu", ".cuh", ".cpp", ".h")}
    assert on_disk == set(_build.SOURCES) | set(_build.HEADERS)
    assert {n for n in on_disk if n.endswith(".cu")} == set(_build.SOURCES)
    env = {"abi": 1, "arch": "90"}
    src = {name: (KERNEL_DIR / name).read_bytes() for name in _build.SOURCES + _build.HEADERS}
    assert _build.cache_key("90", env) == _build.cache_key("90", env, src)
    for name in _build.HEADERS:
        edited = {**src, name: src[name] + b"\n// edited\n"}
        assert _build.cache_key("90", env, edited) != _build.cache_key("90", env, src), name


def test_default_key_covers_the_real_sources_and_flags():
    env = _build.environment("90")
    assert env["arch"] == "90" and env["torch"] == torch.__version__
    assert "-gencode=arch=compute_90,code=sm_90" in env["flags"]
    assert _build.cache_key("90") == _build.cache_key("90", env)
    assert _build.cache_key("90") != _build.cache_key("100")


def test_cache_root_follows_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("SGL_ECPATCH_CACHE", str(tmp_path))
    assert _build.cache_root() == tmp_path / "kernels"
    monkeypatch.delenv("SGL_ECPATCH_CACHE")
    assert _build.cache_root() == Path.home() / ".cache" / "sgl-ecpatch" / "kernels"


# ----------------------------------------------------------------------------- build and cache

def test_build_once_then_cached(cache, tmp_path):
    log = tmp_path / "calls.txt"
    messages = []
    lib = _build.build("90", progress=messages.append, compile_fn=fake_compile(log))
    assert lib.is_file() and lib.parent.parent == cache
    info = json.loads((lib.parent / "build.json").read_text())
    assert info["arch"] == "90" and info["library"] == lib.name and info["seconds"] >= 0
    assert any("compiling" in m for m in messages) and any("built in" in m for m in messages)
    again = _build.build("sm_90", compile_fn=fake_compile(log))
    assert again == lib
    assert log.read_text().splitlines() == ["90"], "a cached build must not compile again"
    assert _build.cached_library("90") == lib
    assert _build.cached_library("80") is None


def test_failed_build_names_log_and_first_error(cache, tmp_path):
    log = tmp_path / "calls.txt"
    with pytest.raises(_build.KernelBuildError) as info:
        _build.build("90", compile_fn=fake_compile(log, fail=True))
    message = str(info.value)
    assert 'error: identifier "x" is undefined' in message
    log_path = Path(message.split("full log: ")[1].rstrip(")"))
    assert log_path.is_file() and "ninja: build stopped" in log_path.read_text()
    assert _build.cached_library("90") is None, "a failed build must not count as cached"
    # the next attempt starts clean and succeeds
    lib = _build.build("90", compile_fn=fake_compile(log))
    assert lib.is_file() and not (lib.parent / "fake.so").read_bytes() == b""


def _build_in_child(cache_dir, log, out):
    import os

    os.environ["SGL_ECPATCH_CACHE"] = cache_dir
    lib = _build.build("90", compile_fn=fake_compile(Path(log), seconds=1.0))
    Path(out).write_text(str(lib))


@pytest.mark.skipif(sys.platform != "linux", reason="fork start method")
def test_lock_makes_parallel_ranks_build_once(cache, tmp_path):
    """Four 'tensor-parallel ranks' start together: one compiles, all load the same library."""
    ctx = multiprocessing.get_context("fork")
    log = tmp_path / "calls.txt"
    outs = [tmp_path / f"rank{i}.txt" for i in range(4)]
    procs = [ctx.Process(target=_build_in_child, args=(str(cache.parent), str(log), str(o))) for o in outs]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    assert log.read_text().splitlines() == ["90"], "exactly one rank compiles"
    assert len({o.read_text() for o in outs}) == 1


def test_file_lock_is_exclusive(tmp_path):
    lock = tmp_path / "x.lock"
    ctx = multiprocessing.get_context("fork")
    started = ctx.Event()

    def hold():
        with _build.file_lock(lock):
            started.set()
            time.sleep(1.0)

    p = ctx.Process(target=hold)
    p.start()
    assert started.wait(10)
    t0 = time.monotonic()
    with _build.file_lock(lock):
        waited = time.monotonic() - t0
    p.join()
    assert waited > 0.5, "the second holder must wait for the first"


def test_first_error_line():
    assert _build.first_error_line("a\nb.cu(3): error: bad\nc") == "b.cu(3): error: bad"
    assert _build.first_error_line("nothing here\nlast line") == "last line"
    assert _build.first_error_line("") == "no output"


# ----------------------------------------------------------------------------- status and load

def test_build_status_without_gpu(cache, monkeypatch):
    monkeypatch.setattr(_build, "current_arch", lambda device=None: None)
    line = kernel.build_status()
    assert line.startswith("CUDA kernel: no GPU visible") and "--arch 90" in line
    assert "\n" not in line


def test_build_status_cached_or_not(cache, tmp_path, monkeypatch):
    monkeypatch.setattr(_build, "current_arch", lambda device=None: "90")
    assert kernel.build_status().startswith("CUDA kernel: not built for sm_90")
    assert "ecpatch build-kernel" in kernel.build_status()
    _build.build("90", compile_fn=fake_compile(tmp_path / "calls.txt"))
    line = kernel.build_status()
    assert line.startswith("CUDA kernel: built for sm_90") and str(cache) in line
    monkeypatch.setattr(_build, "current_arch", lambda device=None: None)
    assert "1 cached build(s)" in kernel.build_status()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU answer")
def test_try_load_without_gpu_never_raises():
    mod, reason = kernel.try_load()
    assert mod is None and "no CUDA GPU" in reason
    mod, reason = kernel.try_load("cuda:3")
    assert mod is None and reason


def test_knobs_read_from_the_environment(monkeypatch):
    for name in kernel.KNOBS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.delenv(kernel.PDL_KNOB, raising=False)
    assert kernel.knob("SGL_ECPATCH_KERNEL_KEYS_HALF_MIN_T") == 4097
    assert kernel.knobs_set() == []
    monkeypatch.setenv("SGL_ECPATCH_KERNEL_KEYS_HALF_MIN_T", " 8193 ")
    monkeypatch.setenv("SGL_ECPATCH_KERNEL_RANK_MAX", "")  # empty: the default
    assert kernel.knob("SGL_ECPATCH_KERNEL_KEYS_HALF_MIN_T") == 8193
    assert kernel.knob("SGL_ECPATCH_KERNEL_RANK_MAX") == kernel.RANK_MAX_DEFAULT
    monkeypatch.setenv("SGL_ECPATCH_KERNEL_FUSED_MAX", "16k")
    with pytest.raises(ValueError, match="SGL_ECPATCH_KERNEL_FUSED_MAX='16k' is not an integer"):
        kernel.knob("SGL_ECPATCH_KERNEL_FUSED_MAX")
    monkeypatch.setenv(kernel.PDL_KNOB, "0")
    assert kernel.knobs_set() == [
        "SGL_ECPATCH_KERNEL_PDL=0 (PDL off)",
        "SGL_ECPATCH_KERNEL_FUSED_MAX='16k' (not an integer: every kernel call would raise)",
        "SGL_ECPATCH_KERNEL_RANK_MAX=96 (the default)",
        "SGL_ECPATCH_KERNEL_KEYS_HALF_MIN_T=8193",
    ]


def test_import_builds_nothing(tmp_path):
    code = ("import os, sys; os.environ['SGL_ECPATCH_CACHE'] = sys.argv[1]; "
            "import sgl_ecpatch.runtime.kernel as k; "
            "assert not os.path.exists(os.path.join(sys.argv[1], 'kernels')); print('ok')")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "ok" in out.stdout


@pytest.mark.parametrize("cf,num_experts,expected", [
    (1.25, 64, (5, 4)), (1.0, 64, (1, 1)), (1 / 3, 64, (1, 3)), (0.3, 8, (3, 10)),
    (1e9, 64, (64, 1)), (64.0, 64, (64, 1)), (1e-4, 64, (0, 1)),
])
def test_capacity_fraction(cf, num_experts, expected):
    assert kernel.capacity_fraction(cf, num_experts) == expected


def test_supports():
    assert kernel.supports(512, 16) is None and kernel.supports(1024, 32) is None
    assert "1024" in kernel.supports(1025, 8)
    assert "32" in kernel.supports(512, 33)


def test_cpu_tensor_is_refused_with_value_error():
    with pytest.raises(ValueError, match="CUDA tensor"):
        kernel.expert_choice_topk_cuda(torch.randn(4, 8), 2)
    with pytest.raises(ValueError, match="top_k"):
        kernel.expert_choice_topk_cuda(torch.randn(4, 8), 0)
    with pytest.raises(ValueError, match="fill"):
        kernel.expert_choice_topk_cuda(torch.randn(4, 8), 2, fill="all")
    with pytest.raises(ValueError, match="router_logits"):
        kernel.expert_choice_topk_cuda(torch.randn(4), 2)


# ----------------------------------------------------------------------------- vendoring

STDLIB = set(getattr(sys, "stdlib_module_names", ())) or {
    "contextlib", "ctypes", "fcntl", "fractions", "hashlib", "json", "logging", "math", "os", "re",
    "shutil", "subprocess", "sys", "threading", "time", "typing", "pathlib", "__future__"}


def test_kernel_package_is_vendorable():
    """Relative imports only, torch + stdlib only, sources next to the Python files."""
    for path in KERNEL_DIR.glob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module]
            for name in names:
                top = name.split(".")[0]
                assert top == "torch" or top in STDLIB, f"{path.name} imports {name}"
    for src in _build.SOURCES + _build.HEADERS:
        assert (KERNEL_DIR / src).is_file()
        assert "torch/" not in (KERNEL_DIR / src).read_text(), "the sources stay free of torch headers"


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="needs nvcc")
def test_cu_compiles_for_sm90_without_spills(tmp_path):
    # each .cu on its own, as ninja compiles them (two at a time: this machine may have two cores)
    from concurrent.futures import ThreadPoolExecutor

    def compile_one(src):
        cmd = ["nvcc", *_build.cuda_flags("90"), "-Xcompiler", "-fPIC", "-Xptxas", "-v", "-c",
               str(KERNEL_DIR / src), "-o", str(tmp_path / (src + ".o"))]
        return src, subprocess.run(cmd, capture_output=True, text=True, timeout=600)

    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(compile_one, _build.SOURCES))
    kernels = 0
    for src, out in results:
        assert out.returncode == 0, f"{src}: {out.stderr}"
        spills = [ln for ln in out.stderr.splitlines() if "spill" in ln and not ln.strip().startswith("0 bytes stack")]
        assert not [s for s in spills if " 0 bytes spill stores, 0 bytes spill loads" not in s], (src, spills)
        kernels += out.stderr.count("bytes spill")
    assert kernels >= 70, f"{kernels} kernels compiled; the split into files lost some"
    # the objects link into one library that loads without a GPU (every launcher the
    # dispatch calls is instantiated somewhere); its C interface version and the number of
    # ec_route's parameters agree with what the Python side declares
    lib_path = tmp_path / "ec.so"
    objs = [str(tmp_path / (src + ".o")) for src in _build.SOURCES]
    out = subprocess.run(["nvcc", "-shared", *objs, "-o", str(lib_path)], capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    lib = _build.open_library(lib_path)
    source = (KERNEL_DIR / "expert_choice.cu").read_text()
    params = re.search(r"int ec_route\(([^)]*)\)", source).group(1)
    assert len(lib.ec_route.argtypes) == params.count(",") + 1
    args = [None if t is ctypes.c_void_p else 0 for t in lib.ec_route.argtypes]
    assert lib.ec_route(*args) == -1  # E = 0: refused before any CUDA call
    # a workspace that 16-byte loads of the threshold words could not read (v36) is refused,
    # also before any CUDA call: T = 4, E = 8, k = 2, workspace at address 8
    args[2], args[3], args[4] = 4, 8, 2
    args[15] = 8
    assert lib.ec_route(*args) == -4
    assert b"16-byte aligned" in lib.ec_error_string(-4)


# ----------------------------------------------------------------------------- CLI

def _app():
    from sgl_ecpatch.cli import app

    return app


def test_build_kernel_help():
    result = CliRunner().invoke(_app(), ["build-kernel", "--help"])
    assert result.exit_code == 0, result.output
    assert "--arch" in result.output and "Build the expert-choice CUDA kernel" in result.output
    assert CliRunner().invoke(_app(), ["build-kernel", "-h"]).exit_code == 0


def test_build_kernel_bad_arch_is_usage_error():
    result = CliRunner().invoke(_app(), ["build-kernel", "--arch", "hopper"])
    assert result.exit_code == 2
    assert "--arch" in result.output


def test_build_kernel_prints_the_library_path(cache, tmp_path, monkeypatch):
    log = tmp_path / "calls.txt"
    real = _build.build
    monkeypatch.setattr(kernel, "build", lambda arch=None, progress=None: real(arch, progress,
                                                                               compile_fn=fake_compile(log)))
    result = CliRunner().invoke(_app(), ["build-kernel", "--arch", "9.0"])
    assert result.exit_code == 0, result.output
    lib = _build.cached_library("90")
    assert str(lib) in result.stdout
    again = CliRunner().invoke(_app(), ["build-kernel", "--arch", "90"])
    assert again.exit_code == 0 and "already built" in again.output
    assert log.read_text().splitlines() == ["90"]


def test_build_kernel_failure_exit_code(cache, tmp_path, monkeypatch):
    real = _build.build
    monkeypatch.setattr(kernel, "build", lambda arch=None, progress=None: real(
        arch, progress, compile_fn=fake_compile(tmp_path / "c.txt", fail=True)))
    result = CliRunner().invoke(_app(), ["build-kernel", "--arch", "90"])
    assert result.exit_code == 1
    assert "error" in result.output and "build.log" in result.output
