"""CUDA kernel of expert-choice routing (stub until the kernel lands).

Contract used by sgl_ecpatch.runtime's dispatcher:
    try_load(device=None) -> (module_or_None, reason_or_None)   # never raises
    expert_choice_topk_cuda(router_logits, top_k, *, capacity_factor, renormalize,
                            scoring_func, correction_bias, num_token_non_padded, fill)
        -> (topk_weights [T,k] float32, topk_ids [T,k] int32)
"""


def try_load(device=None):
    return None, "the CUDA kernel is not part of this build yet"


def expert_choice_topk_cuda(*args, **kwargs):
    raise RuntimeError("the CUDA kernel is not part of this build yet")
