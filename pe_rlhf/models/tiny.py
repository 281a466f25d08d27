"""A tiny model with a character-level tokenizer: for tests and the CPU quickstart.

The tokenizer is a real `transformers` fast tokenizer (WordLevel over single
characters, built with the `tokenizers` library), so the data pipeline, the
sampler and exports treat it like any other; nothing is downloaded.
"""

from __future__ import annotations

import string

import jax.numpy as jnp
from flax import nnx

from pe_rlhf.models.config import ModelConfig
from pe_rlhf.models.transformer import Transformer

SPECIALS = ("<pad>", "<eos>", "<bos>", "<unk>")
CHARS = string.ascii_letters + string.digits + string.punctuation + " \n"


def char_tokenizer():
    """pad=0, eos=1, bos=2, unk=3, then one id per printable ASCII character (vocab 100)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, decoders
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIALS)}
    vocab.update({c: len(SPECIALS) + i for i, c in enumerate(CHARS)})
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    backend.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>",
                                   bos_token="<bos>", unk_token="<unk>")


def tiny_config(family: str = "llama", *, vocab_size: int = len(SPECIALS) + len(CHARS), hidden_size: int = 64,
                num_layers: int = 2, num_heads: int = 4, num_kv_heads: int = 2, head_dim: int = 16,
                intermediate_size: int = 128, initializer_range: float = 0.2) -> ModelConfig:
    """A tiny config. The init std (0.2, not the usual 0.02) gives a random model peaked enough logits
    that a LoRA adapter can move its output distribution within a few dozen steps."""
    gemma = family == "gemma3"
    return ModelConfig(
        family=family, vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=intermediate_size,
        num_layers=num_layers, num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim,
        qk_norm=family in ("gemma3", "qwen3"), qkv_bias=family == "qwen2", tie_word_embeddings=True,
        sliding_window=8 if gemma else None,
        layer_types=tuple("full_attention" if i % 2 else "sliding_attention" for i in range(num_layers))
        if gemma else None,
        bos_token_id=2, eos_token_ids=(1,), pad_token_id=0, max_position_embeddings=1024,
        initializer_range=initializer_range,
    )


def tiny_model(family: str = "llama", *, seed: int = 0, dtype=jnp.float32, **shape):
    """(Transformer, tokenizer) with random weights and the character tokenizer."""
    return Transformer(tiny_config(family, **shape), dtype=dtype, rngs=nnx.Rngs(seed)), char_tokenizer()
