"""Qwen3 dense / MoE models in Flax NNX, HF safetensors I/O and sharding helpers."""
from agq_jax.models.config import PRESETS, Qwen3Config

__all__ = ["PRESETS", "Qwen3Config"]
