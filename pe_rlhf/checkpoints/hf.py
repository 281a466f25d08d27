"""Hugging Face checkpoints: parameter names, streaming safetensors load, and save.

Our parameter tree and the HF state dict differ only in names and in the
orientation of projection kernels (ours [in, out], HF's [out, in]). `hf_names`
is the one table between the two; loading and saving both read it.
"""

from __future__ import annotations

import json
import os
from typing import Callable, Iterator

import jax.numpy as jnp
import numpy as np
from flax import nnx

from pe_rlhf.models.config import ModelConfig
from pe_rlhf.models.transformer import Transformer

Path = tuple  # a parameter path in the nnx state, e.g. ('layers', 0, 'attn', 'q_proj', 'kernel')


class CheckpointError(ValueError):
    """A checkpoint that does not match the model it should fill."""


def hf_names(cfg: ModelConfig) -> dict[str, Path]:
    """HF state-dict name -> our parameter path, for every parameter of `cfg`'s model."""
    names = {"model.embed_tokens.weight": ("embedding",), "model.norm.weight": ("final_norm", "scale")}
    if not cfg.tie_word_embeddings:
        names["lm_head.weight"] = ("lm_head", "kernel")
    mlp_norm = "pre_feedforward_layernorm" if cfg.is_gemma else "post_attention_layernorm"
    for i in range(cfg.num_layers):
        hf, ours = f"model.layers.{i}.", ("layers", i)
        names[hf + "input_layernorm.weight"] = ours + ("attn_norm", "scale")
        names[hf + f"{mlp_norm}.weight"] = ours + ("mlp_norm", "scale")
        if cfg.is_gemma:
            names[hf + "post_attention_layernorm.weight"] = ours + ("post_attn_norm", "scale")
            names[hf + "post_feedforward_layernorm.weight"] = ours + ("post_mlp_norm", "scale")
        for proj, bias in (("q_proj", cfg.qkv_bias), ("k_proj", cfg.qkv_bias), ("v_proj", cfg.qkv_bias),
                           ("o_proj", cfg.o_bias)):
            names[hf + f"self_attn.{proj}.weight"] = ours + ("attn", proj, "kernel")
            if bias:
                names[hf + f"self_attn.{proj}.bias"] = ours + ("attn", proj, "bias")
        if cfg.qk_norm:
            names[hf + "self_attn.q_norm.weight"] = ours + ("attn", "q_norm", "scale")
            names[hf + "self_attn.k_norm.weight"] = ours + ("attn", "k_norm", "scale")
        for proj in ("gate_proj", "up_proj", "down_proj"):
            names[hf + f"mlp.{proj}.weight"] = ours + ("mlp", proj, "kernel")
            if cfg.mlp_bias:
                names[hf + f"mlp.{proj}.bias"] = ours + ("mlp", proj, "bias")
    return names


def path_str(path: Path) -> str:
    return ".".join(str(p) for p in path)


def to_ours(path: Path, hf_array):
    """HF orientation -> ours: projection kernels are transposed."""
    return hf_array.T if path[-1] == "kernel" else hf_array


def fill_model(cfg: ModelConfig, tensors: Iterator[tuple[str, Callable[[], np.ndarray], str]], *,
               dtype=jnp.float32, source: str) -> Transformer:
    """Build a `Transformer` from (hf_name, load_fn, where) triples, one tensor in memory at a time.

    The model is first built abstractly (`nnx.eval_shape`, no memory), then each
    tensor is read, checked against the expected shape, cast and placed.
    """
    abstract = nnx.eval_shape(lambda: Transformer(cfg, dtype=dtype, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    flat = nnx.to_flat_state(state)
    variables = dict(flat)
    by_hf = hf_names(cfg)
    filled: set[Path] = set()
    for hf_name, load, where in tensors:
        path = by_hf.get(hf_name)
        if path is None:
            continue  # e.g. rotary buffers, vision towers: not part of the text decoder
        expected = variables[path].get_value().shape
        raw = load()
        array = to_ours(path, raw)
        if tuple(array.shape) != tuple(expected):
            hf_expected = tuple(reversed(expected)) if path[-1] == "kernel" else tuple(expected)
            raise CheckpointError(
                f"{where}: tensor {hf_name!r} has shape {tuple(raw.shape)} in the file, but parameter "
                f"{path_str(path)} of this {cfg.family} config needs {hf_expected} in the file "
                f"({tuple(expected)} in our [in, out] orientation)"
            )
        variables[path].set_value(jnp.asarray(array, dtype=dtype))
        filled.add(path)
    missing = [hf for hf, path in by_hf.items() if path not in filled]
    if missing:
        shown = ", ".join(missing[:8]) + (f" and {len(missing) - 8} more" if len(missing) > 8 else "")
        raise CheckpointError(f"{source}: missing tensors for this {cfg.family} config: {shown}")
    return nnx.merge(graphdef, nnx.from_flat_state(flat))


def _safetensors_files(directory: str) -> list[str]:
    index = os.path.join(directory, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            weight_map = json.load(f)["weight_map"]
        return [os.path.join(directory, name) for name in sorted(set(weight_map.values()))]
    files = sorted(f for f in os.listdir(directory) if f.endswith(".safetensors"))
    if not files:
        raise FileNotFoundError(f"{directory}: no *.safetensors files (and no model.safetensors.index.json)")
    return [os.path.join(directory, f) for f in files]


def iter_safetensors(directory: str):
    """(name, load_fn, where) for every tensor of a checkpoint directory, lazily."""
    from safetensors import safe_open

    for file in _safetensors_files(directory):
        try:
            handle = safe_open(file, framework="flax")
        except FileNotFoundError:
            raise
        except Exception as e:  # safetensors raises its own error type without the file name
            raise CheckpointError(f"{file}: not a readable safetensors file ({e})") from e
        with handle as f:
            for name in f.keys():
                yield name, (lambda f=f, name=name: f.get_tensor(name)), file


def load_hf_config(directory: str):
    """The transformers config of a checkpoint directory, with a clear error for unknown families."""
    from transformers import AutoConfig

    from pe_rlhf.models.config import check_model_type

    path = os.path.join(directory, "config.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{directory}: no config.json; expected a Hugging Face checkpoint directory")
    try:
        with open(path) as f:
            raw = json.load(f)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}:{e.lineno}: invalid JSON: {e.msg}") from e
    check_model_type(raw.get("model_type"), path)
    return AutoConfig.from_pretrained(directory)


def load_directory(directory: str, dtype=jnp.float32) -> Transformer:
    from pe_rlhf.models.config import from_hf_config

    cfg = from_hf_config(load_hf_config(directory), where=os.path.join(directory, "config.json"))
    return fill_model(cfg, iter_safetensors(directory), dtype=dtype, source=directory)


def state_dict(model: Transformer) -> dict[str, np.ndarray]:
    """The model's parameters under HF names and orientation (NumPy, the model's dtype)."""
    _, state = nnx.split(model, nnx.Param)
    variables = dict(nnx.to_flat_state(state))
    out = {}
    for hf_name, path in hf_names(model.config).items():
        out[hf_name] = np.ascontiguousarray(to_ours(path, np.asarray(variables[path].get_value())))
    return out
