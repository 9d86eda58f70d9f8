"""Download and unpack released SGLang wheels as test material.

The wheels are fetched once with ``pip download --no-deps sglang==X`` into a cache
(``.cache/sglang-wheels/`` at the repository root, or ``$ECPATCH_TEST_CACHE``) and
unzipped next to the wheel. Nothing here is ever committed: the cache is git-ignored.

Run it directly to warm the cache:  ``python tests/sglang_wheels.py 0.5.7 0.5.23``
"""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

VERSIONS = ("0.5.7", "0.5.23")
REPO_ROOT = Path(__file__).resolve().parent.parent


def cache_dir() -> Path:
    """Where wheels and their unpacked trees live."""
    override = os.environ.get("ECPATCH_TEST_CACHE")
    base = Path(override) if override else REPO_ROOT / ".cache"
    return base / "sglang-wheels"


class WheelUnavailable(RuntimeError):
    """The wheel could not be downloaded (no network, no such release)."""


def sglang_package(version: str) -> Path:
    """Return the unpacked ``sglang`` package directory of release ``version``.

    Downloads and unpacks the wheel on first use. Raises WheelUnavailable when the
    download fails, so tests can skip with the reason.
    """
    root = cache_dir() / version
    unpacked = root / "unpacked"
    package = unpacked / "sglang"
    done = unpacked / ".complete"
    if done.is_file():
        return package
    root.mkdir(parents=True, exist_ok=True)
    wheels = sorted(root.glob(f"sglang-{version}-*.whl"))
    if not wheels:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--disable-pip-version-check", "-q", "-d", str(root), f"sglang=={version}"]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        wheels = sorted(root.glob(f"sglang-{version}-*.whl"))
        if proc.returncode != 0 or not wheels:
            raise WheelUnavailable(
                f"pip download sglang=={version} failed: {proc.stderr.strip()[-400:]}")
    with zipfile.ZipFile(wheels[-1]) as wheel:
        members = [name for name in wheel.namelist() if name.startswith("sglang/")]
        wheel.extractall(unpacked, members=members)
    done.write_text(wheels[-1].name + "\n")
    return package


def model_files_with_topk(package: Path) -> list[Path]:
    """Every ``.py`` file under ``package`` whose text calls ``TopK(``."""
    found = []
    for path in sorted(package.rglob("*.py")):
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        if "TopK(" in text and "/layers/" not in path.as_posix():
            found.append(path)
    return found


if __name__ == "__main__":
    for wanted in sys.argv[1:] or VERSIONS:
        pkg = sglang_package(wanted)
        print(wanted, pkg, len(model_files_with_topk(pkg)), "files with TopK(")
