"""Checkpoint formats: Hugging Face safetensors, GGUF; loading a model source (`from_pretrained`, `load_backbone`)."""

from pe_rlhf.checkpoints.hf import CheckpointError, hf_names, state_dict
from pe_rlhf.checkpoints.load import KNOWN_MODELS, from_pretrained, load_backbone

__all__ = ["CheckpointError", "KNOWN_MODELS", "from_pretrained", "hf_names", "load_backbone", "state_dict"]
