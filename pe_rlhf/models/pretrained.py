"""`from_pretrained`: a Hugging Face checkpoint directory or a .gguf file -> (model, tokenizer)."""

from __future__ import annotations

import os

import jax.numpy as jnp


def _load_tokenizer(directory: str):
    """The checkpoint's tokenizer, or None when the directory ships none (tiny test checkpoints)."""
    names = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")
    if not any(os.path.exists(os.path.join(directory, n)) for n in names):
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(directory)


def from_pretrained(path: str, *, dtype=jnp.float32):
    """Load `(model, tokenizer)` from a HF directory (config.json + *.safetensors) or a `.gguf` file.

    Tensors are read one at a time into an abstractly built model, so peak host
    memory stays near one copy of the weights. `dtype` is the parameter dtype
    (float32 or bfloat16). The tokenizer is None for a directory without one.
    """
    from pe_rlhf.checkpoints import gguf_io, hf

    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"{path}: no such file or directory; expected a Hugging Face checkpoint directory or a .gguf file"
        )
    if os.path.isdir(path):
        return hf.load_directory(path, dtype=dtype), _load_tokenizer(path)
    if path.endswith(".gguf"):
        return gguf_io.load_gguf(path, dtype=dtype)
    raise ValueError(f"{path}: not a directory and not a .gguf file; cannot tell how to load it")
