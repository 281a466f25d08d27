"""pe-rlhf: parameter-efficient RLHF (LoRA reward models and LoRA REINFORCE/ReMax) in JAX/Flax."""

__version__ = "0.1.0"
