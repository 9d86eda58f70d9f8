"""The libcst rewriter: ``enable`` / ``disable`` as pure functions over source text.

Two transformers, one concern each:

* `CallRewriter` sets, updates or removes the two keyword arguments of supported
  ``TopK(...)`` calls (which calls are supported is decided by `calls.inspect_source`);
* `ImportSync` adds or removes ecpatch's marker lines (``from ...expert_choice import TopK
  # ecpatch`` and ``import os  # ecpatch``) so that they match what the calls need.

Appending keyword arguments moves the call's *terminal* (the last argument's trailing comma
or its absence, and the whitespace/comments up to ``)``) onto the new last argument, and
removing them moves it back: that is what makes ``disable --remove`` give back the original
bytes. Generated code is parsed with the module's own config, so CRLF and tabs survive.
"""

from __future__ import annotations

import traceback
from typing import Callable, Optional, Sequence, Union

import libcst as cst
import libcst.matchers as m

from .calls import TOPK, inspect_source, is_sglang_topk_module
from .model import (
    CAPACITY_KWARG,
    MARKER,
    OS_IMPORT,
    SWITCH_KWARG,
    VENDORED_IMPORT,
    VENDORED_MODULE,
    CallInfo,
    Changed,
    Failed,
    Inspection,
    Mode,
    PatchOptions,
    PatchResult,
    State,
    Unchanged,
)

PW = cst.ParenthesizedWhitespace
SW = cst.SimpleWhitespace

TOPK_CALL = m.Call(func=m.Name(TOPK))
MARKER_COMMENT = m.TrailingWhitespace(comment=m.Comment(MARKER))
VENDORED_LINE = m.SimpleStatementLine(
    body=[m.ImportFrom(module=m.Attribute() | m.Name(), names=[m.ImportAlias(name=m.Name(TOPK), asname=None)])],
    trailing_whitespace=MARKER_COMMENT)
OS_LINE = m.SimpleStatementLine(
    body=[m.Import(names=[m.ImportAlias(name=m.Name("os"), asname=None)])],
    trailing_whitespace=MARKER_COMMENT)

# What a call's switch will be after the rewrite: "env", another wanted value, or None (absent).
SwitchPlan = Optional[str]
KEEP = "keep"


# ---- public API ----------------------------------------------------------------------------


def enable_source(code: str, options: PatchOptions = PatchOptions(), filename: str = "<unknown>") -> PatchResult:
    """Patch every supported ``TopK(...)`` call of `code` for expert choice. Never raises.

    Unsupported calls are left as they are and listed in the result. Running it again with
    the same options returns `Unchanged`; with other options it updates the calls in place.
    """
    problem = options.validate()
    if problem:
        return Failed(problem, hint="see `ecpatch enable --help`")
    switch = options.switch_source
    capacity = options.capacity_source
    want_state = State.on if options.mode == Mode.on else State.env

    def plan(info: CallInfo) -> dict[str, str]:
        up_to_date = (info.state == want_state and info.capacity_factor == float(options.capacity_factor)
                      and (want_state != State.env or info.env_var == options.env_var))
        return {} if up_to_date else {SWITCH_KWARG: switch, CAPACITY_KWARG: capacity}

    return _run(code, filename, plan, remove=False, needs_model_file=True)


def disable_source(code: str, *, remove: bool = True, filename: str = "<unknown>") -> PatchResult:
    """Undo `enable_source`. Never raises.

    `remove=True`: take out both keyword arguments and every line enable added, giving back
    the original text byte for byte. `remove=False` (``--set-false``): keep the arguments and
    the vendored import (SGLang's own TopK would reject the arguments) and write
    ``use_expert_choice=False``.
    """

    def plan(info: CallInfo) -> dict[str, str]:
        if info.state in (State.on, State.env):
            return {SWITCH_KWARG: "False"}
        return {}

    return _run(code, filename, plan, remove=remove, needs_model_file=False)


# ---- the shared driver ---------------------------------------------------------------------


def _run(code: str, filename: str, plan: Callable[[CallInfo], dict], *, remove: bool,
         needs_model_file: bool) -> PatchResult:
    try:
        return _run_unguarded(code, filename, plan, remove=remove, needs_model_file=needs_model_file)
    except Exception as exc:  # the core never raises: an unexpected error is a result too
        return Failed(f"internal error: {type(exc).__name__}: {exc}",
                      hint="run again with --verbose and report the traceback",
                      traceback=traceback.format_exc())


