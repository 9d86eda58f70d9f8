"""`ecpatch advise`: a verdict with its numbers, from the measured table.

How the verdict is reached (every number it uses is printed with it):

1. Loads. Router logits for the preset's (E, k) are drawn with the assumed skew
   (`distributions`, default `zipf-0.25`) at the user's token count N and at the
   token counts of a grid below it, and routed with token choice and with expert
   choice `drop` (the runtime's PyTorch path; the routing result is the same on
   every device).
2. Time per MoE layer, projected for the slowest of G EP ranks:
   `routing time (table) + sum over the rank's experts of expert_time(tokens)`
   (`timemodel`; the table's measured per-expert curve, scaled to the preset's
   hidden/inter). Expert choice is charged at equal work: its loads are scaled
   up as if the slots `drop` leaves vacant had been computed, so the verdict
   credits balance only; the time saved by not computing dropped slots (quality
   given away) is printed beside it, never counted. Token choice uses SGLang's router time where the table has it,
   else plain PyTorch top-k; expert choice uses the kernel where the table has it,
   else the fast PyTorch path.
3. Verdict at N: the speedup `t_token_choice / t_expert_choice` must clear a
   margin (online 5%, offline 2%: online serving pays for every decode step), and
   expert choice must keep at least 90% of the top-k gate mass (a proxy for how
   far it moves from the routing the model was trained with). Then the smallest
   grid token count from which expert choice is never slower becomes
   `--min-tokens` (below it SGLang's own top-k runs). Else: keep it off.
"""

from __future__ import annotations

import importlib.util
import math
import shlex
from dataclasses import asdict, dataclass, field

from . import table as table_mod
from .presets import Preset
from .study import study_point
from .timemodel import ExpertTimeModel

SCENARIOS = {"online": 1.05, "offline": 1.02}
MIN_GATE_MASS = 0.90
GRID = (1, 4, 16, 64, 256, 1024, 4096, 16384)
DEFAULT_SKEW = "zipf-0.25"
OLD_RULE_TOKENS = 128

VERDICT_ENABLE = "enable"
VERDICT_ENABLE_WITH = "enable-with-options"
VERDICT_OFF = "keep-off"


@dataclass
class Point:
    """Projected per-layer times at one token count (microseconds)."""

    tokens: int
    route_tc_us: float
    route_ec_us: float
    moe_tc_us: float
    moe_ec_us: float
    gate_mass: float = 1.0
    slots_kept: float = 1.0
    rank_ratio_tc: float = 1.0
    rank_ratio_ec: float = 1.0
    moe_ec_as_routed_us: float | None = None  # without charging the dropped slots
    active_tc: float | None = None  # experts with at least one token
    active_ec: float | None = None

    @property
    def tc_us(self) -> float:
        return self.route_tc_us + self.moe_tc_us

    @property
    def ec_us(self) -> float:
        return self.route_ec_us + self.moe_ec_us

    @property
    def speedup(self) -> float:
        return self.tc_us / self.ec_us if self.ec_us > 0 else math.inf

    def to_dict(self) -> dict:
        data = asdict(self)
        data.update(tc_us=self.tc_us, ec_us=self.ec_us, speedup=self.speedup)
        return data


@dataclass
class Decision:
    verdict: str
    min_tokens: int | None
    reasons: list[str] = field(default_factory=list)


