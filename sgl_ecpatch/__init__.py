"""sgl-ecpatch: expert-choice routing for SGLang MoE models."""

__version__ = "0.1.0"
