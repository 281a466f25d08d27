"""Tiny random checkpoints and padded batches shared by the model tests."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from flax import nnx

VOCAB = 128

# Every tiny config: GQA (4 query heads share 2 key/value heads), head_dim 16.
TINY = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, max_position_embeddings=256)

# model_type -> extra config keys: the switch each family is here to exercise.
FAMILIES = {
    # Llama-3 rope scaling; with theta 1e4 and head_dim 16 the wavelengths span the scaled, smoothed
    # and unscaled bands of original_max_position_embeddings=64.
    "llama": dict(rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
                  tie_word_embeddings=False),
    "qwen2": dict(tie_word_embeddings=True),  # QKV bias
    "qwen3": dict(tie_word_embeddings=False),  # QK-norm
    # Two sliding layers (window 4, shorter than every test sequence) and one full layer.
    "gemma3_text": dict(sliding_window=4, layer_types=["sliding_attention", "sliding_attention", "full_attention"],
                        query_pre_attn_scalar=24, rope_local_base_freq=100.0),
}


def hf_config(model_type: str, **overrides):
    from transformers import AutoConfig

    kw = dict(TINY, **FAMILIES[model_type])
    kw.update(overrides)
    return AutoConfig.for_model(model_type, **kw)


def random_hf_model(config, seed: int = 0):
    """A transformers model from `config` with weights at the scale of a trained model.

    Matrices ~ N(0, 1/fan_in) and embeddings ~ N(0, 1), instead of HF's N(0, 0.02^2) init under which
    attention is nearly uniform and rope or masking mistakes move logits by little; norms and biases
    are perturbed by N(0, 0.1^2) so none is trivial (1 or 0).
    """
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or "bias" in name:
                p.add_(0.1 * torch.randn_like(p))
            elif "embed_tokens" in name:
                p.normal_(0.0, 1.0)
            else:  # [out, in] projections and the untied lm_head
                p.normal_(0.0, p.shape[1] ** -0.5)
    return model


def left_padded_batch(seed: int, lengths: list[int], total: int):
    """(ids_BxT, mask_BxT) with row b holding lengths[b] real tokens at its right end."""
    ids = np.random.RandomState(seed).randint(0, VOCAB, (len(lengths), total))
    mask = np.zeros((len(lengths), total), np.int64)
    for b, n in enumerate(lengths):
        mask[b, total - n:] = 1
    return ids, mask


def hf_logits(model, ids, mask):
    """Reference float32 logits with HF position_ids = cumsum(mask) - 1, clipped at 0."""
    import torch

    pos = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
    with torch.no_grad():
        out = model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), position_ids=torch.tensor(pos))
    return out.logits.float().numpy()


def randomize(model, seed: int = 0):
    """Give an nnx Transformer non-trivial weights in place: kernels ~ N(0, 1/fan_in), embedding ~ N(0, 1),
    norm scales and biases moved off their initial values by N(0, 0.1^2)."""
    rng = np.random.RandomState(seed)
    flat = nnx.to_flat_state(nnx.state(model, nnx.Param))
    for path, var in flat:
        value = np.asarray(var.get_value(), np.float32)
        noise = rng.standard_normal(value.shape).astype(np.float32)
        if path[-1] == "kernel":
            new = noise / np.sqrt(value.shape[0])
        elif path[-1] == "embedding":
            new = noise
        else:  # norm scales and biases
            new = value + 0.1 * noise
        var.set_value(jnp.asarray(new, var.get_value().dtype))
    nnx.update(model, nnx.from_flat_state(flat))
    return model
