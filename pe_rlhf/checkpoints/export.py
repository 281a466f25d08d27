"""Export: a merged model as a Hugging Face checkpoint, an adapter alone in PEFT format.

`export_merged` writes `config.json` + `model.safetensors` that
`transformers.AutoModelForCausalLM.from_pretrained` loads; the named adapters
are merged into the kernels (W + scale a @ b, or DoRA's m V / ||V||_c) on the way out and the model
itself is left unchanged. With no adapter named it writes the base model.

`export_peft` writes `adapter_config.json` + `adapter_model.safetensors` that
`peft.PeftModel.from_pretrained(hf_model, directory)` loads on top of that base
(LoRA, rsLoRA and DoRA adapters alike).

`export_reward_head` writes a reward model's scalar head beside a JSON that says how
to apply it to the merged backbone's last hidden state.
Names and orientation come from `pe_rlhf.checkpoints.hf.hf_names`, the one table
between our parameter paths and HF names.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil

import jax.numpy as jnp
import numpy as np

from pe_rlhf.checkpoints import hf
from pe_rlhf.models import lora, merging
from pe_rlhf.models.config import ModelConfig, RopeConfig

_ARCH = {
    "gemma3": ("gemma3_text", "Gemma3ForCausalLM"),
    "llama": ("llama", "LlamaForCausalLM"),
    "qwen2": ("qwen2", "Qwen2ForCausalLM"),
    "qwen3": ("qwen3", "Qwen3ForCausalLM"),
}


class ExportError(ValueError):
    """A model that a Hugging Face config of its family cannot describe."""


def _rope(r: RopeConfig) -> dict:
    d = {"rope_type": r.kind, "rope_theta": r.theta}
    if r.kind in ("linear", "llama3"):
        d["factor"] = r.factor
    if r.kind == "llama3":
        d.update(low_freq_factor=r.low_freq_factor, high_freq_factor=r.high_freq_factor,
                 original_max_position_embeddings=r.original_max_position_embeddings)
    return d


def _require(ok: bool, cfg: ModelConfig, what: str) -> None:
    if not ok:
        raise ExportError(f"ModelConfig(family={cfg.family!r}) has {what}, which the transformers "
                          f"{_ARCH[cfg.family][1]} cannot express; it cannot be exported as a HF checkpoint")


def hf_config_dict(cfg: ModelConfig) -> dict:
    """The transformers `config.json` contents for `cfg` (any of the four families).

    `from_hf_config(AutoConfig.for_model(**hf_config_dict(cfg)))` gives back `cfg`.
    """
    model_type, arch = _ARCH[cfg.family]
    eos = list(cfg.eos_token_ids)
    d = {
        "model_type": model_type,
        "architectures": [arch],
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_dim,
        "rms_norm_eps": cfg.rms_norm_eps,
        "max_position_embeddings": cfg.max_position_embeddings,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "bos_token_id": cfg.bos_token_id,
        "eos_token_id": eos[0] if len(eos) == 1 else (eos or None),
        "pad_token_id": cfg.pad_token_id,
    }
    full = ["full_attention"] * cfg.num_layers
    layer_types = list(cfg.layer_types) if cfg.layer_types is not None else full
    _require(cfg.qk_norm == (cfg.family in ("gemma3", "qwen3")), cfg, f"qk_norm={cfg.qk_norm}")
    if cfg.family == "gemma3":
        _require(cfg.qkv_bias == cfg.o_bias, cfg, "different q/k/v and o biases")
        _require(not cfg.mlp_bias, cfg, "an MLP bias")
        d.update(
            hidden_activation="gelu_pytorch_tanh",
            attention_bias=cfg.qkv_bias,
            query_pre_attn_scalar=cfg.query_pre_attn_scalar or cfg.head_dim,
            sliding_window=cfg.sliding_window,
            layer_types=layer_types if cfg.sliding_window is not None else full,
            rope_parameters={"full_attention": _rope(cfg.rope),
                             "sliding_attention": _rope(cfg.local_rope or cfg.rope)},
            final_logit_softcapping=cfg.final_logit_softcap,
            attn_logit_softcapping=cfg.attn_logit_softcap,
        )
        return d
    _require(cfg.final_logit_softcap is None and cfg.attn_logit_softcap is None, cfg, "logit soft-capping")
    _require(cfg.query_pre_attn_scalar is None, cfg, "query_pre_attn_scalar")
    d.update(hidden_act="silu", rope_parameters=_rope(cfg.rope))
    if cfg.family == "llama":
        _require(cfg.sliding_window is None, cfg, "a sliding window")
        _require(cfg.qkv_bias == cfg.o_bias, cfg, "different q/k/v and o biases")
        d.update(attention_bias=cfg.qkv_bias, mlp_bias=cfg.mlp_bias)
        return d
    _require(not cfg.mlp_bias, cfg, "an MLP bias")
    d.update(use_sliding_window=cfg.sliding_window is not None, sliding_window=cfg.sliding_window,
             max_window_layers=cfg.num_layers,
             layer_types=layer_types if cfg.sliding_window is not None else full)
    if cfg.family == "qwen2":
        _require(cfg.qkv_bias and not cfg.o_bias, cfg, "no q/k/v bias or an o bias")
    else:
        _require(cfg.qkv_bias == cfg.o_bias, cfg, "different q/k/v and o biases")
        d["attention_bias"] = cfg.qkv_bias
    return d


def _save(tensors: dict[str, np.ndarray], directory: str, name: str, config: dict, config_name: str) -> None:
    from safetensors.numpy import save_file

    os.makedirs(directory, exist_ok=True)
    save_file(tensors, os.path.join(directory, name), metadata={"format": "pt"})
    with open(os.path.join(directory, config_name), "w") as f:
        json.dump(config, f, indent=2)
        f.write("\n")


def export_merged(model, directory: str, *adapters: str, hf_config: dict | None = None,
                  tokenizer=None) -> str:
    """Write `model` with `adapters` merged into its kernels as a HF checkpoint; returns `directory`.

    `hf_config` replaces the config built by `hf_config_dict` (e.g. for a model
    loaded from GGUF, `gguf_io.gguf_hf_config(path).to_dict()`); `tokenizer`, if
    given, is saved beside the weights. Tensors keep the dtype they hold: a model fully tuned in bf16 holds
    its fp32 master weights (`train.precision`) and is written in fp32, and `config.json`'s `dtype` says so.
    """
    plain = merging.merged_model(model, *adapters)
    config = dict(hf_config) if hf_config is not None else hf_config_dict(model.config)
    tensors = hf.state_dict(plain)
    dtypes = {np.dtype(t.dtype).name for t in tensors.values()}
    config["dtype"] = dtypes.pop() if len(dtypes) == 1 else jnp.dtype(model.dtype).name
    with _atomic_directory(directory) as tmp:
        _save(tensors, tmp, "model.safetensors", config, "config.json")
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    return directory


@contextlib.contextmanager
def _atomic_directory(directory: str):
    """Yield a temporary sibling of `directory` to fill; on success it replaces `directory` whole.

    A process killed while writing leaves only `<directory>.tmp-<pid>` behind, never a half-written
    `directory`, so "the export exists" means "the export is complete".
    """
    directory = os.path.abspath(directory)
    tmp = f"{directory}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if os.path.isdir(directory):
        old = f"{directory}.old-{os.getpid()}"
        os.replace(directory, old)
        os.replace(tmp, directory)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, directory)


def _target_modules(modules: list[str], all_modules: list[str]) -> list[str] | str:
    """PEFT target_modules: short names when they cover every layer, else a regex of the exact modules."""
    short = sorted({m.rsplit(".", 1)[-1] for m in modules})
    if sorted(modules) == sorted(m for m in all_modules if m.rsplit(".", 1)[-1] in short):
        return short
    return "(" + "|".join(re.escape(m) for m in sorted(modules)) + ")"


def export_peft(model, name: str, directory: str, *, base_model_name_or_path: str | None = None) -> str:
    """Write adapter `name` alone in PEFT LoRA format; returns `directory`.

    Tensors: `base_model.model.<hf module>.lora_A.weight` [r, in] (= a.T) and
    `lora_B.weight` [out, r] (= b.T), and for a DoRA adapter `lora_magnitude_vector` [out]
    (= m, PEFT's name for it, without `.weight`); `adapter_config.json` says `use_rslora` and
    `use_dora`. Load it with
    `peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), directory)`,
    where base_dir holds `export_merged(model, base_dir)`.
    """
    if name not in lora.adapter_names(model):
        raise lora.LoRAError(f"no adapter named {name!r} on this model; adapters: {lora.adapter_names(model)}")
    module_of = {path[:-1]: hf_name[: -len(".weight")] for hf_name, path in hf.hf_names(model.config).items()
                 if path[-1] == "kernel"}
    tensors, modules, kinds = {}, [], set()
    for path, m in lora.lora_modules(model):
        if name not in m.lora:
            continue
        module = module_of[path]
        adapter = m.lora[name]
        a, b = np.asarray(adapter.a.get_value()), np.asarray(adapter.b.get_value())
        tensors[f"base_model.model.{module}.lora_A.weight"] = np.ascontiguousarray(a.T)
        tensors[f"base_model.model.{module}.lora_B.weight"] = np.ascontiguousarray(b.T)
        if adapter.dora:
            tensors[f"base_model.model.{module}.lora_magnitude_vector"] = np.asarray(adapter.magnitude.get_value())
        modules.append(module)
        kinds.add((adapter.rank, adapter.alpha, adapter.rslora, adapter.dora))
    if len(kinds) != 1:
        raise ExportError(f"adapter {name!r} has several (rank, alpha, rslora, dora) settings {sorted(kinds)}; "
                          "a PEFT LoRA config holds one")
    ((rank, alpha, rslora, dora),) = kinds
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path,
        "r": rank,
        "lora_alpha": alpha,
        "target_modules": _target_modules(modules, list(module_of.values())),
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": rslora,
        "use_dora": dora,
        "inference_mode": True,
        "modules_to_save": None,
    }
    _save(tensors, directory, "adapter_model.safetensors", config, "adapter_config.json")
    return directory


REWARD_HEAD = "reward_head.safetensors"


def export_reward_head(head, directory: str, *, backbone: str | None = None, bos_token_id: int | None = None,
                       eos_token_id: int | None = None) -> str:
    """Write a reward model's `ScalarHead` as `reward_head.safetensors` + `reward_head.json`; returns `directory`.

    The tensors are `weight` [D] and `bias` [] in float32; the JSON says how to apply them: the score of
    a text is `hidden · weight + bias` on the final-norm hidden state of its last real token, the text
    laid out as in training, `[BOS] prompt response [EOS]`. In transformers the hidden states are
    `AutoModelForCausalLM.from_pretrained(backbone).model(input_ids, attention_mask=...).last_hidden_state`,
    `backbone` being the merged export of the same run.
    """
    weight = np.asarray(head.kernel.get_value(), np.float32)
    bias = np.asarray(head.bias.get_value(), np.float32)
    config = {
        "type": "scalar_reward_head",
        "hidden_size": int(weight.shape[0]),
        "tensors": {"weight": [int(weight.shape[0])], "bias": []},
        "backbone": backbone,
        "input": "final-norm hidden state of the last real (unpadded) token: in transformers, "
                 "AutoModelForCausalLM.from_pretrained(backbone).model(input_ids, attention_mask=mask)"
                 ".last_hidden_state[b, last]",
        "score": "hidden.float() @ weight + bias",
        "text_layout": "[BOS] prompt response [EOS], each text encoded with add_special_tokens=False",
        "bos_token_id": bos_token_id,
        "eos_token_id": eos_token_id,
    }
    _save({"weight": weight, "bias": bias}, directory, REWARD_HEAD, config, "reward_head.json")
    return directory


__all__ = ["ExportError", "export_merged", "export_peft", "export_reward_head", "hf_config_dict"]
