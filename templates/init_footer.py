# ---- added by sgl-ecpatch (templates/init_footer.py) ---------------------------------------
# `TopK` subclasses SGLang's own TopK, so it is imported on first use only: model files
# patched by ecpatch do `from sglang.srt.layers.moe.expert_choice import TopK`, while
# importing the routing functions of this package alone never imports SGLang.

_ecpatch_runtime_getattr = globals().get("__getattr__")


def __getattr__(name):
    if name == "TopK":
        from .topk_layer import TopK

        globals()["TopK"] = TopK
        return TopK
    if _ecpatch_runtime_getattr is not None:
        return _ecpatch_runtime_getattr(name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
