"""Small immutable values shared by the patch engine, the CLI and the other areas.

What ecpatch adds to a model file is recognisable in the file itself (no side database):

* two keyword arguments at the end of a ``TopK(...)`` call:
  ``use_expert_choice=<switch>`` and ``expert_capacity_factor=<float>``, where the switch is
  ``True``, ``False`` or exactly ``os.environ.get("NAME", "0") == "1"``;
* the line ``from sglang.srt.layers.moe.expert_choice import TopK  # ecpatch`` right after
  SGLang's own import of ``TopK``, and ``import os  # ecpatch`` beside it when an env-mode
  call needs ``os`` and the file does not import it itself.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from enum import Enum
from typing import Optional, Union

MARKER = "# ecpatch"
VENDORED_MODULE = "sglang.srt.layers.moe.expert_choice"
VENDORED_IMPORT = f"from {VENDORED_MODULE} import TopK  {MARKER}"
OS_IMPORT = f"import os  {MARKER}"
DEFAULT_ENV_VAR = "SGLANG_EXPERT_CHOICE"
DEFAULT_CAPACITY_FACTOR = 1.25
SWITCH_KWARG = "use_expert_choice"
CAPACITY_KWARG = "expert_capacity_factor"
ENV_VAR_PATTERN = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")


class Mode(str, Enum):
    """How ``enable`` switches expert choice on: from an environment variable, or always."""

    env = "env"
    on = "on"


class State(str, Enum):
    """State of one ``TopK(...)`` call, as ``status`` reports it."""

    off = "off"  # not patched
    on = "on"  # use_expert_choice=True
    env = "env"  # use_expert_choice=os.environ.get(NAME, "0") == "1"
    false = "false"  # use_expert_choice=False (disable --set-false)
    unsupported = "unsupported"  # left alone; CallInfo.reason says why


def env_switch_expression(env_var: str) -> str:
    """The exact source text of the env-mode switch (status resolves it with `env_value`)."""
    return f'os.environ.get("{env_var}", "0") == "1"'


def env_value(env_var: str, environ=None) -> bool:
    """What the env-mode switch evaluates to in `environ` (default: this process)."""
    environ = os.environ if environ is None else environ
    return environ.get(env_var, "0") == "1"


@dataclass(frozen=True)
class PatchOptions:
    """What ``enable`` writes into each supported call.

    `capacity_factor` must be finite and > 0 and `env_var` a valid variable name:
    `validate()` returns the problem as a sentence, or None.
    """

    mode: Mode = Mode.env
    env_var: str = DEFAULT_ENV_VAR
    capacity_factor: float = DEFAULT_CAPACITY_FACTOR

    def validate(self) -> Optional[str]:
        cf = self.capacity_factor
        if isinstance(cf, bool) or not isinstance(cf, (int, float)) or not math.isfinite(cf) or cf <= 0:
            return f"--capacity-factor must be a finite number > 0, got {cf!r}"
        if not ENV_VAR_PATTERN.match(self.env_var or ""):
            return f"--env-var must be a valid environment variable name, got {self.env_var!r}"
        return None

    @property
    def switch_source(self) -> str:
        return "True" if self.mode == Mode.on else env_switch_expression(self.env_var)

    @property
    def capacity_source(self) -> str:
        return repr(float(self.capacity_factor))


@dataclass(frozen=True)
class CallInfo:
    """One ``TopK(...)`` call found in a file (1-based `line` of the ``TopK`` name)."""

    line: int
    target: Optional[str]  # "self.topk", "self.mlp.topk", ... or None when not assigned
    state: State
    capacity_factor: Optional[float] = None
    env_var: Optional[str] = None
    reason: Optional[str] = None  # why the call is unsupported (None otherwise)
    has_switch: bool = False  # the call passes use_expert_choice= (whatever its state)

    @property
    def patched(self) -> bool:
        return self.state in (State.on, State.env, State.false)


@dataclass(frozen=True)
class Inspection:
    """What `inspect_source` learns about one file."""

    calls: tuple[CallInfo, ...]
    imports_sglang_topk: bool  # `from sglang.srt.layers.moe.topk import TopK` (any form)
    has_vendored_import: bool  # ecpatch's marker import line is present
    imports_os: bool  # the file binds `os` at module level by itself (not counting ecpatch's line)

    @property
    def is_model_file(self) -> bool:
        """Calls SGLang's TopK: something ecpatch can work on."""
        return bool(self.calls) and (self.imports_sglang_topk or self.has_vendored_import)


# ---- results of the pure functions (never exceptions) --------------------------------------


@dataclass(frozen=True)
class Changed:
    """The file would change; `new_code` compiles. `unsupported` lists calls left alone."""

    new_code: str
    calls: tuple[CallInfo, ...] = ()
    unsupported: tuple[CallInfo, ...] = ()


@dataclass(frozen=True)
class Unchanged:
    """Nothing to do (already in the wanted state, or only unsupported calls)."""

    calls: tuple[CallInfo, ...] = ()
    unsupported: tuple[CallInfo, ...] = ()
    reason: Optional[str] = None


@dataclass(frozen=True)
class Failed:
    """The file cannot be handled; `error` names the cause, `hint` what to do."""

    error: str
    hint: Optional[str] = None
    line: Optional[int] = None
    traceback: Optional[str] = None  # only for internal errors; the CLI prints it with --verbose


PatchResult = Union[Changed, Unchanged, Failed]
