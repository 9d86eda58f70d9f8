"""Property test: whatever the layout of a TopK(...) call, enable then disable --remove
gives back the same bytes, enable is idempotent, and the patched file compiles."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from sgl_ecpatch.patcher import Changed, State, Unchanged, disable_source, enable_source, find_calls

ARGS = ["top_k=config.num_experts_per_tok", "renormalize=config.norm_topk_prob", "layer_id=layer_id",
        "output_format=TopKOutputFormat.STANDARD", "**extra_kwargs"]


@st.composite
def call_sources(draw):
    n = draw(st.integers(1, 4))
    args = ["self.top_k"] + draw(st.permutations(ARGS[:-1]))[: n - 1]
    if draw(st.booleans()):
        args.append("**extra_kwargs")
    indent = draw(st.sampled_from(["    ", "\t", "  "]))
    newline = draw(st.sampled_from(["\n", "\r\n"]))
    layout = draw(st.sampled_from(["one_line", "one_per_line", "hanging", "packed"]))
    trailing_comma = draw(st.booleans()) and "**extra_kwargs" not in args[-1:] or layout == "one_per_line"
    comments = draw(st.lists(st.booleans(), min_size=len(args), max_size=len(args)))
    closing_comment = draw(st.booleans())
    body = indent * 2
    head = "self.topk = TopK("
    if layout == "one_line":
        call = head + ", ".join(args) + ("," if trailing_comma else "") + ")"
    elif layout == "packed":  # arguments on one line of their own
        call = head + newline + body + indent + ", ".join(args) + ("," if trailing_comma else "") + newline + body + ")"
    elif layout == "hanging":
        pad = " " * len(body + head) if indent != "\t" else body + "\t\t\t\t"
        lines = [a + "," for a in args[:-1]] + [args[-1] + ("," if trailing_comma else "")]
        lines = [line + ("  # note" if c else "") for line, c in zip(lines, comments)]
        lines[-1] = lines[-1].split("  # note")[0]  # a comment before `)` on the same line would eat it
        call = head + (newline + pad).join(lines) + ")"
    else:
        lines = [body + indent + a + "," + ("  # note" if c else "") for a, c in zip(args, comments)]
        if closing_comment:
            lines.append(body + indent + "# closing comment")
        call = head + newline + newline.join(lines) + newline + body + ")"
    source = newline.join([
        "from sglang.srt.layers.moe.topk import TopK, TopKOutputFormat",
        "",
        "",
        "class Block:",
        indent + "def __init__(self, config, layer_id, extra_kwargs):",
        indent * 2 + "extra_kwargs = dict(scoring_func='softmax')",
        body + call,
        "",
    ])
    return source


@settings(max_examples=150, deadline=None)
@given(call_sources())
def test_any_layout_round_trips(source):
    compile(source, "input", "exec")
    result = enable_source(source)
    assert isinstance(result, Changed), result
    compile(result.new_code, "patched", "exec")
    (call,) = find_calls(result.new_code)
    assert call.state == State.env and call.capacity_factor == 1.25
    newline = "\r\n" if "\r\n" in source else "\n"
    assert result.new_code.count(newline) >= source.count(newline)
    if newline == "\r\n":
        assert "\n" not in result.new_code.replace("\r\n", "")
    assert isinstance(enable_source(result.new_code), Unchanged)
    removed = disable_source(result.new_code)
    assert isinstance(removed, Changed)
    assert removed.new_code.encode() == source.encode()
