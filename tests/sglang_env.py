"""A real SGLang 0.5.23 that imports on this CPU, for the integration tests.

SGLang's wheel pins CUDA torch 2.14.1 and ~80 packages; routing code needs few of them.
`ensure_site()` installs, once, into ``.cache/sglang-0.5.23-site/`` (git-ignored):

    pip install --no-deps --target .cache/sglang-0.5.23-site sglang==0.5.23 <RUNTIME_DEPS>

`RUNTIME_DEPS` is the minimal set that ``import sglang.srt.layers.moe.topk`` and the model
files ``qwen2_moe``, ``qwen3_moe`` and ``ernie45_moe_vl`` need, found by importing them in a
venv that has only torch 2.13 (CPU) and this project's own dependencies. Each is pinned:
to SGLang's own pin where it has one (transformers, tokenizers, openai, ...), else to the
release tested here. The torch of the test venv (2.13 CPU) is used, not SGLang's 2.14.1
pin: the routing path (``TopK.forward_native``) runs on it unchanged.

One shim, in `BOOTSTRAP`, and why: SGLang imports ``torchvision.transforms`` at module
level (multimodal helpers on the import path of the MoE layers). PyPI's torchvision wheel
is a CUDA build whose ``_C`` extension cannot load with CPU torch; torchvision then still
imports, except that it registers fake (meta) kernels for two of its C++ operators
(``torchvision::nms`` and ``qnms``), which fails when they were never defined. The
bootstrap defines those two operator schemas (no kernels) before SGLang is imported.
Nothing on the routing path uses torchvision.

Tests copy the ``sglang`` package into ``tmp_path`` (`copy_sglang`), enable files there,
and run Python in a subprocess with ``PYTHONPATH=<copy>:<site>`` (`run_python`), after
`BOOTSTRAP` (which also publishes ``ServerArgs(model_path="dummy", device="cpu")`` as the
scheduler's runtime context: SGLang's TopK reads it at construction).

Run directly to warm the cache:  ``python tests/sglang_env.py``
"""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

SGLANG_VERSION = "0.5.23"
REPO_ROOT = Path(__file__).resolve().parent.parent

RUNTIME_DEPS = (
    "aiohappyeyeballs==2.7.1",
    "aiohttp==3.14.5",
    "aiosignal==1.4.0",
    "annotated-types==0.8.0",
    "anyio==4.16.0",
    "apache-tvm-ffi==0.1.11",
    "attrs==26.1.0",
    "certifi==2026.10.19.post1",
    "charset-normalizer==3.4.4",
    "compressed-tensors==0.18.0",
    "dill==0.4.1",
    "distro==1.9.0",
    "einops==0.8.2",
    "frozenlist==1.8.0",
    "gguf==0.19.0",
    "h11==0.16.0",
    "httpcore==1.0.9",
    "httpx==0.28.1",
    "huggingface-hub==1.31.0",
    "idna==3.20",
    "ipython==9.18.1",
    "loguru==0.7.3",
    "msgspec==0.22.0",
    "multidict==7.2.1",
    "openai==2.8.0",
    "orjson==3.13.0",
    "partial-json-parser==0.2.1.1.post7",
    "pillow==13.0.0",
    "propcache==0.5.4",
    "psutil==7.2.2",
    "pybase64==1.5.1",
    "pydantic==2.14.4",
    "pydantic-core==2.50.5",
    "pyzmq==27.3.0",
    "regex==2026.11.19",
    "requests==2.34.2",
    "safetensors==0.8.0",
    "sentencepiece==0.2.1",
    "sniffio==1.3.1",
    "starlette==1.10.0",
    "tokenizers==0.23.2",
    "torchvision==0.28.0",
    "tqdm==4.70.1",
    "traitlets==5.16.1",
    "transformers==5.19.0",
    "triton==3.8.0",
    "typing-inspection==0.4.5",
    "urllib3==2.8.0",
    "yarl==1.25.1",
)

BOOTSTRAP = textwrap.dedent(
    """
    import sys as _sys
    import torch as _torch

    try:
        import torchvision as _torchvision  # noqa: F401
    except RuntimeError as _exc:
        # torchvision's CUDA _C could not load with this (CPU) torch: define the two operator
        # schemas it registers fake kernels for, then import it again (see sglang_env.py).
        if "torchvision::" not in str(_exc):
            raise
        for _name in [m for m in _sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
            del _sys.modules[_name]
        _ecpatch_tv = _torch.library.Library("torchvision", "DEF")
        _ecpatch_tv.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        _ecpatch_tv.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        import torchvision as _torchvision  # noqa: F401

    from sglang.srt.runtime_context import publish as _publish
    from sglang.srt.server_args import ServerArgs as _ServerArgs

    _publish(_ServerArgs(model_path="dummy", device="{device}"), role="scheduler")
    """
)


