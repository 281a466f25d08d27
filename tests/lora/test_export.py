"""Export: HF config round trip, merged checkpoints in transformers, adapters in PEFT."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from pe_rlhf.checkpoints.export import ExportError, export_merged, export_peft, hf_config_dict
from pe_rlhf.models import PRESETS, ModelConfig, RopeConfig, Transformer, from_hf_config
from pe_rlhf.models.lora import LoRAConfig, LoRAParam, add_lora, use_adapters

TINY = {
    "llama": ModelConfig(family="llama", rope=RopeConfig(theta=500_000.0, kind="llama3", factor=8.0,
                                                         original_max_position_embeddings=16),
                         bos_token_id=1, eos_token_ids=(2, 3)),
    "qwen2": ModelConfig(family="qwen2", qkv_bias=True, tie_word_embeddings=True, eos_token_ids=(2,)),
    "qwen3": ModelConfig(family="qwen3", qk_norm=True, head_dim=32, rms_norm_eps=1e-5),
    "gemma3": ModelConfig(family="gemma3", qk_norm=True, sliding_window=4,
                          layer_types=("sliding_attention", "full_attention"),
                          rope=RopeConfig(theta=1_000_000.0), local_rope=RopeConfig(theta=10_000.0),
                          query_pre_attn_scalar=24, final_logit_softcap=30.0, tie_word_embeddings=True,
                          bos_token_id=2, eos_token_ids=(1, 106), pad_token_id=0),
}
TOKENS_BxT = np.array([[5, 17, 3, 99, 42, 7, 250, 11, 64, 1], [8, 8, 200, 31, 2, 77, 140, 9, 10, 128]])


def perturb(model, seed, std=0.1):
    """Add N(0, std) to every weight (adapters included) so that no mapping is tested on zeros or ones."""
    state = nnx.state(model, nnx.Any(nnx.Param, LoRAParam))
    leaves, treedef = jax.tree.flatten(state)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    new = [x + std * jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves)]
    nnx.update(model, jax.tree.unflatten(treedef, new))


def torch_logits(hf_model):
    import torch

    with torch.no_grad():
        return hf_model(torch.tensor(TOKENS_BxT)).logits.numpy()


def load_hf(directory):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(directory, attn_implementation="eager").eval()


@pytest.mark.parametrize("name", sorted(PRESETS) + [f"tiny-{f}" for f in sorted(TINY)])
def test_hf_config_dict_round_trips_through_transformers(name):
    from transformers import AutoConfig

    cfg = PRESETS[name] if name in PRESETS else TINY[name.removeprefix("tiny-")]
    got = from_hf_config(AutoConfig.for_model(**hf_config_dict(cfg)))
    # transformers lists layer_types even without a window (all full); what matters is which layers slide
    assert [got.layer_is_sliding(i) for i in range(got.num_layers)] == [
        cfg.layer_is_sliding(i) for i in range(cfg.num_layers)]
    assert got.replace(layer_types=None) == cfg.replace(layer_types=None)


def test_hf_config_dict_rejects_what_the_family_cannot_express():
    with pytest.raises(ExportError, match=r"qwen2.*o bias"):
        hf_config_dict(ModelConfig(family="qwen2", qkv_bias=True, o_bias=True))
    with pytest.raises(ExportError, match="qk_norm=True"):
        hf_config_dict(ModelConfig(family="llama", qk_norm=True))


@pytest.mark.parametrize("family", sorted(TINY))
def test_merged_export_loads_in_transformers_with_matching_logits(family, tmp_path):
    model = Transformer(TINY[family], rngs=nnx.Rngs(1))
    add_lora(model, "policy", LoRAConfig(rank=4, alpha=8.0, targets="all_linear"))
    add_lora(model, "reward", LoRAConfig(rank=2, targets="attention"))
    perturb(model, seed=2)
    with use_adapters(model, "policy"):
        ours = np.asarray(model(jnp.asarray(TOKENS_BxT)))
    with use_adapters(model):
        base = np.asarray(model(jnp.asarray(TOKENS_BxT)))
    assert np.abs(ours - base).max() > 0.05  # the adapter changes the logits, so the match below means something

    export_merged(model, str(tmp_path), "policy")
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["dtype"] == "float32" and config["num_hidden_layers"] == 2
    theirs = torch_logits(load_hf(tmp_path))
    np.testing.assert_allclose(theirs, ours, atol=1e-4, rtol=0)
    # the model itself is unchanged by the export
    with use_adapters(model, "policy"):
        np.testing.assert_array_equal(np.asarray(model(jnp.asarray(TOKENS_BxT))), ours)


def test_peft_export_loads_on_the_base_export_and_matches_our_adapter(tmp_path):
    from peft import PeftModel

    model = Transformer(TINY["gemma3"], rngs=nnx.Rngs(3))
    add_lora(model, "policy", LoRAConfig(rank=4, alpha=8.0, targets="all_linear"))
    add_lora(model, "reward", LoRAConfig(rank=2, targets="attention"))
    perturb(model, seed=4)
    with use_adapters(model, "policy"):
        ours = np.asarray(model(jnp.asarray(TOKENS_BxT)))

    export_merged(model, str(tmp_path / "base"))  # no adapter merged: the base
    export_peft(model, "policy", str(tmp_path / "policy"))
    config = json.loads((tmp_path / "policy" / "adapter_config.json").read_text())
    assert (config["peft_type"], config["task_type"], config["r"], config["lora_alpha"]) == ("LORA", "CAUSAL_LM", 4, 8.0)
    assert config["target_modules"] == ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]
    from safetensors.numpy import load_file

    tensors = load_file(str(tmp_path / "policy" / "adapter_model.safetensors"))
    assert len(tensors) == 2 * 7 * 2  # A and B for 7 projections in 2 layers
    a = model.layers[1].attn.o_proj.lora["policy"].a.get_value()  # [in=64, r=4]
    np.testing.assert_array_equal(tensors["base_model.model.model.layers.1.self_attn.o_proj.lora_A.weight"],
                                  np.asarray(a).T)
    assert tensors["base_model.model.model.layers.1.self_attn.o_proj.lora_B.weight"].shape == (64, 4)

    base_hf = load_hf(tmp_path / "base")
    base_theirs = torch_logits(base_hf)
    with use_adapters(model):
        np.testing.assert_allclose(base_theirs, np.asarray(model(jnp.asarray(TOKENS_BxT))), atol=1e-4, rtol=0)
    peft_model = PeftModel.from_pretrained(base_hf, str(tmp_path / "policy")).eval()
    theirs = torch_logits(peft_model)
    assert np.abs(theirs - base_theirs).max() > 0.05
    np.testing.assert_allclose(theirs, ours, atol=1e-4, rtol=0)


def test_peft_export_of_some_layers_targets_exactly_those_modules(tmp_path):
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer

    model = Transformer(TINY["llama"], rngs=nnx.Rngs(5))
    add_lora(model, "policy", LoRAConfig(rank=2, alpha=2.0, targets=r"layers\.1\.attn\.[qv]_proj"))
    perturb(model, seed=6)
    with use_adapters(model, "policy"):
        ours = np.asarray(model(jnp.asarray(TOKENS_BxT)))

    export_merged(model, str(tmp_path / "base"))
    export_peft(model, "policy", str(tmp_path / "policy"))
    config = json.loads((tmp_path / "policy" / "adapter_config.json").read_text())
    assert config["target_modules"] == r"(model\.layers\.1\.self_attn\.q_proj|model\.layers\.1\.self_attn\.v_proj)"
    peft_model = PeftModel.from_pretrained(load_hf(tmp_path / "base"), str(tmp_path / "policy")).eval()
    lora_layers = [n for n, m in peft_model.named_modules() if isinstance(m, LoraLayer)]
    assert lora_layers == ["base_model.model.model.layers.1.self_attn.q_proj",
                           "base_model.model.model.layers.1.self_attn.v_proj"]
    np.testing.assert_allclose(torch_logits(peft_model), ours, atol=1e-4, rtol=0)


@pytest.mark.parametrize("options", [{"rslora": True}, {"dora": True}, {"dora": True, "rslora": True}],
                         ids=["rslora", "dora", "dora+rslora"])
def test_peft_loads_rslora_and_dora_exports_with_matching_logits(options, tmp_path):
    from peft import PeftModel
    from safetensors.numpy import load_file

    model = Transformer(TINY["qwen2"], rngs=nnx.Rngs(7))  # q, k, v biases: DoRA leaves them out of the norm
    add_lora(model, "policy", LoRAConfig(rank=4, alpha=8.0, targets="all_linear", **options))
    add_lora(model, "reward", LoRAConfig(rank=2, targets="attention"))
    perturb(model, seed=8)  # base, a, b and DoRA's m all random
    with use_adapters(model, "policy"):
        ours = np.asarray(model(jnp.asarray(TOKENS_BxT)))

    export_merged(model, str(tmp_path / "base"))
    export_merged(model, str(tmp_path / "merged"), "policy")
    export_peft(model, "policy", str(tmp_path / "policy"))
    config = json.loads((tmp_path / "policy" / "adapter_config.json").read_text())
    dora = options.get("dora", False)
    assert (config["use_rslora"], config["use_dora"]) == (options.get("rslora", False), dora)
    tensors = load_file(str(tmp_path / "policy" / "adapter_model.safetensors"))
    assert len(tensors) == (3 if dora else 2) * 7 * 2
    if dora:
        m = model.layers[1].attn.k_proj.lora["policy"].magnitude.get_value()  # [out=32]
        np.testing.assert_array_equal(tensors["base_model.model.model.layers.1.self_attn.k_proj.lora_magnitude_vector"],
                                      np.asarray(m))

    base_hf = load_hf(tmp_path / "base")
    base_theirs = torch_logits(base_hf)
    peft_model = PeftModel.from_pretrained(base_hf, str(tmp_path / "policy")).eval()
    theirs = torch_logits(peft_model)
    assert np.abs(theirs - base_theirs).max() > 0.05
    np.testing.assert_allclose(theirs, ours, atol=1e-4, rtol=0)
    np.testing.assert_allclose(torch_logits(load_hf(tmp_path / "merged")), ours, atol=1e-4, rtol=0)
