"""Decoder models: one transformer with family presets, LoRA, the reward head.

Loading weights into them (`from_pretrained`, `load_backbone`) is `pe_rlhf.checkpoints`' job.
"""

from pe_rlhf.models.config import PRESETS, ModelConfig, RopeConfig, UnsupportedModelError, from_hf_config, preset
from pe_rlhf.models.kv_cache import KVCache
from pe_rlhf.models.transformer import Linear, RMSNorm, Transformer

__all__ = [
    "PRESETS", "ModelConfig", "RopeConfig", "UnsupportedModelError", "from_hf_config", "preset",
    "KVCache", "Linear", "RMSNorm", "Transformer",
]