class SGLangUnavailable(RuntimeError):
    """SGLang or its dependencies could not be installed."""


def cache_root() -> Path:
    override = os.environ.get("ECPATCH_TEST_CACHE")
    return Path(override) if override else REPO_ROOT / ".cache"


def site_dir(version: str = SGLANG_VERSION) -> Path:
    return cache_root() / f"sglang-{version}-site"


def ensure_site(version: str = SGLANG_VERSION) -> Path:
    """The --target directory holding sglang and `RUNTIME_DEPS` (installed on first use).

    Installs into a staging directory and renames it, under a file lock, so parallel test
    processes install once and never see half an install.
    """
    site = site_dir(version)
    done = site / ".ecpatch-complete"
    if done.is_file():
        return site
    site.parent.mkdir(parents=True, exist_ok=True)
    with open(site.parent / f".sglang-{version}-site.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if done.is_file():
            return site
        staging = site.with_name(site.name + ".staging")
        shutil.rmtree(staging, ignore_errors=True)
        cmd = [sys.executable, "-m", "pip", "install", "--no-deps", "--disable-pip-version-check", "-q",
               "--target", str(staging), f"sglang=={version}", *RUNTIME_DEPS]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            shutil.rmtree(staging, ignore_errors=True)
            raise SGLangUnavailable(f"{' '.join(cmd[:9])} ... failed:\n{proc.stderr[-2000:]}")
        (staging / ".ecpatch-complete").write_text(" ".join(RUNTIME_DEPS) + "\n")
        shutil.rmtree(site, ignore_errors=True)
        os.rename(staging, site)
    return site


def copy_sglang(destination: Path, version: str = SGLANG_VERSION) -> Path:
    """Copy the installed ``sglang`` package to ``destination/sglang``; return that directory."""
    source = ensure_site(version) / "sglang"
    target = Path(destination) / "sglang"
    shutil.copytree(source, target, ignore=shutil.ignore_patterns("__pycache__"), symlinks=True)
    return target


def run_python(code: str, *, sglang_parent: Path, env: dict | None = None, timeout: float = 600,
               device: str = "cpu", version: str = SGLANG_VERSION) -> subprocess.CompletedProcess:
    """Run `BOOTSTRAP` + `code` in a fresh interpreter that imports SGLang from `sglang_parent`.

    `sglang_parent` is the directory that holds the (copied) ``sglang`` package; the
    dependencies come from the cached site directory, this project from the test venv.
    """
    paths = [str(sglang_parent), str(ensure_site(version)), str(REPO_ROOT)]
    full_env = {key: value for key, value in os.environ.items() if not key.startswith("SGLANG_")}
    full_env.update({
        "PYTHONPATH": os.pathsep.join(paths),
        "PYTHONDONTWRITEBYTECODE": "1",
        "PYTHONWARNINGS": "ignore",
    })
    full_env.update(env or {})
    program = BOOTSTRAP.replace("{device}", device) + "\n" + textwrap.dedent(code)
    return subprocess.run([sys.executable, "-c", program],
                          capture_output=True, text=True, env=full_env, timeout=timeout, cwd=str(sglang_parent))


# Of RUNTIME_DEPS, these are already in the lent GPU machine's image (KINDS.md's package
# list, read 2026-11-17; its torch is 2.11 with CUDA, and triton/torchvision match it).
GPU_IMAGE_HAS = frozenset({
    "aiohappyeyeballs", "aiohttp", "aiosignal", "anyio", "attrs", "certifi", "charset-normalizer", "einops",
    "frozenlist", "h11", "httpcore", "httpx", "huggingface-hub", "idna", "multidict", "pillow", "propcache",
    "psutil", "regex", "requests", "safetensors", "sentencepiece", "tokenizers", "torchvision", "tqdm",
    "transformers", "triton", "urllib3", "yarl",
})


def download_gpu_wheels(destination: Path, version: str = SGLANG_VERSION) -> list:
    """Fetch cp312 wheels of sglang and the RUNTIME_DEPS the GPU image lacks, for `.whl/`."""
    wanted = [f"sglang=={version}"] + [d for d in RUNTIME_DEPS if d.split("==")[0] not in GPU_IMAGE_HAS]
    platforms = ["manylinux_2_34_x86_64", "manylinux_2_28_x86_64", "manylinux_2_27_x86_64",
                 "manylinux_2_17_x86_64", "manylinux2014_x86_64", "manylinux1_x86_64", "any"]
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--python-version", "3.12",
           "--implementation", "cp", "--disable-pip-version-check", "-q", "-d", str(destination)]
    for platform in platforms:
        cmd += ["--platform", platform]
    subprocess.run(cmd + wanted, check=True)
    return wanted


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--download-gpu-wheels":
        print("\n".join(download_gpu_wheels(Path(sys.argv[2]))))
    else:
        print(ensure_site())
