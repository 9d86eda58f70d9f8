"""Sources that enable must leave alone, each with the reason why."""

from __future__ import annotations

import textwrap

import pytest

from sgl_ecpatch.patcher import Changed, Failed, State, Unchanged, enable_source, find_calls

IMPORT = "from sglang.srt.layers.moe.topk import TopK\n"

NOOP = [
    # HashTopK is a different router class (deepseek_v2.py): only the name TopK is SGLang's TopK.
    ("hash_topk_only", "from sglang.srt.layers.moe.hash_topk import HashTopK\n"
                       "class M:\n    def __init__(self):\n        self.topk = HashTopK(top_k=2)\n"),
    # Called through a module attribute: SGLang never does this, and the vendored import
    # (which shadows the bare name) would not reach it.
    ("module_attribute_call", "import sglang.srt.layers.moe.topk as topk_mod\n"
                              "class M:\n    def __init__(self):\n        self.topk = topk_mod.TopK(top_k=2)\n"),
    # An aliased import: the vendored `TopK` would not shadow `SGLTopK`.
    ("aliased_import", "from sglang.srt.layers.moe.topk import TopK as SGLTopK\n"
                       "class M:\n    def __init__(self):\n        self.topk = SGLTopK(top_k=2)\n"),
    # The text `TopK(` in a string and a comment is not a call.
    ("string_and_comment", IMPORT + 'DOC = "self.topk = TopK(top_k=2)"  # TopK(top_k=2)\n'),
    # A local class that happens to be called TopK is not SGLang's router.
    ("local_class", "class TopK:\n    def __init__(self, top_k):\n        self.top_k = top_k\n\n"
                    "class M:\n    def __init__(self):\n        self.topk = TopK(2)\n"),
    # Names that mention TopK without calling it.
    ("references_only", IMPORT + "ROUTER_CLS = TopK\n\ndef is_router(x):\n    return isinstance(x, TopK)\n"),
]

UNSUPPORTED = [
    # *args hides which arguments reach TopK.
    ("star_args", "self.topk = TopK(*args, renormalize=True)", "*args"),
    # A switch value ecpatch did not write: a person's edit, never overwritten.
    ("hand_written_switch", "self.topk = TopK(top_k=2, use_expert_choice=flags.ec, expert_capacity_factor=1.0)",
     "not written by ecpatch"),
    # A computed key in the splatted dict could be use_grouped_topk.
    ("computed_key", "self.topk = TopK(**{name: True}, top_k=2)", "computed key"),
    # A name bound by a for statement cannot be resolved.
    ("loop_bound", "for topk_kwargs in options:\n            pass\n        self.topk = TopK(**topk_kwargs)",
     "for statement"),
    # A dict built elsewhere (function parameter).
    ("parameter", "self.topk = TopK(**kwargs)", "parameter"),
    # A conditional custom routing function may be set at run time.
    ("conditional_custom", "self.topk = TopK(top_k=2, custom_routing_function=None if npu else fn)",
     "custom routing function"),
    # use_grouped_topk=0 is falsy but not the literal False ecpatch can trust.
    ("grouped_zero", "self.topk = TopK(top_k=2, use_grouped_topk=0)", "grouped top-k"),
    # A splat merged into a dict literal still passes use_grouped_topk=True.
    ("nested_splat", "base = dict(use_grouped_topk=True)\n        self.topk = TopK(**{**base, 'top_k': 2})",
     "via **"),
]


@pytest.mark.parametrize("name,source", NOOP, ids=[n for n, _ in NOOP])
def test_not_a_target(name, source):
    result = enable_source(source)
    assert not isinstance(result, Changed)
    assert isinstance(result, Failed)  # enable on a file with nothing to patch says so
    assert not any(c.state != State.unsupported for c in find_calls(source)) or name == "local_class"


def _model(body: str) -> str:
    return IMPORT + "\n\nclass M:\n    def __init__(self, options, kwargs, flags, npu, fn, name):\n" + \
        textwrap.indent(body, "        ") + "\n"


@pytest.mark.parametrize("name,body,why", UNSUPPORTED, ids=[n for n, *_ in UNSUPPORTED])
def test_unsupported_left_alone(name, body, why):
    source = _model(body.replace("\n        ", "\n"))
    compile(source, name, "exec")
    result = enable_source(source)
    assert isinstance(result, Unchanged), result
    (call,) = result.unsupported
    assert call.state == State.unsupported
    assert why in call.reason
