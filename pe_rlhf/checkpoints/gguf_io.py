"""GGUF files (llama.cpp): config, tokenizer and weights, dequantized with `gguf` and NumPy.

No torch at run time: `gguf.GGUFReader` memory-maps the file and each tensor is
dequantized on its own as the model is filled, so the host holds about one
float copy of the model.
"""

from __future__ import annotations

import re

import jax.numpy as jnp
import numpy as np

from pe_rlhf.checkpoints.hf import CheckpointError, fill_model
from pe_rlhf.models.config import ModelConfig, UnsupportedModelError, from_hf_config

# general.architecture -> transformers model_type
_ARCH_TO_MODEL_TYPE = {"gemma3": "gemma3_text", "llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}

# GGUF metadata key (after "<arch>.") -> transformers config key
_CONFIG_KEYS = {
    "context_length": "max_position_embeddings",
    "block_count": "num_hidden_layers",
    "feed_forward_length": "intermediate_size",
    "embedding_length": "hidden_size",
    "attention.head_count": "num_attention_heads",
    "attention.head_count_kv": "num_key_value_heads",
    "attention.layer_norm_rms_epsilon": "rms_norm_eps",
    "attention.key_length": "head_dim",
    "attention.sliding_window": "sliding_window",
    "rope.freq_base": "rope_theta",
}

# GGUF block tensor -> HF module name (".weight"/".bias" kept)
_BLOCK_NAMES = {
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm",
    "attn_norm": "input_layernorm", "post_attention_norm": "post_attention_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}
_TOP_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}


def _reader(path: str):
    import gguf

    try:
        return gguf.GGUFReader(path)
    except Exception as e:  # the gguf package raises bare ValueErrors/struct errors on damage
        raise CheckpointError(f"{path}: not a readable GGUF file ({type(e).__name__}: {e})") from e


def _field_value(field):
    """A metadata field as a Python value; arrays are read straight from their parts (fast for 262k tokens)."""
    from gguf import GGUFValueType

    if field.types and field.types[0] == GGUFValueType.ARRAY and len(field.types) == 2:
        if field.types[1] == GGUFValueType.STRING:
            return [bytes(field.parts[i]).decode("utf-8") for i in field.data]
        if field.types[1] != GGUFValueType.ARRAY:
            return np.concatenate([field.parts[i] for i in field.data]).tolist() if field.data else []
    return field.contents()


def read_metadata(reader) -> dict:
    """All metadata fields as Python values."""
    meta = {}
    for key, field in reader.fields.items():
        try:
            meta[key] = _field_value(field)
        except Exception:  # noqa: BLE001 - a field kind gguf cannot decode is not one we need
            continue
    return meta


def hf_config_dict(meta: dict, tensor_names: set[str], path: str) -> dict:
    arch = meta.get("general.architecture")
    if arch not in _ARCH_TO_MODEL_TYPE:
        raise UnsupportedModelError(
            f"{path}: GGUF architecture {arch!r} is not supported; supported: {', '.join(sorted(_ARCH_TO_MODEL_TYPE))}"
        )
    if "rope_freqs.weight" in tensor_names:
        raise UnsupportedModelError(
            f"{path}: this GGUF stores RoPE scaling as a rope_freqs tensor, which is not supported; "
            "load the Hugging Face safetensors checkpoint instead"
        )
    cfg = {"model_type": _ARCH_TO_MODEL_TYPE[arch]}
    for key, hf_key in _CONFIG_KEYS.items():
        if f"{arch}.{key}" in meta:
            cfg[hf_key] = meta[f"{arch}.{key}"]
    cfg["vocab_size"] = len(meta["tokenizer.ggml.tokens"])
    cfg["tie_word_embeddings"] = "output.weight" not in tensor_names
    if arch in ("qwen2", "qwen3", "llama"):
        cfg["attention_bias"] = "blk.0.attn_q.bias" in tensor_names and arch != "qwen2"
    for ours, key in (("bos_token_id", "bos_token_id"), ("eos_token_id", "eos_token_id"),
                      ("pad_token_id", "padding_token_id")):
        if f"tokenizer.ggml.{key}" in meta:
            cfg[ours] = int(meta[f"tokenizer.ggml.{key}"])
    return cfg


def _hf_name(gguf_name: str, cfg: ModelConfig) -> str | None:
    base, _, suffix = gguf_name.rpartition(".")
    if base in _TOP_NAMES:
        return f"{_TOP_NAMES[base]}.{suffix}"
    m = re.fullmatch(r"blk\.(\d+)\.(\w+)", base)
    if not m:
        return None
    layer, kind = m.groups()
    if kind == "ffn_norm":  # the norm before the MLP
        module = "pre_feedforward_layernorm" if cfg.is_gemma else "post_attention_layernorm"
    else:
        module = _BLOCK_NAMES.get(kind)
    return None if module is None else f"model.layers.{layer}.{module}.{suffix}"


def _unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's interleaving of Q/K rows for Llama's rotary layout."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _tensors(reader, cfg: ModelConfig, path: str):
    from gguf import GGMLQuantizationType, dequantize

    for t in reader.tensors:
        hf = _hf_name(t.name, cfg)
        if hf is None:
            continue

        def load(t=t, hf=hf):
            if t.tensor_type in (GGMLQuantizationType.F32, GGMLQuantizationType.F16):
                w = np.asarray(t.data, np.float32).reshape(tuple(reversed([int(d) for d in t.shape])))
            else:
                w = dequantize(t.data, t.tensor_type).astype(np.float32)
            if cfg.is_gemma and hf.endswith("norm.weight"):
                w = w - 1.0  # llama.cpp stores Gemma norms as (1 + w)
            if cfg.family == "llama" and hf.endswith("q_proj.weight"):
                w = _unpermute(w, cfg.num_heads)
            elif cfg.family == "llama" and hf.endswith("k_proj.weight"):
                w = _unpermute(w, cfg.num_kv_heads)
            return w

        yield hf, load, f"{path} (tensor {t.name})"


def load_tokenizer(meta: dict):
    """A transformers fast tokenizer from the vocabulary stored in the GGUF metadata."""
    from transformers import PreTrainedTokenizerFast
    from transformers.integrations.gguf.gguf_tokenizer_mapping import (
        GGUF_TOKENIZER_MAPPING, convert_gguf_tokenizer)

    def group(name):
        return {ours: meta[f"tokenizer.{key}"] for key, ours in GGUF_TOKENIZER_MAPPING[name].items()
                if f"tokenizer.{key}" in meta}

    tokenizer_dict, tokenizer_config = group("tokenizer"), group("tokenizer_config")
    if tokenizer_dict.get("tokenizer_type") == "llama":
        tokenizer_config.setdefault("add_bos_token", True)
    tokens = tokenizer_dict["tokens"]
    for name, key in (("bos_token", "bos_token_id"), ("eos_token", "eos_token_id"),
                      ("unk_token", "unknown_token_id"), ("pad_token", "padding_token_id")):
        if f"tokenizer.ggml.{key}" in meta:
            tokenizer_config[name] = tokens[int(meta[f"tokenizer.ggml.{key}"])]
    backend, _ = convert_gguf_tokenizer(meta["general.architecture"], tokenizer_dict)
    return PreTrainedTokenizerFast(tokenizer_object=backend, **tokenizer_config)


def load_gguf(path: str, dtype=jnp.float32, with_tokenizer: bool = True):
    """(model, tokenizer) from a .gguf file."""
    from transformers import AutoConfig

    reader = _reader(path)
    meta = read_metadata(reader)
    names = {t.name for t in reader.tensors}
    raw = hf_config_dict(meta, names, path)
    hf_config = AutoConfig.for_model(**raw)
    cfg = from_hf_config(hf_config, where=path)
    model = fill_model(cfg, _tensors(reader, cfg, path), dtype=dtype, source=path)
    tokenizer = load_tokenizer(meta) if with_tokenizer else None
    return model, tokenizer


def gguf_hf_config(path: str):
    """The transformers config a GGUF file describes (for exports and references)."""
    from transformers import AutoConfig

    reader = _reader(path)
    return AutoConfig.for_model(**hf_config_dict(read_metadata(reader), {t.name for t in reader.tensors}, path))


__all__ = ["load_gguf", "load_tokenizer", "gguf_hf_config", "read_metadata"]