def _run_unguarded(code: str, filename: str, plan: Callable[[CallInfo], dict], *, remove: bool,
                   needs_model_file: bool) -> PatchResult:
    inspection = inspect_source(code, filename)
    if isinstance(inspection, Failed):
        return inspection
    calls = inspection.calls
    unsupported = tuple(c for c in calls if c.state == State.unsupported)
    if not calls:
        if needs_model_file:
            return Failed("no TopK(...) call in this file", hint="point ecpatch at an SGLang MoE model file")
        return Unchanged(reason="no TopK(...) call")
    if needs_model_file and not inspection.is_model_file:
        return Failed("TopK is not imported from sglang.srt.layers.moe.topk",
                      hint="ecpatch only patches SGLang model files that import SGLang's TopK")

    try:
        module = cst.parse_module(code)
    except cst.ParserSyntaxError as exc:
        return Failed(f"syntax error at line {exc.raw_line}: {exc.message}", line=exc.raw_line,
                      hint="fix the file (it must parse) and run again")
    rewriter = CallRewriter(calls, plan, remove=remove, config=module.config_for_parsing)
    module = module.visit(rewriter)
    if rewriter.seen != len(calls):
        return Failed(f"found {len(calls)} TopK calls with ast but {rewriter.seen} with libcst",
                      hint="report this file to the ecpatch maintainers")

    switches = rewriter.final_switches
    want_vendored = (any(switch not in (None, KEEP) for switch in switches)
                     or (KEEP in switches and inspection.has_vendored_import))
    want_os = any(switch == "env" for switch in switches) and not inspection.imports_os
    sync = ImportSync(want_vendored=want_vendored, want_os=want_os, config=module.config_for_parsing)
    module = module.visit(sync)
    if sync.missing_anchor:
        return Failed("cannot place the expert-choice import: no `from sglang.srt.layers.moe.topk "
                      "import TopK` statement found", hint="add SGLang's TopK import and run again")
    new_code = module.code
    if new_code == code:
        return Unchanged(calls=calls, unsupported=unsupported,
                         reason="only unsupported calls" if unsupported and len(unsupported) == len(calls) else None)
    try:
        compile(new_code, filename, "exec", dont_inherit=True)
    except (SyntaxError, ValueError) as exc:
        return Failed(f"the patched file would not compile: {exc}",
                      hint="nothing was written; report this file to the ecpatch maintainers")
    new_calls = inspect_source(new_code, filename)
    new_calls = new_calls.calls if isinstance(new_calls, Inspection) else calls
    return Changed(new_code=new_code, calls=new_calls, unsupported=unsupported)


# ---- transformer 1: the TopK(...) call -----------------------------------------------------


class CallRewriter(cst.CSTTransformer):
    """Rewrite the keyword arguments of each ``TopK(...)`` call.

    `calls` (from `inspect_source`, in source order) says which calls are supported; `plan`
    gives, per supported call, the keyword values to set ({} = leave the call alone). With
    `remove`, both keywords are taken out of every call instead.
    """

    def __init__(self, calls: Sequence[CallInfo], plan: Callable[[CallInfo], dict], *, remove: bool,
                 config: cst.PartialParserConfig) -> None:
        super().__init__()
        self.calls = calls
        self.plan = plan
        self.remove = remove
        self.config = config
        self.seen = 0
        self.final_switches: list[SwitchPlan] = []
        self._info: dict[cst.Call, CallInfo] = {}

    def visit_Call(self, node: cst.Call) -> None:
        if m.matches(node, TOPK_CALL):
            if self.seen < len(self.calls):
                self._info[node] = self.calls[self.seen]
            self.seen += 1

    def leave_Call(self, original_node: cst.Call, updated_node: cst.Call) -> cst.BaseExpression:
        info = self._info.get(original_node)
        if info is None:
            return updated_node
        if self.remove:
            self.final_switches.append(None)
            return updated_node.with_changes(args=remove_keywords(updated_node.args, {SWITCH_KWARG, CAPACITY_KWARG}))
        values = self.plan(info) if info.state != State.unsupported else {}
        self.final_switches.append(self._final_switch(info, values))
        if not values:
            return updated_node
        return set_keywords(updated_node, {
            name: cst.parse_expression(source, config=self.config) for name, source in values.items()})

    @staticmethod
    def _final_switch(info: CallInfo, values: dict) -> SwitchPlan:
        if SWITCH_KWARG in values:
            source = values[SWITCH_KWARG]
            return "env" if source.startswith("os.environ") else source
        if info.state == State.env:
            return "env"
        if not info.has_switch:
            return None
        if info.state == State.unsupported:
            return KEEP  # a switch ecpatch did not write: keep the import if there is one, never add it
        return info.state.value  # on / false need the vendored import


