"""SGLang's TopK with expert-choice routing on a switch (vendored by sgl-ecpatch; do not edit).

`ecpatch enable` copies this module into ``sglang/srt/layers/moe/expert_choice/`` and
rewrites model files to import its `TopK` right after SGLang's own::

    from sglang.srt.layers.moe.topk import TopK
    from sglang.srt.layers.moe.expert_choice import TopK  # (ecpatch's marker comment)
    ...
    self.topk = TopK(top_k=..., renormalize=..., use_expert_choice=..., expert_capacity_factor=1.25)

`TopK` subclasses the TopK class of whatever SGLang runs it (0.4.9.post3 to 0.5.23) and
passes every argument except its own two through to that constructor unchanged.

Switch off (``use_expert_choice=False``): it *is* SGLang's TopK. Every forward goes to
SGLang's own method with the same arguments; nothing else is overridden.

Switch on: ``forward_native`` / ``forward_cuda`` (and ``forward_cpu``) route with
`expert_choice_topk` (ROUTING.md) and return SGLang's standard top-k output
``(topk_weights [T, k] float32, topk_ids [T, k] int32, router_logits [T, E])``:

* adaptive use: a batch of fewer than ``min_tokens`` rows (``router_logits.shape[0]``,
  a host value) takes SGLang's own top-k path; hybrid use: only layers whose
  ``layer_id`` is in the layer set route with expert choice. Defaults come from
  ``ecpatch enable --min-tokens/--layers`` (the stamp beside this file); the
  environment variables ``SGLANG_EXPERT_CHOICE_MIN_TOKENS`` /
  ``SGLANG_EXPERT_CHOICE_LAYERS`` override them; a bad value fails at construction
  (server start) naming the variable.
* backend: ``$SGLANG_EXPERT_CHOICE_BACKEND`` when set; otherwise the native (and CPU)
  forward uses the PyTorch path ("torch") and the CUDA forward picks ("auto").
* padding rows (``num_token_non_padded``, filled in by SGLang 0.5.23 itself) take no
  capacity and come back as SGLang writes them: id -1 and weight 0 (id 0 on ROCm,
  where SGLang writes 0 because its aiter kernels cannot take -1).
* EPLB: the logical->physical mapping of ``expert_location_dispatch_info`` is applied
  with SGLang's own `topk_ids_logical_to_physical`, to real ids only (a -1 would
  alias the last entry of the table), as SGLang applies it for standard routing.
* vacant slots (an expert-choice token chosen by fewer than k experts): id -1 and
  weight 0 reach only a runner that skips -1; for every other runner the id becomes a
  valid expert (the row's first expert, or expert 0 for a row no expert chose) with
  weight 0, so the output is the same and no -1 is read as an expert. Runners that
  skip -1 (decided from the SGLang code of each release):
    - any expert-parallel all-to-all backend (DeepEP, Mooncake, ...: -1 means "not
      dispatched" to them);
    - the Triton fused-MoE runner (``moe_runner_backend == "triton"``): its kernel
      writes zeros for a block whose expert id is -1 (``off_experts == -1`` in every
      release from 0.4.9.post3; 0.5.23 says "padding and nonlocal routes both use -1,
      including without EP").
  On ROCm every runner fills (SGLang itself writes 0, not -1, there). Everything else
  fills: the other runners (FlashInfer, CUTLASS, Marlin, aiter,
  DeepGEMM without DeepEP, the torch-native runner, which indexes weights with the id),
  "auto", and releases without a runner setting (0.4.9.post3 - 0.5.0).
* not covered by the routing, refused at construction with a message: grouped top-k,
  ``custom_routing_function``, fused shared-expert slots, scoring functions other than
  softmax/sigmoid, and an output format other than the standard one (``output_format=``,
  or on 0.5.23 the one ``bind_runner_backend`` picks for the MoE runner; on 0.5.1-0.5.22
  the global runner backends ``triton_kernel``, ``flashinfer_trtllm`` and
  ``flashinfer_mxfp4``, for which SGLang's forward_cuda skips standard output), and the NPU/XPU forwards (SGLang's own
  kernels route there; expert choice would silently not apply).

Known limit: an out-of-tree platform plugin (SGLang 0.5.18+) that registers a forward for
SGLang's TopK class by type does not see this subclass; such a platform falls back to
``forward_<platform>`` / ``forward_native`` here.
"""

from __future__ import annotations

