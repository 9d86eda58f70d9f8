"""Find and classify ``TopK(...)`` calls with the stdlib `ast` module.

This is the single place that decides whether a call is supported, what state it is in
and which assignment target it has. ``status`` uses it directly (fast: no libcst), and the
libcst rewriter (`rewrite.py`) asks it the same questions, so both always agree.

A call is a bare ``TopK(...)`` (the name, not ``HashTopK`` nor ``mod.TopK``). It is
*unsupported* (left unchanged, reported with a reason) when expert choice does not cover
its routing (see ROUTING.md, "Beyond one call"):

* ``use_grouped_topk=`` anything but the literal ``False``;
* ``custom_routing_function=`` anything but ``None``;
* a ``**splat`` whose keys cannot be checked: a dict literal, ``dict(...)``, a conditional
  of those, or a local name assigned such a value in the same function (its ``.update(...)``
  and ``name["key"] = ...`` edits included) are resolved; anything else is reported;
* ``*args``, or a ``use_expert_choice=`` value that ecpatch did not write.
"""

from __future__ import annotations

import ast
import bisect
import re
from typing import Optional, Union

from .model import (
    CAPACITY_KWARG,
    SWITCH_KWARG,
    VENDORED_MODULE,
    CallInfo,
    Failed,
    Inspection,
    MARKER,
    State,
)

TOPK = "TopK"
# Where a call of TopK can start (a superset: also matches HashTopK( and mod.TopK( ).
_CALL_TEXT = re.compile(r"TopK\s*\(")
SGLANG_TOPK_MODULES = ("sglang.srt.layers.moe.topk", "sglang.srt.layers.moe")
# Keyword arguments whose routing expert choice does not implement, and the value that is fine.
_GROUPED = "use_grouped_topk"
_CUSTOM = "custom_routing_function"


def is_sglang_topk_module(module: Optional[str], level: int = 0) -> bool:
    """True for ``sglang.srt.layers.moe.topk`` (also written relatively, e.g. ``..moe.topk``)."""
    if not module:
        return False
    if level == 0:
        return module in SGLANG_TOPK_MODULES
    return module.endswith("moe.topk") or module == "topk"


def inspect_source(code: str, filename: str = "<unknown>") -> Union[Inspection, Failed]:
    """Parse `code` and describe its ``TopK(...)`` calls and imports. Never raises."""
    try:
        tree = ast.parse(code, filename=filename)
    except SyntaxError as exc:
        return Failed(f"syntax error at line {exc.lineno}: {exc.msg}",
                      hint="fix the file (it must compile with this Python) and run again",
                      line=exc.lineno)
    except (ValueError, RecursionError) as exc:  # e.g. NUL bytes, absurd nesting
        return Failed(f"cannot parse: {exc}")
    finder = _CallFinder(code, _call_lines(code))
    finder.visit(tree)
    calls = tuple(sorted(finder.calls, key=lambda c: c[0]))
    return Inspection(
        calls=tuple(info for _, info in calls),
        imports_sglang_topk=finder.imports_sglang_topk,
        has_vendored_import=finder.has_vendored_import,
        imports_os=finder.imports_os,
    )


def _call_lines(code: str) -> list[int]:
    """1-based numbers of the lines where the text of a TopK call may start, sorted."""
    starts = [m.start() for m in _CALL_TEXT.finditer(code)]
    if not starts:
        return []
    newlines = [m.start() for m in re.finditer("\n", code)]
    return sorted({bisect.bisect_left(newlines, start) + 1 for start in starts})


def find_calls(code: str) -> list[CallInfo]:
    """The ``TopK(...)`` calls of `code` in source order; [] when it does not parse."""
    found = inspect_source(code)
    return list(found.calls) if isinstance(found, Inspection) else []


# ---- the visitor ---------------------------------------------------------------------------