def decide(points: list[Point], tokens: int, scenario: str = "online") -> Decision:
    """The verdict from projected points (one of them at `tokens`). Pure: no I/O."""
    if scenario not in SCENARIOS:
        raise ValueError(f"--scenario must be one of {', '.join(SCENARIOS)}, got {scenario!r}")
    margin = SCENARIOS[scenario]
    points = sorted(points, key=lambda p: p.tokens)
    at_n = next((p for p in points if p.tokens == tokens), None)
    if at_n is None:
        raise ValueError(f"no projected point at the requested token count {tokens}")
    reasons = [
        f"at {tokens} tokens per batch: token choice {at_n.tc_us:.1f} us per MoE layer "
        f"(routing {at_n.route_tc_us:.1f} + slowest rank {at_n.moe_tc_us:.1f}), expert choice {at_n.ec_us:.1f} us "
        f"(routing {at_n.route_ec_us:.1f} + slowest rank {at_n.moe_ec_us:.1f}): "
        f"{_pct(at_n.speedup)} for expert choice",
        f"slowest-rank load max/mean: token choice {at_n.rank_ratio_tc:.2f}, expert choice {at_n.rank_ratio_ec:.2f}; "
        f"expert choice keeps {at_n.slots_kept:.1%} of the slots and {at_n.gate_mass:.1%} of the top-k gate mass",
    ]
    if at_n.active_tc is not None and at_n.active_ec is not None and at_n.active_ec > at_n.active_tc + 0.5:
        reasons.append(f"experts with work: token choice {at_n.active_tc:.0f}, expert choice {at_n.active_ec:.0f} "
                       "(every expert chooses tokens; each active expert costs a full read of its weights)")
    if at_n.moe_ec_as_routed_us is not None and at_n.slots_kept < 1.0:
        routed = at_n.tc_us / (at_n.route_ec_us + at_n.moe_ec_as_routed_us)
        reasons.append(f"expert choice is charged as if it computed every slot; not computing the "
                       f"{1 - at_n.slots_kept:.1%} it drops would make it {_pct(routed)}, but that is quality "
                       "given away, not balance gained, so the verdict does not count it")
    if at_n.speedup < margin:
        reasons.append(f"that is below the {scenario} margin ({(margin - 1):.0%} faster needed): keep it off")
        return Decision(VERDICT_OFF, None, reasons)
    if at_n.gate_mass < MIN_GATE_MASS:
        reasons.append(f"expert choice keeps only {at_n.gate_mass:.1%} of the gate mass (< {MIN_GATE_MASS:.0%}): "
                       "the routing moves too far from what the model was trained with; keep it off "
                       "(or try a larger capacity factor with --capacity-factor)")
        return Decision(VERDICT_OFF, None, reasons)
    # smallest grid count from which expert choice is never slower, up to N
    upto = [p for p in points if p.tokens <= tokens]
    threshold = tokens
    for p in reversed(upto):
        if p.speedup >= 1.0:
            threshold = p.tokens
        else:
            break
    slower = [p for p in upto if p.speedup < 1.0]
    if threshold <= upto[0].tokens and not slower:
        reasons.append(f"expert choice is no slower at any batch from {upto[0].tokens} to {tokens} tokens: enable")
        return Decision(VERDICT_ENABLE, None, reasons)
    worst = min(slower, key=lambda p: p.speedup) if slower else None
    if worst is not None:
        reasons.append(f"below {threshold} tokens expert choice is slower (worst: {_pct(worst.speedup)} at "
                       f"{worst.tokens} tokens): keep SGLang's top-k there with --min-tokens {threshold}")
    return Decision(VERDICT_ENABLE_WITH, threshold, reasons)


def _pct(speedup: float) -> str:
    if speedup >= 1:
        return f"{(speedup - 1):.1%} faster"
    return f"{(1 / speedup - 1):.1%} slower"


def sglang_models_dir() -> str:
    """Where the installed SGLang package lives (found without importing it)."""
    try:
        spec = importlib.util.find_spec("sglang")
    except (ImportError, ValueError):
        spec = None
    if spec is not None and spec.submodule_search_locations:
        return list(spec.submodule_search_locations)[0]
    return "<sglang>"


def enable_command(preset: Preset, *, min_tokens: int | None, capacity_factor: float,
                   layers: str | None = None, sglang_root: str | None = None) -> str:
    root = sglang_root or sglang_models_dir()
    parts = ["ecpatch", "enable", f"{root.rstrip('/')}/{preset.model_file}"]
    if min_tokens is not None:
        parts += ["--min-tokens", str(min_tokens)]
    if layers:
        parts += ["--layers", layers]
    if capacity_factor != 1.25:
        parts += ["--capacity-factor", f"{capacity_factor:g}"]
    return " ".join(shlex.quote(p) if not p.startswith("<") else p for p in parts)


def _methods(table: dict) -> tuple[str, str]:
    have = {r["method"] for r in table["routing"] if r.get("us") is not None}
    tc = "sglang" if "sglang" in have else "topk"
    ec = "ec-cuda-drop" if "ec-cuda-drop" in have else "ec-torch-drop"
    return tc, ec


