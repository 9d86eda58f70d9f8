"""A tiny stand-in for SGLang's ``sglang.srt.layers.moe.topk.TopK`` (written for ecpatch).

It keeps the parts of the real constructor that matter to the patch engine: ``top_k`` is the
only positional parameter, everything else is keyword-only, and unknown keywords (such as
``use_expert_choice=``) are rejected, just as SGLang's class rejects them. The routing is a
plain softmax top-k so that the example model runs on a CPU.
"""

from __future__ import annotations

from typing import NamedTuple, Optional


class TopKOutput(NamedTuple):
    topk_weights: "object"
    topk_ids: "object"
    router_logits: "object"


class TopK:
    """Token-choice routing: every token picks its `top_k` highest-scoring experts."""

    def __init__(
        self,
        top_k: int,
        *,
        renormalize: bool = True,
        layer_id: Optional[int] = None,
        use_grouped_topk: bool = False,
        custom_routing_function=None,
    ) -> None:
        self.top_k = top_k
        self.renormalize = renormalize
        self.layer_id = layer_id
        self.use_grouped_topk = use_grouped_topk
        self.custom_routing_function = custom_routing_function

    def __call__(self, hidden_states, router_logits) -> TopKOutput:
        import torch

        scores = torch.softmax(router_logits.float(), dim=-1)
        weights, ids = torch.topk(scores, self.top_k, dim=-1)
        if self.renormalize:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return TopKOutput(weights, ids.to(torch.int32), router_logits)