def set_keywords(call: cst.Call, values: dict[str, cst.BaseExpression]) -> cst.Call:
    """Set keyword arguments of `call`: replace existing values in place, append the others."""
    args = list(call.args)
    missing = dict(values)
    for i, arg in enumerate(args):
        if arg.keyword is not None and arg.keyword.value in missing:
            args[i] = arg.with_changes(value=missing.pop(arg.keyword.value))
    if missing:
        args = append_keywords(call, args, list(missing.items()))
    return call.with_changes(args=args)


def append_keywords(call: cst.Call, args: list[cst.Arg], new: list[tuple[str, cst.BaseExpression]]) -> list[cst.Arg]:
    """`args` plus `new` keyword arguments, in the call's own layout.

    The separator between arguments is copied from the call (comments stripped); the last
    argument's terminal moves to the last new argument, except a comment on the last
    argument's own line, which stays there.
    """
    separator = _separator(call, args)
    last = args[-1]
    nothing = SW("")
    if isinstance(last.comma, cst.Comma):
        comma = last.comma
        after = comma.whitespace_after
        if isinstance(after, PW) and isinstance(separator, PW):
            kept = comma.with_changes(whitespace_after=PW(
                first_line=after.first_line, empty_lines=(), indent=separator.indent,
                last_line=separator.last_line))
            terminal_comma: Union[cst.Comma, cst.MaybeSentinel] = cst.Comma(
                whitespace_before=nothing, whitespace_after=PW(
                    first_line=cst.TrailingWhitespace(), empty_lines=after.empty_lines,
                    indent=after.indent, last_line=after.last_line))
        else:
            kept = comma.with_changes(whitespace_after=separator)
            terminal_comma = cst.Comma(whitespace_before=nothing, whitespace_after=after)
        args[-1] = last.with_changes(comma=kept)
        terminal_space: cst.BaseParenthesizableWhitespace = nothing
    else:
        space = last.whitespace_after_arg
        if isinstance(space, PW) and isinstance(separator, PW):
            kept = cst.Comma(whitespace_before=nothing, whitespace_after=PW(
                first_line=space.first_line, empty_lines=(), indent=separator.indent,
                last_line=separator.last_line))
            terminal_space = PW(first_line=cst.TrailingWhitespace(), empty_lines=space.empty_lines,
                                indent=space.indent, last_line=space.last_line)
        else:
            kept = cst.Comma(whitespace_before=nothing, whitespace_after=separator)
            terminal_space = space
        args[-1] = last.with_changes(comma=kept, whitespace_after_arg=nothing)
        terminal_comma = cst.MaybeSentinel.DEFAULT
    for i, (name, value) in enumerate(new):
        is_last = i == len(new) - 1
        args.append(cst.Arg(
            keyword=cst.Name(name), value=value,
            equal=cst.AssignEqual(whitespace_before=nothing, whitespace_after=nothing),
            comma=terminal_comma if is_last else cst.Comma(whitespace_before=nothing, whitespace_after=separator),
            whitespace_after_arg=terminal_space if is_last else nothing))
    return args


def _separator(call: cst.Call, args: list[cst.Arg]) -> cst.BaseParenthesizableWhitespace:
    """Whitespace between two arguments of `call`, without any comment it carries."""
    if len(args) >= 2 and isinstance(args[-2].comma, cst.Comma):
        space = args[-2].comma.whitespace_after
    elif isinstance(call.whitespace_before_args, PW):
        space = call.whitespace_before_args
    else:
        return SW(" ")
    if isinstance(space, PW):
        return PW(first_line=cst.TrailingWhitespace(), empty_lines=(), indent=space.indent,
                  last_line=space.last_line)
    return space


def remove_keywords(args: Sequence[cst.Arg], names: set[str]) -> list[cst.Arg]:
    """`args` without the keyword arguments in `names`; the exact inverse of `append_keywords`."""
    args = list(args)
    for i in range(len(args) - 1, -1, -1):
        arg = args[i]
        if arg.keyword is None or arg.keyword.value not in names:
            continue
        if i == len(args) - 1 and i > 0:
            args[i - 1] = _take_terminal(args[i - 1], arg)
        del args[i]
    return args


def _take_terminal(previous: cst.Arg, removed: cst.Arg) -> cst.Arg:
    """`previous` (now last) with the terminal of the `removed` last argument."""
    prev_after = previous.comma.whitespace_after if isinstance(previous.comma, cst.Comma) else None

    def merged(space: cst.BaseParenthesizableWhitespace) -> cst.BaseParenthesizableWhitespace:
        if isinstance(space, PW) and isinstance(prev_after, PW):
            return PW(first_line=prev_after.first_line, empty_lines=space.empty_lines,
                      indent=space.indent, last_line=space.last_line)
        return space

    if isinstance(removed.comma, cst.Comma):
        if not isinstance(previous.comma, cst.Comma):  # not a layout ecpatch wrote
            return previous.with_changes(comma=removed.comma)
        return previous.with_changes(comma=previous.comma.with_changes(
            whitespace_after=merged(removed.comma.whitespace_after)))
    return previous.with_changes(comma=cst.MaybeSentinel.DEFAULT,
                                 whitespace_after_arg=merged(removed.whitespace_after_arg))