class _CallFinder(ast.NodeVisitor):
    def __init__(self, code: str, call_lines: list[int]) -> None:
        self.code = code
        self.call_lines = call_lines
        self._lines: Optional[list[str]] = None
        self.calls: list[tuple[tuple[int, int], CallInfo]] = []
        self.imports_sglang_topk = False
        self.has_vendored_import = False
        self.imports_os = False
        self._function: Optional[ast.AST] = None
        self._target: Optional[str] = None
        self._depth = 0  # statement nesting: 0 = module level

    # imports --------------------------------------------------------------------------
    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        names = {(a.name, a.asname) for a in node.names}
        if (TOPK, None) in names:
            if node.module == VENDORED_MODULE:
                self.has_vendored_import = True
            elif is_sglang_topk_module(node.module, node.level):
                self.imports_sglang_topk = True

    def visit_Import(self, node: ast.Import) -> None:
        if self._function is None:
            for alias in node.names:
                if alias.asname is None and (alias.name == "os" or alias.name.startswith("os.")):
                    if not self._is_marker_line(node.end_lineno or node.lineno):
                        self.imports_os = True

    def _is_marker_line(self, lineno: int) -> bool:
        """ecpatch's own `import os  # ecpatch` does not count as the file importing os."""
        if self._lines is None:
            self._lines = self.code.splitlines()
        return 0 < lineno <= len(self._lines) and self._lines[lineno - 1].rstrip().endswith(MARKER)

    # scopes and targets --------------------------------------------------------------
    def _may_call(self, node: ast.AST) -> bool:
        """Whether a TopK call can lie inside `node` (by its lines): most of a model file
        cannot, and not walking it makes `status` several times faster."""
        first = min([node.lineno] + [d.lineno for d in getattr(node, "decorator_list", ())])
        i = bisect.bisect_left(self.call_lines, first)
        return i < len(self.call_lines) and self.call_lines[i] <= (node.end_lineno or node.lineno)

    def visit_FunctionDef(self, node: Union[ast.FunctionDef, ast.AsyncFunctionDef]) -> None:
        if not self._may_call(node):
            return  # a function's own imports do not matter: they are not module level
        outer, self._function = self._function, node
        self.generic_visit(node)
        self._function = outer

    visit_AsyncFunctionDef = visit_FunctionDef

    def visit_ClassDef(self, node: ast.ClassDef) -> None:
        if self._may_call(node):
            self.generic_visit(node)

    def _visit_assignment(self, targets: list[ast.expr], value: Optional[ast.expr]) -> None:
        for target in targets:
            self.visit(target)
        if value is None:
            return
        outer = self._target
        self._target = _target_text(targets[0]) if len(targets) == 1 else None
        self.visit(value)
        self._target = outer

    def visit_Assign(self, node: ast.Assign) -> None:
        self._visit_assignment(node.targets, node.value)

    def visit_AnnAssign(self, node: ast.AnnAssign) -> None:
        self.visit(node.annotation)
        self._visit_assignment([node.target], node.value)

    def visit_Lambda(self, node: ast.Lambda) -> None:
        outer = self._target
        self._target = None
        self.generic_visit(node)
        self._target = outer

    # calls -------------------------------------------------------------------------------
    def visit_Call(self, node: ast.Call) -> None:
        if isinstance(node.func, ast.Name) and node.func.id == TOPK:
            info = classify_call(node, self._function, self._target)
            self.calls.append(((node.lineno, node.col_offset), info))
        # a call nested in the arguments is not the assigned value
        outer = self._target
        self._target = None
        self.generic_visit(node)
        self._target = outer


def _target_text(node: ast.expr) -> Optional[str]:
    if isinstance(node, (ast.Name, ast.Attribute, ast.Subscript)):
        return ast.unparse(node)
    return None


# ---- classification ------------------------------------------------------------------------


def classify_call(call: ast.Call, function: Optional[ast.AST], target: Optional[str]) -> CallInfo:
    """State, capacity factor and (when unsupported) the reason for one ``TopK(...)`` call."""
    keywords = {kw.arg: kw.value for kw in call.keywords if kw.arg is not None}
    switch = keywords.get(SWITCH_KWARG)
    capacity = _number(keywords.get(CAPACITY_KWARG))

    reason = _unsupported_reason(call, keywords, function)
    state, env_var = State.off, None
    if switch is not None:
        state, env_var = _switch_state(switch)
        if state is None:
            reason = reason or (
                f"{SWITCH_KWARG}={ast.unparse(switch)} was not written by ecpatch "
                f"(edit it by hand, or `ecpatch disable --remove` it first)")
    if reason is not None:
        state = State.unsupported
    return CallInfo(line=call.lineno, target=target, state=state,
                    capacity_factor=capacity, env_var=env_var, reason=reason,
                    has_switch=switch is not None)


