"""Shared pytest fixtures.

`sglang_release` (parametrized over the releases in `tests/sglang_wheels.VERSIONS`) and the
`sglang_wheel` factory give the unpacked ``sglang`` package of a released wheel, downloaded
once into the cache (`.cache/sglang-wheels/`, or `$ECPATCH_TEST_CACHE`). Tests that use them
must be marked ``network``; they skip with the reason when the download fails. Copy files to
`tmp_path` before changing them: the cache is shared.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

import sglang_wheels  # noqa: E402


def _package(version: str) -> Path:
    try:
        return sglang_wheels.sglang_package(version)
    except sglang_wheels.WheelUnavailable as exc:
        pytest.skip(f"SGLang {version} wheel unavailable: {exc}")


@pytest.fixture(scope="session")
def sglang_wheel():
    """Factory: `sglang_wheel("0.5.23")` -> the unpacked ``sglang`` package directory."""
    return _package


@pytest.fixture(scope="session", params=sglang_wheels.VERSIONS)
def sglang_release(request) -> tuple[str, Path]:
    """(version, unpacked ``sglang`` package directory) for each tested release."""
    return request.param, _package(request.param)