# ---- transformer 2: ecpatch's import lines -------------------------------------------------


class ImportSync(cst.CSTTransformer):
    """Make ecpatch's marker import lines match what the calls need.

    The vendored ``TopK`` import goes right after SGLang's own ``TopK`` import statement
    (after the whole statement, multi-name or parenthesised), ``import os  # ecpatch``
    right after that. Unwanted marker lines are removed.
    """

    def __init__(self, *, want_vendored: bool, want_os: bool, config: cst.PartialParserConfig) -> None:
        super().__init__()
        self.want_vendored = want_vendored
        self.want_os = want_os
        self.config = config
        self.has_vendored = False
        self.has_os = False
        self.placed = False
        self.missing_anchor = False

    def visit_Module(self, node: cst.Module) -> None:
        # Which marker lines exist already (anywhere) decides what leave_* must add.
        for stmt in _all_simple_statements(node):
            if self._is_vendored_line(stmt):
                self.has_vendored = True
            elif m.matches(stmt, OS_LINE):
                self.has_os = True

    def leave_Module(self, original_node: cst.Module, updated_node: cst.Module) -> cst.Module:
        if self.want_vendored and not self.has_vendored and not self.placed:
            self.missing_anchor = True
        return updated_node

    # Imports of TopK sit at module level (possibly inside `try:` / `if`), never in a def or a
    # class: not descending into those halves the cost of this pass on big model files.
    def visit_FunctionDef(self, node: cst.FunctionDef) -> bool:
        return False

    def visit_ClassDef(self, node: cst.ClassDef) -> bool:
        return False

    @staticmethod
    def _is_vendored_line(stmt: cst.SimpleStatementLine) -> bool:
        if not m.matches(stmt, VENDORED_LINE):
            return False
        module = stmt.body[0].module  # type: ignore[attr-defined]
        return _dotted(module) == VENDORED_MODULE

    def _statement(self, text: str) -> cst.SimpleStatementLine:
        stmt = cst.parse_statement(text + self.config.default_newline, config=self.config)
        assert isinstance(stmt, cst.SimpleStatementLine)
        return stmt

    def leave_SimpleStatementLine(self, original_node: cst.SimpleStatementLine,
                                  updated_node: cst.SimpleStatementLine):
        if self._is_vendored_line(original_node):
            if not self.want_vendored:
                return cst.RemovalSentinel.REMOVE
            if self.want_os and not self.has_os and not self.placed:
                self.placed = True
                return cst.FlattenSentinel([updated_node, self._statement(OS_IMPORT)])
            return updated_node
        if m.matches(original_node, OS_LINE):
            return updated_node if self.want_os else cst.RemovalSentinel.REMOVE
        if self.want_vendored and not self.has_vendored and not self.placed and _imports_sglang_topk(original_node):
            self.placed = True
            added = [self._statement(VENDORED_IMPORT)]
            if self.want_os and not self.has_os:
                added.append(self._statement(OS_IMPORT))
            return cst.FlattenSentinel([updated_node, *added])
        return updated_node


def _imports_sglang_topk(stmt: cst.SimpleStatementLine) -> bool:
    for small in stmt.body:
        if isinstance(small, cst.ImportFrom) and not isinstance(small.names, cst.ImportStar):
            if is_sglang_topk_module(_dotted(small.module), len(small.relative)) and any(
                    isinstance(alias.name, cst.Name) and alias.name.value == TOPK and alias.asname is None
                    for alias in small.names):
                return True
    return False


def _dotted(node: Optional[cst.BaseExpression]) -> Optional[str]:
    if node is None:
        return None
    if isinstance(node, cst.Name):
        return node.value
    if isinstance(node, cst.Attribute):
        head = _dotted(node.value)
        return f"{head}.{node.attr.value}" if head else None
    return None


def _all_simple_statements(node: cst.CSTNode):
    stack = [node]
    while stack:
        current = stack.pop()
        if isinstance(current, cst.SimpleStatementLine):
            yield current
        elif isinstance(current, (cst.FunctionDef, cst.ClassDef)):
            continue
        elif isinstance(current, (cst.Module, cst.IndentedBlock, cst.BaseCompoundStatement,
                                  cst.Else, cst.ExceptHandler, cst.Finally, cst.BaseSuite)):
            stack.extend(current.children)
