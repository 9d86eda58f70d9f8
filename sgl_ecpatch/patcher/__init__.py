"""The patch engine: pure functions over source text, and the file plumbing around them.

    from sgl_ecpatch.patcher import enable_source, disable_source, inspect_source, PatchOptions

`inspect_source` / `find_calls` use the stdlib `ast` only (fast, for ``status``);
`enable_source` / `disable_source` use libcst and are imported on first use.
"""

from __future__ import annotations

from .calls import find_calls, inspect_source
from .model import (
    DEFAULT_CAPACITY_FACTOR,
    DEFAULT_ENV_VAR,
    MARKER,
    OS_IMPORT,
    VENDORED_IMPORT,
    CallInfo,
    Changed,
    Failed,
    Inspection,
    Mode,
    PatchOptions,
    PatchResult,
    State,
    Unchanged,
    env_switch_expression,
    env_value,
)

__all__ = [
    "DEFAULT_CAPACITY_FACTOR", "DEFAULT_ENV_VAR", "MARKER", "OS_IMPORT", "VENDORED_IMPORT",
    "CallInfo", "Changed", "Failed", "Inspection", "Mode", "PatchOptions", "PatchResult", "State",
    "Unchanged", "env_switch_expression", "env_value", "find_calls", "inspect_source",
    "enable_source", "disable_source",
]


def __getattr__(name: str):
    # libcst costs an import that `status` does not need.
    if name in ("enable_source", "disable_source"):
        from . import rewrite

        return getattr(rewrite, name)
    raise AttributeError(name)