def _switch_state(value: ast.expr) -> tuple[Optional[State], Optional[str]]:
    if isinstance(value, ast.Constant) and value.value is True:
        return State.on, None
    if isinstance(value, ast.Constant) and value.value is False:
        return State.false, None
    env_var = env_var_of_switch(value)
    if env_var is not None:
        return State.env, env_var
    return None, None


def env_var_of_switch(value: ast.expr) -> Optional[str]:
    """NAME when `value` is exactly ``os.environ.get("NAME", "0") == "1"``, else None."""
    if not (isinstance(value, ast.Compare) and len(value.ops) == 1 and isinstance(value.ops[0], ast.Eq)
            and _is_str(value.comparators[0], "1")):
        return None
    get = value.left
    if not (isinstance(get, ast.Call) and not get.keywords and len(get.args) == 2
            and _is_str(get.args[1], "0") and isinstance(get.args[0], ast.Constant)
            and isinstance(get.args[0].value, str)):
        return None
    func = get.func
    if (isinstance(func, ast.Attribute) and func.attr == "get"
            and isinstance(func.value, ast.Attribute) and func.value.attr == "environ"
            and isinstance(func.value.value, ast.Name) and func.value.value.id == "os"):
        return get.args[0].value
    return None


def _is_str(node: ast.expr, text: str) -> bool:
    return isinstance(node, ast.Constant) and node.value == text and isinstance(node.value, str)


def _number(node: Optional[ast.expr]) -> Optional[float]:
    if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)) and not isinstance(node.value, bool):
        return float(node.value)
    return None


def _unsupported_reason(call: ast.Call, keywords: dict, function: Optional[ast.AST]) -> Optional[str]:
    if any(isinstance(arg, ast.Starred) for arg in call.args):
        return "*args in the call: ecpatch cannot see which arguments it passes"
    reason = _reason_for_keys(keywords, via="")
    if reason:
        return reason
    for kw in call.keywords:
        if kw.arg is None:
            keys, why_not = resolve_mapping(kw.value, function)
            splat = f"**{ast.unparse(kw.value)}"
            if keys is None:
                return (f"{splat}: {why_not}, so ecpatch cannot check it for "
                        f"{_GROUPED}= / {_CUSTOM}= (hand-edit the call if it has neither)")
            reason = _reason_for_keys(keys, via=f" (via {splat})")
            if reason:
                return reason
    return None


def _reason_for_keys(keys: dict, via: str) -> Optional[str]:
    """`keys` maps a keyword name to a value node, or to a list of possible value nodes."""
    for name, values in keys.items():
        for value in values if isinstance(values, list) else [values]:
            if name == _GROUPED and not (isinstance(value, ast.Constant) and value.value is False):
                return (f"{_GROUPED}={ast.unparse(value)}{via}: grouped top-k (DeepSeek-style "
                        "expert groups) is not covered by expert choice")
            if name == _CUSTOM and not (isinstance(value, ast.Constant) and value.value is None):
                return (f"{_CUSTOM}={ast.unparse(value)}{via}: a custom routing function is "
                        "not covered by expert choice")
    return None


def resolve_mapping(node: ast.expr, function: Optional[ast.AST]) -> tuple[Optional[dict], Optional[str]]:
    """The keys a ``**node`` splat can pass, as {key: [value nodes]}; (None, why) if unknown."""
    keys: dict[str, list] = {}
    why = _collect_keys(node, function, keys, seen=set())
    return (None, why) if why else (keys, None)