def project(preset: Preset, tokens_list, *, ep_ranks: int, table: dict, skew: str = DEFAULT_SKEW,
            capacity_factor: float = 1.25, seeds: int = 2, progress=None,
            device: str = "cpu") -> tuple[list[Point], dict]:
    """Projected points at each token count, and what was used (methods, shapes)."""
    model = ExpertTimeModel.from_dict(table["expert_time"])
    tc_method, ec_method = _methods(table)
    used = {"token_choice_router": tc_method, "expert_choice_router": ec_method,
            "expert_time_source": model.source}
    points = []
    for count in tokens_list:
        if progress:
            progress(f"advise: T={count}")
        rows = study_point(preset.experts, preset.top_k, count, skew, ranks=(ep_ranks,),
                           capacity_factor=capacity_factor, seeds=seeds, model=model, hidden=preset.hidden,
                           inter=preset.inter, methods=("token-choice", "ec-drop"),
                           renormalize=preset.renormalize, device=device)
        by = {r["method"]: r for r in rows}
        tc_route = table_mod.routing_us(table, tc_method, preset.experts, preset.top_k, count)
        ec_route = table_mod.routing_us(table, ec_method, preset.experts, preset.top_k, count)
        if tc_route is None or ec_route is None:
            raise table_mod.TableError(f"the measured table has no routing times for {tc_method} / {ec_method}")
        used["routing_shape"] = list(tc_route[1])
        g = str(ep_ranks)
        points.append(Point(
            tokens=count, route_tc_us=tc_route[0], route_ec_us=ec_route[0],
            moe_tc_us=by["token-choice"]["slowest_rank_us"][g],
            moe_ec_us=by["ec-drop"]["slowest_rank_us_equal_work"][g],
            moe_ec_as_routed_us=by["ec-drop"]["slowest_rank_us"][g],
            gate_mass=by["ec-drop"]["gate_mass"], slots_kept=by["ec-drop"]["slots_kept"],
            rank_ratio_tc=by["token-choice"]["max_mean_rank"][g], rank_ratio_ec=by["ec-drop"]["max_mean_rank"][g],
            active_tc=by["token-choice"]["active_experts"], active_ec=by["ec-drop"]["active_experts"],
        ))
    return points, used


def advise(preset: Preset, tokens: int, *, ep_ranks: int = 1, scenario: str = "online", table: dict,
           skew: str = DEFAULT_SKEW, capacity_factor: float = 1.25, layers: str | None = None,
           seeds: int = 2, sglang_root: str | None = None, progress=None, device: str = "cpu") -> dict:
    """The full advice as a JSON-ready dict (see `decide` for the rule)."""
    if tokens < 1:
        raise ValueError(f"--tokens must be >= 1, got {tokens}")
    if ep_ranks < 1 or ep_ranks > preset.experts:
        raise ValueError(f"--ep-ranks must be in [1, {preset.experts}] (the number of experts), got {ep_ranks}")
    if scenario not in SCENARIOS:
        raise ValueError(f"--scenario must be one of {', '.join(SCENARIOS)}, got {scenario!r}")
    grid = sorted({t for t in GRID if t < tokens} | {tokens})
    points, used = project(preset, grid, ep_ranks=ep_ranks, table=table, skew=skew,
                           capacity_factor=capacity_factor, seeds=seeds, progress=progress, device=device)
    decision = decide(points, tokens, scenario)
    reasons = list(decision.reasons)
    if used.get("routing_shape") != [preset.experts, preset.top_k]:
        e, k = used.get("routing_shape", ["?", "?"])
        reasons.append(f"routing times are those of the nearest measured router shape, {e} experts / top-{k}")
    if ep_ranks > 1 and preset.experts % ep_ranks:
        reasons.append(f"{preset.experts} experts do not split evenly over {ep_ranks} EP ranks "
                       "(SGLang needs an even split); the projection splits them as evenly as it can")
    reasons.append(_old_rule_line(decision, ep_ranks))
    layer_summary = _layer_summary(table, preset, tokens)
    if layer_summary:
        reasons.append(layer_summary)
    command = None
    if decision.verdict != VERDICT_OFF:
        command = enable_command(preset, min_tokens=decision.min_tokens, capacity_factor=capacity_factor,
                                 layers=layers, sglang_root=sglang_root)
    return {
        "verdict": decision.verdict,
        "min_tokens": decision.min_tokens,
        "command": command,
        "switch": "then start the server with SGLANG_EXPERT_CHOICE=1 (env mode) to route with expert choice"
        if command else None,
        "reasons": reasons,
        "inputs": {"model": preset.name, "experts": preset.experts, "top_k": preset.top_k, "tokens": tokens,
                   "ep_ranks": ep_ranks, "scenario": scenario, "skew": skew, "capacity_factor": capacity_factor},
        "used": used,
        "table": {"device": table["device"], "date": table["date"], "placeholder": table["placeholder"],
                  "command": table["command"]},
        "points": [p.to_dict() for p in points],
    }


