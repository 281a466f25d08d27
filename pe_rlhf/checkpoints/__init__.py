"""Checkpoint formats: Hugging Face safetensors, GGUF."""

from pe_rlhf.checkpoints.hf import CheckpointError, hf_names, state_dict

__all__ = ["CheckpointError", "hf_names", "state_dict"]
