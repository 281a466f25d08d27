"""Decoder models: one transformer, family presets, checkpoint loading."""

from pe_rlhf.models.config import PRESETS, ModelConfig, RopeConfig, UnsupportedModelError, from_hf_config, preset
from pe_rlhf.models.pretrained import from_pretrained
from pe_rlhf.models.transformer import KVCache, Linear, RMSNorm, Transformer

__all__ = [
    "PRESETS", "ModelConfig", "RopeConfig", "UnsupportedModelError", "from_hf_config", "preset",
    "from_pretrained", "KVCache", "Linear", "RMSNorm", "Transformer",
]