def _old_rule_line(decision: Decision, ep_ranks: int) -> str:
    old = f"the old rule of thumb (enable above batch {OLD_RULE_TOKENS}, with EP, when load is very uneven)"
    if decision.verdict == VERDICT_OFF:
        return f"{old} does not apply here: the projection finds no gain worth the change"
    threshold = decision.min_tokens or 1
    ep = "with" if ep_ranks > 1 else "without"
    if threshold == OLD_RULE_TOKENS:
        return f"{old}: the projected threshold agrees ({threshold} tokens, {ep} EP)"
    return f"{old}: the projected threshold is {threshold} tokens {ep} EP, not {OLD_RULE_TOKENS}"


def _layer_summary(table: dict, preset: Preset, tokens: int) -> str | None:
    rows = table_mod.layer_rows(table, preset.experts, preset.top_k)
    if not rows:
        return None
    mode = "graph" if any(r["mode"] == "graph" for r in rows) else "eager"
    by = {}
    for r in rows:
        if r["mode"] == mode:
            by.setdefault(r["tokens"], {})[r["method"]] = r["us"]
    counts = [t for t in sorted(by) if "token-choice" in by[t] and "ec-drop" in by[t]]
    if not counts:
        return None
    near = min(counts, key=lambda t: abs(math.log(t) - math.log(tokens)))
    ratio = by[near]["ec-drop"] / by[near]["token-choice"]
    return (f"measured on {table['device']} (one GPU, no EP, {mode}): expert-choice layer time / token choice "
            f"= {ratio:.2f} at {near} tokens")


def threshold_rows(table: dict, presets, *, ep_ranks=(1, 8), skews=(DEFAULT_SKEW, "zipf-1"), tokens: int = 16384,
                   scenario: str = "offline", seeds: int = 2, device: str = "cpu") -> list[dict]:
    """The advice for each preset x EP size x skew at `tokens` (README's summary): what
    `ecpatch advise` prints for each, with its default number of draws."""
    rows = []
    for preset in presets:
        for g in ep_ranks:
            if g > preset.experts:
                continue
            for skew in skews:
                result = advise(preset, tokens, ep_ranks=g, scenario=scenario, table=table, skew=skew, seeds=seeds,
                                sglang_root="<sglang>", device=device)
                at_n = result["points"][-1]
                rows.append({"model": preset.name, "ep_ranks": g, "skew": skew, "tokens": tokens,
                             "verdict": result["verdict"], "min_tokens": result["min_tokens"],
                             "speedup": at_n["speedup"], "gate_mass": at_n["gate_mass"]})
    return rows


def threshold_markdown(rows: list[dict]) -> str:
    lines = ["| model | EP ranks | skew | verdict at T=%d | --min-tokens | EC speedup at T=%d | gate mass |"
             % (rows[0]["tokens"], rows[0]["tokens"]) if rows else "",
             "|---|---:|---|---|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['ep_ranks']} | {r['skew']} | {r['verdict']} | "
                     f"{r['min_tokens'] if r['min_tokens'] is not None else '-'} | {r['speedup']:.2f}x | "
                     f"{r['gate_mass']:.1%} |")
    return "\n".join(lines)
