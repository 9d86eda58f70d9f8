"""The one output helper of the ecpatch CLI (every command and area uses it).

* Data (diffs, JSON, the status table) goes to **stdout**: `data(text)` writes raw text
  (byte-exact, no colour, no wrapping); `print_data(table)` prints a rich renderable;
  `data_console` is the rich Console of stdout.
* Everything else (progress, per-file results, warnings, errors, the summary) goes to
  **stderr** through `console`: `info`, `success`, `warn`, `error`.
* `UsageError` is raised by commands for bad arguments or inputs; the CLI prints it as one
  red line (with the hint) and exits with code 2.

Example::

    from sgl_ecpatch import ui
    ui.warn("models/x.py:12 self.topk: left unchanged", hint="grouped top-k is not supported")
    raise ui.UsageError("--layers: bad range '3-1'", hint="write ranges low-high, e.g. 0-15,32")
"""

from __future__ import annotations

import sys
from typing import Optional

from rich.console import Console
from rich.markup import escape

# stderr=True: rich looks sys.stderr up on every write, so test runners that swap it see the output.
console = Console(stderr=True, highlight=False, soft_wrap=True)
data_console = Console(highlight=False, soft_wrap=True)

EXIT_OK = 0
EXIT_CHANGES = 1  # --check / --diff found changes to make
EXIT_USAGE = 2  # usage or input errors


class UsageError(Exception):
    """Bad arguments or inputs: one red line naming the cause, a hint, exit code 2."""

    def __init__(self, message: str, hint: Optional[str] = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint


def data(text: str) -> None:
    """Write `text` to stdout exactly as given (diffs must stay byte-exact for `git apply`)."""
    sys.stdout.write(text)
    sys.stdout.flush()


def print_data(renderable, width_when_piped: int = 240) -> None:
    """Print a rich renderable (e.g. a Table) on stdout. On a terminal it fits the window;
    piped, it is laid out `width_when_piped` wide, so rows are not folded for grep."""
    target = data_console
    if not data_console.is_terminal:
        target = Console(file=sys.stdout, width=width_when_piped, highlight=False, soft_wrap=True,
                         no_color=data_console.no_color)
    target.print(renderable)


def _line(style: str, label: str, message: str, hint: Optional[str]) -> None:
    text = f"[{style}]{label}[/{style}]{escape(message)}"
    if hint:
        text += f" [dim](hint: {escape(hint)})[/dim]"
    console.print(text)


def info(message: str, hint: Optional[str] = None) -> None:
    """A neutral status line on stderr."""
    _line("default", "", message, hint)


def success(message: str) -> None:
    """A green result line on stderr."""
    _line("green", "", message, None)


def warn(message: str, hint: Optional[str] = None) -> None:
    """A yellow line on stderr: something left undone that the user should know about."""
    _line("yellow", "warning: ", message, hint)


def error(message: str, hint: Optional[str] = None) -> None:
    """One red line on stderr: what failed (name the file) and why, with a hint."""
    _line("bold red", "error: ", message, hint)


def stderr_is_terminal() -> bool:
    """Progress bars and spinners are shown only on an interactive stderr."""
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False