import inspect
import json
import logging
import math
import numbers
import os
from pathlib import Path
from typing import Optional

import torch

from sglang.srt.layers.moe import topk as _sglang_topk

from . import expert_choice_topk
from .config import ENV_BACKEND, ENV_LAYERS, parse_layer_spec, settings_from_env

try:  # EPLB exists in every release that has TopK; keep the layer importable without it.
    from sglang.srt.eplb import expert_location_dispatch as _dispatch
except ImportError:  # pragma: no cover - very old or stripped-down trees
    _dispatch = None

__all__ = ["TopK"]

logger = logging.getLogger(__name__)

STAMP_PATH = Path(__file__).with_name("ecpatch_stamp.json")

_SGLangTopK = _sglang_topk.TopK
# StandardTopKOutput from 0.4.9.post5; before it TopKOutput was the plain NamedTuple.
_StandardOutput = getattr(_sglang_topk, "StandardTopKOutput", None) or _sglang_topk.TopKOutput
_OutputFormat = getattr(_sglang_topk, "TopKOutputFormat", None)
_IS_HIP = bool(getattr(_sglang_topk, "_is_hip", False))
_BASE_PARAMETERS = inspect.signature(_SGLangTopK.__init__).parameters

# Runners that skip an expert id of -1 (see the module docstring).
RUNNERS_SKIPPING_VACANT = frozenset({"triton"})
# 0.5.1-0.5.22: forward_cuda hands these global runner backends a TRITON_KERNEL or BYPASSED
# output instead of the standard one (0.5.23 decides per layer in bind_runner_backend).
RUNNERS_NEEDING_OTHER_FORMATS = frozenset({"triton_kernel", "flashinfer_trtllm", "flashinfer_mxfp4"})


