"""The decoder, its configuration and presets, and its FLOPs count."""

from phased_jax.model.cache import KVCache
from phased_jax.model.config import PRESETS, ModelConfig, get_preset
from phased_jax.model.transformer import Transformer

__all__ = ["PRESETS", "KVCache", "ModelConfig", "Transformer", "get_preset"]
