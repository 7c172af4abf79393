"""``v4kernels.model_ref``: the complete DeepSeek-V4 forward pass on v4kernels ops.

``config`` (V4-Flash / V4-Pro / tiny presets, Hugging Face config.json), ``weights`` (random
initialisation in the official checkpoint layout, safetensors I/O), ``hf_format`` (transformers
state-dict names), ``cache`` (paged caches of a batch of sequences), ``model`` (prefill, decode, MTP),
``graph`` (decode steps replayed from a CUDA graph).
``python -m v4kernels.model_ref demo`` runs the demo.
"""
from .config import ModelConfig, flash, from_hf_config, pro, tiny  # noqa: F401