def _collect_keys(node: ast.expr, function: Optional[ast.AST], keys: dict, seen: set) -> Optional[str]:
    if isinstance(node, ast.Dict):
        for key, value in zip(node.keys, node.values):
            if key is None:
                why = _collect_keys(value, function, keys, seen)
                if why:
                    return why
            elif isinstance(key, ast.Constant) and isinstance(key.value, str):
                keys.setdefault(key.value, []).append(value)
            else:
                return f"the dict has a computed key ({ast.unparse(key)})"
        return None
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "dict":
        return _collect_call_keys(node, function, keys, seen)
    if isinstance(node, ast.IfExp):
        return (_collect_keys(node.body, function, keys, seen)
                or _collect_keys(node.orelse, function, keys, seen))
    if isinstance(node, ast.Name):
        if node.id in seen:
            return None
        seen.add(node.id)
        return _collect_name(node.id, function, keys, seen)
    return f"{ast.unparse(node)} is not a dict ecpatch can read"


def _collect_call_keys(call: ast.Call, function: Optional[ast.AST], keys: dict, seen: set) -> Optional[str]:
    """Keys passed by ``dict(...)`` or ``name.update(...)``: mappings, then keyword arguments."""
    for arg in call.args:
        why = _collect_keys(arg, function, keys, seen)
        if why:
            return why
    for kw in call.keywords:
        if kw.arg is None:
            why = _collect_keys(kw.value, function, keys, seen)
            if why:
                return why
        else:
            keys.setdefault(kw.arg, []).append(kw.value)
    return None


def _collect_name(name: str, function: Optional[ast.AST], keys: dict, seen: set) -> Optional[str]:
    if function is None:
        return f"{name} is not a local variable of a function"
    assigned = False
    for node in _walk_scope(function):
        if isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for target in targets:
                if isinstance(target, ast.Name) and target.id == name:
                    if node.value is None:
                        continue
                    if len(targets) != 1:
                        return f"{name} is assigned in a chained assignment"
                    assigned = True
                    why = _collect_keys(node.value, function, keys, seen)
                    if why:
                        return why
                elif isinstance(target, ast.Subscript) and _is_name(target.value, name):
                    if isinstance(target.slice, ast.Constant) and isinstance(target.slice.value, str):
                        keys.setdefault(target.slice.value, []).append(node.value)
                    else:
                        return f"{name}[{ast.unparse(target.slice)}] is set with a computed key"
                elif isinstance(target, (ast.Tuple, ast.List)) and any(
                        _is_name(elt, name) for elt in ast.walk(target)):
                    return f"{name} is assigned by unpacking"
        elif isinstance(node, ast.AugAssign) and _is_name(node.target, name):
            return f"{name} is changed with {type(node.op).__name__} assignment"
        elif isinstance(node, (ast.For, ast.AsyncFor, ast.With, ast.AsyncWith, ast.NamedExpr)):
            bound = [node.target] if isinstance(node, (ast.For, ast.AsyncFor, ast.NamedExpr)) else [
                item.optional_vars for item in node.items if item.optional_vars is not None]
            if any(_is_name(elt, name) for b in bound for elt in ast.walk(b)):
                return f"{name} is bound by a {type(node).__name__.lower()} statement"
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
              and _is_name(node.func.value, name)):
            method = node.func.attr
            if method == "update":
                why = _collect_call_keys(node, function, keys, seen)
                if why:
                    return why
            elif method in ("setdefault", "__setitem__", "__ior__"):
                return f"{name} is changed with .{method}(...)"
    if not assigned:
        args = function.args  # type: ignore[attr-defined]
        params = [a.arg for a in args.posonlyargs + args.args + args.kwonlyargs]
        params += [a.arg for a in (args.vararg, args.kwarg) if a is not None]
        where = "a parameter of the function" if name in params else "not assigned in this function"
        return f"{name} is {where}"
    return None


def _walk_scope(function: ast.AST):
    """Every node of `function`'s body, not descending into nested functions or classes."""
    stack = list(ast.iter_child_nodes(function))
    while stack:
        node = stack.pop()
        yield node
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Lambda)):
            stack.extend(ast.iter_child_nodes(node))


def _is_name(node: ast.AST, name: str) -> bool:
    return isinstance(node, ast.Name) and node.id == name