def _stamp_defaults():
    """(min_tokens, layer set or None) given to `ecpatch enable` (the stamp beside this file)."""
    try:
        stamp = json.loads(STAMP_PATH.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        stamp = {}
    min_tokens = stamp.get("min_tokens") or 0
    layers = stamp.get("layers")
    return int(min_tokens), (parse_layer_spec(layers) if layers else None)


def _name_of(backend) -> Optional[str]:
    """'triton' from MoeRunnerBackend.TRITON, a registered backend or a plain string."""
    if backend is None:
        return None
    value = getattr(backend, "value", backend)
    return str(value).lower()


def _global_moe_backends():
    """(runner backend name, a2a backend name) from SGLang's globals, None where unknown."""
    runner = a2a = None
    try:
        from sglang.srt.layers import moe as _moe
    except ImportError:
        return None, None
    for getter, slot in (("get_moe_runner_backend", 0), ("get_moe_a2a_backend", 1)):
        function = getattr(_moe, getter, None)
        if function is None:
            continue
        try:
            name = _name_of(function())
        except Exception:  # globals not initialised (outside a server)
            name = None
        if slot == 0:
            runner = name
        else:
            a2a = name
    return runner, a2a


class TopK(_SGLangTopK):
    """SGLang's TopK plus ``use_expert_choice`` and ``expert_capacity_factor`` (see the module docstring)."""

    def __init__(self, *args, use_expert_choice: bool = False, expert_capacity_factor: float = 1.25, **kwargs):
        super().__init__(*args, **kwargs)
        self.use_expert_choice = bool(use_expert_choice)
        self.expert_capacity_factor = expert_capacity_factor
        self.expert_choice_settings = None
        self.expert_choice_layer = False  # this layer routes with expert choice (switch on and in the layer set)
        self._vacant_policy = None  # "skip" or "fill", decided on the first expert-choice forward
        if self.use_expert_choice:
            self._setup_expert_choice(args, kwargs)
        if not self.expert_choice_layer:
            # Never expert choice here: pin SGLang's own forwards on the instance, so the
            # calls skip even the switch check of this class (same path, same cost).
            for name in ("forward_native", "forward_cuda", "forward_cpu"):
                if hasattr(_SGLangTopK, name):
                    self.__dict__[name] = getattr(super(), name)
            # CustomOp (to 0.5.7) picks the forward inside __init__, before the pins above.
            chosen = self.__dict__.get("_forward_method")
            name = getattr(getattr(chosen, "__func__", None), "__name__", None)
            if name in self.__dict__ and getattr(chosen, "__func__", None) is getattr(TopK, name, None):
                self.__dict__["_forward_method"] = self.__dict__[name]

    # ------------------------------------------------------------------ construction

    def _argument(self, kwargs: dict, name: str, default=None):
        """A constructor argument as given, else as SGLang stored it (topk_config or self)."""
        if name in kwargs:
            return kwargs[name]
        config = getattr(self, "topk_config", None)
        if config is not None and hasattr(config, name):
            return getattr(config, name)
        return getattr(self, name, default)

    def _refuse(self, what: str, hint: str = "") -> None:
        layer = getattr(self, "layer_id", None)
        where = f" (layer {layer})" if layer is not None else ""
        raise ValueError(
            f"expert-choice TopK{where}: use_expert_choice=True does not cover {what}. "
            + (hint + " " if hint else "")
            + "Switch it off for this model (SGLANG_EXPERT_CHOICE=0) or run `ecpatch disable` on the model file."
        )

    def _setup_expert_choice(self, args: tuple, kwargs: dict) -> None:
        cf = self.expert_capacity_factor
        if (isinstance(cf, bool) or not isinstance(cf, numbers.Real) or not math.isfinite(cf) or not cf > 0):
            raise ValueError(f"expert-choice TopK: expert_capacity_factor must be a finite number > 0, got {cf!r}")

        top_k = args[0] if args else kwargs.get("top_k")
        if top_k is None:
            top_k = getattr(self, "top_k", None)
        self._ec_top_k = int(top_k)

        if self._argument(kwargs, "use_grouped_topk", False):
            self._refuse("grouped top-k (use_grouped_topk=True)")
        if self._argument(kwargs, "custom_routing_function") is not None:
            self._refuse("a custom_routing_function")
        scoring_func = kwargs.get("scoring_func", "softmax")
        if scoring_func not in ("softmax", "sigmoid"):
            self._refuse(f"scoring_func={scoring_func!r} (softmax and sigmoid only)")
        self._ec_scoring_func = scoring_func
        if self._argument(kwargs, "num_fused_shared_experts", 0):
            self._refuse("fused shared experts (num_fused_shared_experts > 0)")
        config = getattr(self, "topk_config", None)
        if config is not None and getattr(config, "num_shared_topk_slots", 0):
            self._refuse("fused shared-expert slots (this server fuses shared experts into TopK)",
                         "Start the server without shared-expert fusion.")
        for flag, platform in (("_is_npu", "Ascend NPU"), ("_is_xpu", "Intel XPU")):
            if getattr(_sglang_topk, flag, False):
                self._refuse(f"the {platform} routing path (expert choice runs in the CUDA, ROCm, native and CPU forwards)")
        if getattr(self, "enable_waterfill", False):
            self._refuse("Waterfill shared-expert balancing")
        output_format = kwargs.get("output_format")
        if output_format is not None and _OutputFormat is not None and output_format != _OutputFormat.STANDARD:
            self._refuse(f"output_format={getattr(output_format, 'name', output_format)} (standard output only)")
        if not hasattr(_SGLangTopK, "bind_runner_backend") and _OutputFormat is not None and output_format is None:
            # 0.5.1-0.5.22: forward_cuda picks the format from the global runner backend.
            runner, _ = _global_moe_backends()
            if runner in RUNNERS_NEEDING_OTHER_FORMATS:
                self._refuse(f"the MoE runner backend {runner!r}, which takes another top-k output format "
                             "than standard ids and weights", "Use --moe-runner-backend triton (or auto).")

        default_min_tokens, default_layers = _stamp_defaults()
        try:
            settings = settings_from_env(default_min_tokens=default_min_tokens, default_layers=default_layers)
        except ValueError as exc:
            raise ValueError(f"expert-choice TopK: {exc}") from None
        layer_id = kwargs.get("layer_id", getattr(self, "layer_id", None))
        if settings.layers is not None and layer_id is None:
            raise ValueError(
                "expert-choice TopK: a layer set is given (--layers at enable, or "
                f"{ENV_LAYERS}) but this SGLang release passes TopK no layer_id, so the set cannot "
                f"be applied; unset {ENV_LAYERS} (or re-run `ecpatch enable --layers all`)."
            )
        self.expert_choice_settings = settings
        self.expert_choice_layer = settings.layer_enabled(layer_id)
        self._ec_layer_id = layer_id

    if hasattr(_SGLangTopK, "bind_runner_backend"):

        def bind_runner_backend(self, runner_backend, *args, **kwargs):
            """SGLang's binding; then refuse a runner that needs a non-standard output format."""
            result = super().bind_runner_backend(runner_backend, *args, **kwargs)
            if self.use_expert_choice and self.expert_choice_layer and _OutputFormat is not None:
                chosen = getattr(getattr(self, "topk_config", None), "output_format", None)
                if chosen is not None and chosen != _OutputFormat.STANDARD:
                    self._refuse(
                        f"the MoE runner {_name_of(runner_backend)!r}, which takes "
                        f"{getattr(chosen, 'name', chosen)} top-k output instead of standard ids and weights",
                        "Use --moe-runner-backend triton (or another runner that takes standard top-k output).",
                    )
            self._vacant_policy = None
            return result

    # ------------------------------------------------------------------------- forward

    def forward_native(self, hidden_states, router_logits, *args, **kwargs):
        if not self._routes_now(router_logits, kwargs):
            return super().forward_native(hidden_states, router_logits, *args, **kwargs)
        impl = None if os.environ.get(ENV_BACKEND, "").strip() else "torch"
        return self._expert_choice_forward(hidden_states, router_logits, impl, **kwargs)

    def forward_cuda(self, hidden_states, router_logits, *args, **kwargs):
        if not self._routes_now(router_logits, kwargs):
            return super().forward_cuda(hidden_states, router_logits, *args, **kwargs)
        return self._expert_choice_forward(hidden_states, router_logits, None, **kwargs)

    if hasattr(_SGLangTopK, "forward_cpu"):

        def forward_cpu(self, hidden_states, router_logits, *args, **kwargs):
            if not self._routes_now(router_logits, kwargs):
                return super().forward_cpu(hidden_states, router_logits, *args, **kwargs)
            impl = None if os.environ.get(ENV_BACKEND, "").strip() else "torch"
            return self._expert_choice_forward(hidden_states, router_logits, impl, **kwargs)

    def _routes_now(self, router_logits, kwargs) -> bool:
        """Expert choice for this call? Host values only (shape, settings): no device sync."""
        if not (self.use_expert_choice and self.expert_choice_layer):
            return False
        if router_logits.shape[0] < self.expert_choice_settings.min_tokens:
            return False
        if kwargs.get("dynamic_expert_bias") is not None:
            # A per-token bias is outside the routing contract: SGLang's own routing takes it.
            if not getattr(self, "_warned_dynamic_bias", False):
                self._warned_dynamic_bias = True
                logger.warning("expert-choice TopK: dynamic_expert_bias given; SGLang's own top-k routes those calls")
            return False
        return True

    def _expert_choice_forward(self, hidden_states, router_logits, impl, *, num_token_non_padded=None,
                               expert_location_dispatch_info=None, router_logits_partials=None, **unused):
        if router_logits_partials is not None:
            # ROCm decode router: the logits are the fixed-order sum of these partials.
            _sglang_topk.rocm_router_reduce_partials(router_logits_partials, router_logits)
        resolve = getattr(self, "_resolve_routing_inputs", None)
        if resolve is not None:  # 0.5.23: the padding count and EPLB info from the forward context
            num_token_non_padded, expert_location_dispatch_info = resolve(
                num_token_non_padded, expert_location_dispatch_info)
        info = expert_location_dispatch_info
        correction_bias = self._argument({}, "correction_bias")
        if info is not None and _dispatch is not None:
            if info.ep_dispatch_algorithm == "lp":
                raise NotImplementedError(
                    "expert-choice TopK: ep_dispatch_algorithm='lp' (LP-balanced EPLB) is not supported; "
                    "use static or dynamic dispatch")
            transform = getattr(_dispatch, "transform_select_experts_inputs", None)
            if transform is not None:  # the "fake" benchmark algorithm randomises the logits
                router_logits, correction_bias = transform(
                    router_logits=router_logits, correction_bias=correction_bias, info=info)

        topk_weights, topk_ids = expert_choice_topk(
            router_logits,
            self._ec_top_k,
            capacity_factor=self.expert_capacity_factor,
            renormalize=bool(self._argument({}, "renormalize", True)),
            scoring_func=self._ec_scoring_func,
            correction_bias=correction_bias,
            num_token_non_padded=num_token_non_padded,
            fill="drop",
            impl=impl,
        )
        scale = self._argument({}, "routed_scaling_factor")
        if scale is not None and self._argument({}, "apply_routed_scaling_factor_on_output", False):
            topk_weights = topk_weights * scale

        num_tokens = topk_ids.shape[0]
        valid_row = None
        if num_token_non_padded is not None:
            rows = torch.arange(num_tokens, device=topk_ids.device)
            limit = num_token_non_padded
            if isinstance(limit, torch.Tensor):
                limit = limit.reshape(()).to(topk_ids.device)
            valid_row = (rows < limit)[:, None]

        if self._vacant_slots_policy() == "fill":
            topk_ids = self._fill_vacant(topk_ids, valid_row)

        self._capture(topk_ids)  # routed-experts capture records logical ids, as SGLang does
        if info is not None and _dispatch is not None:
            vacant = topk_ids < 0
            physical = _dispatch.topk_ids_logical_to_physical(topk_ids.masked_fill(vacant, 0), info)
            topk_ids = physical.to(topk_ids.dtype).masked_fill(vacant, -1)
        if _IS_HIP and valid_row is not None:
            topk_ids = topk_ids.masked_fill(~valid_row, 0)
        self._record(topk_ids)
        return _StandardOutput(topk_weights, topk_ids, router_logits)

    # ----------------------------------------------------------------- vacant slots

    def _vacant_slots_policy(self) -> str:
        """'skip' when the bound runner skips id -1, else 'fill' (cached; see the docstring)."""
        if self._vacant_policy is None:
            runner, a2a = _global_moe_backends()
            if hasattr(_SGLangTopK, "bind_runner_backend"):
                # 0.5.23: the experts bind their resolved runner; None there means a direct
                # kernel that consumes standard top-k, so only a bound name counts.
                config = getattr(self, "topk_config", None)
                runner = _name_of(getattr(config, "runner_backend", None)) if config is not None else None
            skips = a2a not in (None, "none") or runner in RUNNERS_SKIPPING_VACANT
            if skips and not _IS_HIP:  # ROCm's aiter kernels read -1 as an index: always fill there
                self._vacant_policy = "skip"
            else:
                self._vacant_policy = "fill"
        return self._vacant_policy

    @staticmethod
    def _fill_vacant(topk_ids: torch.Tensor, valid_row: Optional[torch.Tensor]) -> torch.Tensor:
        """Vacant slots of valid rows -> the row's first expert (0 for an empty row), on device."""
        first = topk_ids[:, :1]
        replacement = first.masked_fill(first < 0, 0).expand_as(topk_ids)
        vacant = topk_ids < 0
        if valid_row is not None:
            vacant = vacant & valid_row
        return torch.where(vacant, replacement, topk_ids)

    # ------------------------------------------------------------- SGLang's bookkeeping

    def _capture(self, topk_ids: torch.Tensor) -> None:
        capture = getattr(_sglang_topk, "capture_routed_experts_if_allowed", None)
        config = getattr(self, "topk_config", None)
        if capture is not None and config is not None:
            capture(config, self._ec_layer_id, topk_ids)

    @staticmethod
    def _record(topk_ids: torch.Tensor) -> None:
        recorder = getattr(_sglang_topk, "get_global_expert_distribution_recorder", None)
        if recorder is not None:
            recorder().on_select_experts(topk_ids=topk_ids)

    def extra_repr(self) -> str:
        base = super().extra_repr()
        if not self.use_expert_choice:
            return base
        settings = self.expert_choice_settings
        mine = (f"use_expert_choice=True, expert_capacity_factor={self.expert_capacity_factor}, "
                f"layer_routes={self.expert_choice_layer}, min_tokens={settings.min_tokens}")
        return f"{base}, {mine}" if base else mine


def _signature() -> inspect.Signature:
    """SGLang's constructor signature plus the two keyword-only parameters of this class."""
    parameters = [p for p in _BASE_PARAMETERS.values() if p.kind is not inspect.Parameter.VAR_KEYWORD]
    extra = [
        inspect.Parameter("use_expert_choice", inspect.Parameter.KEYWORD_ONLY, default=False),
        inspect.Parameter("expert_capacity_factor", inspect.Parameter.KEYWORD_ONLY, default=1.25),
    ]
    tail = [p for p in _BASE_PARAMETERS.values() if p.kind is inspect.Parameter.VAR_KEYWORD]
    try:
        return inspect.Signature(parameters + extra + tail)
    except ValueError:  # an unusual base signature: fall back to the plain one
        return inspect.signature(TopK.__init__)


TopK.__init__.__signature__ = _signature()
