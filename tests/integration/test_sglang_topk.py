"""The vendored TopK inside a real SGLang 0.5.23 (CPU), built from model files that
`ecpatch enable` patched: switch on -> ROUTING.md's routing; switch off -> SGLang's TopK.

SGLang is installed once into .cache/ (tests/sglang_env.py); each test module copies the
``sglang`` package into a temporary directory, patches it with the real CLI, and imports
it in subprocesses (the patched files read the switch from the environment at
construction, so each setting gets a fresh interpreter).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(TESTS))

import sglang_env  # noqa: E402

pytestmark = pytest.mark.network  # installs SGLang 0.5.23 from the package index once (cached)

MODEL_FILES = {
    # module: (experts, top_k, norm_topk_prob) of the public model cards; ernie has two calls
    "sglang.srt.models.qwen2_moe": (60, 4, False),
    "sglang.srt.models.qwen3_moe": (128, 8, True),
    "sglang.srt.models.ernie45_moe_vl": (64, 6, True),
}


def ecpatch(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sgl_ecpatch", *args], capture_output=True, text=True,
                          cwd=cwd)


@pytest.fixture(scope="module")
def patched_tree(tmp_path_factory) -> Path:
    """A copy of SGLang 0.5.23 with the three model files enabled (env mode); its parent dir."""
    try:
        parent = tmp_path_factory.mktemp("sglang-patched")
        root = sglang_env.copy_sglang(parent)
    except sglang_env.SGLangUnavailable as exc:  # pragma: no cover - network trouble
        pytest.fail(f"could not install SGLang {sglang_env.SGLANG_VERSION}: {exc}")
    files = [str(root / "srt" / "models" / (name.rsplit(".", 1)[1] + ".py")) for name in MODEL_FILES]
    proc = ecpatch("enable", *files)
    assert proc.returncode == 0, proc.stderr
    assert (root / "srt" / "layers" / "moe" / "expert_choice" / "topk_layer.py").is_file()
    return parent


def run_checks(parent: Path, code: str, env: dict | None = None) -> str:
    proc = sglang_env.run_python(code, sglang_parent=parent, env=env)
    assert proc.returncode == 0, f"stdout:\n{proc.stdout[-4000:]}\nstderr:\n{proc.stderr[-6000:]}"
    return proc.stdout


@pytest.mark.parametrize("switch", ["on", "off"])
@pytest.mark.parametrize("module_name", list(MODEL_FILES))
def test_patched_model_file_topk(patched_tree, module_name, switch):
    experts, top_k, norm = MODEL_FILES[module_name]
    spec = json.dumps(dict(module_name=module_name, num_experts=experts, top_k=top_k, norm=norm, switch=switch))
    code = f"""
        import sys
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        import sglang_checks
        sglang_checks.main({spec!r})
    """
    out = run_checks(patched_tree, code, env={"SGLANG_EXPERT_CHOICE": "1" if switch == "on" else "0"})
    calls = 2 if module_name.endswith("ernie45_moe_vl") else 1
    assert out.count("PASS ") == calls, out


def test_layer_features(patched_tree):
    """Adaptive, hybrid, bad settings, refusals, vacant slots per runner, padding, EPLB, stamp."""
    sys.path.insert(0, str(Path(__file__).parent))
    import sglang_checks

    names = sglang_checks.FEATURE_CHECKS
    assert len(names) >= 8
    code = f"""
        import sys
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        import sglang_checks
        sglang_checks.main({json.dumps({"features": names})!r})
    """
    proc = sglang_env.run_python(code, sglang_parent=patched_tree)
    passed = {line.split()[1] for line in proc.stdout.splitlines() if line.startswith("PASS ")}
    assert passed == set(names), f"failed: {sorted(set(names) - passed)}\n{proc.stdout[-3000:]}\n{proc.stderr[-8000:]}"
