# An example model file in the style of SGLang's qwen2_moe.py, written for ecpatch.
# It is not SGLang code: it keeps only what the patch engine looks at, a sparse MoE block
# whose router is built with `TopK(...)` in `__init__`, so that the commands of the
# README can be tried on a fresh machine without installing SGLang.
"""Qwen2-MoE-like model (example for ecpatch)."""

from __future__ import annotations

from dataclasses import dataclass

from sglang.srt.layers.moe.topk import TopK


@dataclass
class ExampleMoeConfig:
    hidden_size: int = 64
    num_experts: int = 8
    num_experts_per_tok: int = 2
    norm_topk_prob: bool = False
    num_hidden_layers: int = 2


class Qwen2MoeSparseMoeBlock:
    """Router + experts of one decoder layer (the experts are left out of the example)."""

    def __init__(self, config: ExampleMoeConfig, layer_id: int = 0) -> None:
        self.num_experts = config.num_experts
        self.layer_id = layer_id
        # The router: picks experts for every token. ecpatch rewrites this call.
        self.topk = TopK(
            top_k=config.num_experts_per_tok,
            renormalize=config.norm_topk_prob,
            layer_id=layer_id,
        )

    def route(self, hidden_states, router_logits):
        """router_logits: [T, E] -> (topk_weights [T, k], topk_ids [T, k], router_logits)."""
        return self.topk(hidden_states, router_logits)


class Qwen2MoeModel:
    def __init__(self, config: ExampleMoeConfig) -> None:
        self.layers = [Qwen2MoeSparseMoeBlock(config, layer_id=i) for i in range(config.num_hidden_layers)]
