"""Golden before/after pairs under tests/fixtures/<case>/ (written for ecpatch, SGLang-style).

Each case has ``input.py.txt`` and, when enable changes it, ``expected.py.txt`` (enable with
the default options). A case without ``expected.py.txt`` must come back unchanged, with every
call reported as unsupported. Optional extra expectations:

* ``expected_mode_on.py.txt``: ``enable --mode on --capacity-factor 2`` on the input;
* ``expected_set_false.py.txt``: ``disable --set-false`` on ``expected.py.txt``.

Every case also checks stability: enable again changes nothing, and ``disable --remove``
after enable gives back the input byte for byte (for an input that is already patched: the
same bytes as ``disable --remove`` of the input).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from sgl_ecpatch.patcher import (
    MARKER,
    Changed,
    Mode,
    PatchOptions,
    State,
    Unchanged,
    disable_source,
    enable_source,
    find_calls,
)

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"
CASES = sorted(p.name for p in FIXTURES.iterdir() if (p / "input.py.txt").is_file())


def read(path: Path) -> str:
    # bytes -> str without newline translation: CRLF fixtures must stay CRLF
    return path.read_bytes().decode("utf-8")


def test_there_are_cases():
    assert len(CASES) >= 20


@pytest.mark.parametrize("case", CASES)
def test_enable_matches_golden(case):
    source = read(FIXTURES / case / "input.py.txt")
    expected = FIXTURES / case / "expected.py.txt"
    result = enable_source(source)
    if expected.is_file():
        assert isinstance(result, Changed), result
        assert result.new_code == read(expected)
    else:
        assert isinstance(result, Unchanged), result
        calls = find_calls(source)
        assert calls and all(c.state == State.unsupported and c.reason for c in calls)
        assert len(result.unsupported) == len(calls)


@pytest.mark.parametrize("case", CASES)
def test_stability(case):
    source = read(FIXTURES / case / "input.py.txt")
    result = enable_source(source)
    patched = result.new_code if isinstance(result, Changed) else source
    assert isinstance(enable_source(patched), Unchanged), "a second enable must change nothing"

    removed = disable_source(patched)
    restored = removed.new_code if isinstance(removed, Changed) else patched
    if MARKER not in source:
        assert restored.encode() == source.encode()
    else:
        original = disable_source(source)
        assert restored == (original.new_code if isinstance(original, Changed) else source)
    assert isinstance(disable_source(restored), Unchanged)


@pytest.mark.parametrize("case", [c for c in CASES if (FIXTURES / c / "expected_mode_on.py.txt").is_file()])
def test_mode_on_golden(case):
    source = read(FIXTURES / case / "input.py.txt")
    result = enable_source(source, PatchOptions(mode=Mode.on, capacity_factor=2.0))
    assert isinstance(result, Changed)
    assert result.new_code == read(FIXTURES / case / "expected_mode_on.py.txt")
    # switching back to env mode updates the same call in place
    back = enable_source(result.new_code)
    assert isinstance(back, Changed) and back.new_code == read(FIXTURES / case / "expected.py.txt")


@pytest.mark.parametrize("case", [c for c in CASES if (FIXTURES / c / "expected_set_false.py.txt").is_file()])
def test_set_false_golden(case):
    patched = read(FIXTURES / case / "expected.py.txt")
    result = disable_source(patched, remove=False)
    assert isinstance(result, Changed)
    assert result.new_code == read(FIXTURES / case / "expected_set_false.py.txt")
    assert isinstance(disable_source(result.new_code, remove=False), Unchanged)
    # --remove from the set-false state still gives back the original input
    removed = disable_source(result.new_code)
    assert isinstance(removed, Changed)
    assert removed.new_code == read(FIXTURES / case / "input.py.txt")
    assert all(c.state == State.false for c in find_calls(result.new_code))
