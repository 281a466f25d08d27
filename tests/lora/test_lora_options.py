"""rsLoRA and DoRA adapters: scales, forward passes and gradients by hand, merging, composition, run records."""

import dataclasses
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from pe_rlhf.models import ModelConfig, Transformer
from pe_rlhf.models.lora import (DoRAMergedRatio, LoRAAdapter, LoRAConfig, LoRAError, LoRALinear, LoRAParam,
                                 add_lora, lora_modules, param_count, use_adapters)
from pe_rlhf.models.merging import merge_adapter, merged_kernels, merged_model, unmerge_adapter
from pe_rlhf.models.transformer import Linear
from pe_rlhf.train.records import lora_config_of

CFG = ModelConfig()  # tiny Llama: D=64, 4 heads and 2 kv heads of 16, F=128, 2 layers, V=256, untied
QWEN2 = ModelConfig(family="qwen2", qkv_bias=True)  # q, k, v carry a bias: DoRA must leave it alone
TOKENS_BxT = jnp.array([[5, 17, 3, 99, 42, 7, 250, 11], [8, 8, 200, 31, 2, 77, 140, 9]])


def perturb(model, filter_, seed, std=0.1):
    state = nnx.state(model, filter_)
    leaves, treedef = jax.tree.flatten(state)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    nnx.update(model, jax.tree.unflatten(treedef, [x + std * jax.random.normal(k, x.shape, x.dtype)
                                                   for k, x in zip(keys, leaves)]))


def tiny_linear(seed, *, alpha=3.0, rslora=False, dora=True, d_in=6, d_out=5, rank=2):
    """A LoRALinear [6 -> 5] with a bias and one adapter 'p' whose a, b (and m) are all random."""
    rng = np.random.default_rng(seed)
    base = Linear(d_in, d_out, axes=("embed", "heads"), use_bias=True, dtype=jnp.float32, rngs=nnx.Rngs(seed))
    base.kernel.set_value(jnp.asarray(rng.normal(size=(d_in, d_out)), jnp.float32))
    base.bias.set_value(jnp.asarray(rng.normal(size=(d_out,)), jnp.float32))
    layer = LoRALinear(base)
    a = jnp.asarray(rng.normal(size=(d_in, rank)), jnp.float32)
    b = jnp.asarray(rng.normal(size=(rank, d_out)), jnp.float32)
    m = jnp.asarray(rng.uniform(0.5, 2.0, size=(d_out,)), jnp.float32) if dora else None
    layer.lora["p"] = LoRAAdapter(a, b, alpha=alpha, axes=("embed", "heads"), rslora=rslora, magnitude=m)
    layer.active = ("p",)
    x = jnp.asarray(rng.normal(size=(4, d_in)), jnp.float32)
    return layer, x


def numpy_of(layer):
    p = layer.lora["p"]
    return tuple(np.asarray(v, np.float64) for v in (layer.kernel.get_value(), layer.bias.get_value(),
                                                     p.a.get_value(), p.b.get_value(),
                                                     p.magnitude.get_value() if p.dora else 0.0))


# -- rsLoRA ------------------------------------------------------------------------------------------
def test_rslora_scale_is_alpha_over_sqrt_rank_and_the_forward_uses_it():
    assert LoRAConfig(rank=4, alpha=8.0, rslora=True).scale == 4.0  # 8 / sqrt(4)
    assert LoRAConfig(rank=4, alpha=8.0).scale == 2.0  # 8 / 4
    assert LoRAConfig(rank=9, alpha=6.0, rslora=True).scale == 2.0

    layer, x = tiny_linear(0, alpha=3.0, rslora=True, dora=False)
    assert layer.lora["p"].scale == pytest.approx(3.0 / math.sqrt(2))
    w, bias, a, b, _ = numpy_of(layer)
    expected = x @ w + bias + (np.asarray(x, np.float64) @ a @ b) * 3.0 / math.sqrt(2)
    np.testing.assert_allclose(np.asarray(layer(x)), expected, rtol=1e-5, atol=1e-5)

    model = Transformer(CFG, rngs=nnx.Rngs(0))
    add_lora(model, "policy", LoRAConfig(rank=4, alpha=8.0, rslora=True))
    perturb(model, LoRAParam, seed=1)
    q = model.layers[0].attn.q_proj
    assert q.lora["policy"].scale == 4.0
    w, a, b = (np.asarray(v.get_value(), np.float64) for v in (q.kernel, q.lora["policy"].a, q.lora["policy"].b))
    np.testing.assert_allclose(np.asarray(merged_kernels(model, "policy")[("layers", 0, "attn", "q_proj", "kernel")]),
                               w + 4.0 * a @ b, rtol=0, atol=1e-6)


# -- DoRA forward ------------------------------------------------------------------------------------
@pytest.mark.parametrize("rslora", [False, True], ids=["lora-scale", "rslora-scale"])
def test_dora_forward_is_its_definition_by_hand(rslora):
    layer, x = tiny_linear(2, alpha=3.0, rslora=rslora)
    w, bias, a, b, m = numpy_of(layer)
    scale = 3.0 / (math.sqrt(2) if rslora else 2)
    v = w + scale * a @ b
    w_dora = m * v / np.linalg.norm(v, axis=0)  # norm of each output column, over the in axis
    expected = np.asarray(x, np.float64) @ w_dora + bias
    y = np.asarray(layer(x))
    np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-5)
    assert np.abs(y - (x @ w + bias)).max() > 0.5  # the adapter changes the outputs
    np.testing.assert_allclose(np.asarray(layer.lora["p"].adapted_kernel(layer.kernel.get_value())), w_dora,
                               rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(np.asarray(layer.lora["p"].delta_kernel()), scale * a @ b, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("cfg,dtype,param_dtype", [(CFG, jnp.float32, "float32"), (QWEN2, jnp.float32, "float32"),
                                                   (CFG, jnp.bfloat16, "float32"), (CFG, jnp.float32, "bfloat16")],
                         ids=["llama", "qwen2-bias", "bf16-base", "bf16-adapter"])
def test_fresh_dora_adapter_leaves_logits_bitwise_identical(cfg, dtype, param_dtype):
    model = Transformer(cfg, dtype=dtype, rngs=nnx.Rngs(3))
    base = np.asarray(model(TOKENS_BxT))
    graphdef, state = nnx.split(model)
    base_jit = np.asarray(jax.jit(lambda s: nnx.merge(graphdef, s)(TOKENS_BxT))(state))

    add_lora(model, "policy", LoRAConfig(rank=4, targets="all_linear", dora=True, param_dtype=param_dtype))
    q = model.layers[0].attn.q_proj
    m = q.lora["policy"].magnitude
    assert m.get_value().dtype == jnp.dtype(param_dtype) and m.get_metadata()["logical_axes"] == ("heads",)
    np.testing.assert_allclose(np.asarray(m.get_value(), np.float32),
                               np.linalg.norm(np.asarray(q.kernel.get_value(), np.float32), axis=0), rtol=1e-2)
    np.testing.assert_array_equal(np.asarray(model(TOKENS_BxT)), base)
    graphdef, adapters, frozen = nnx.split(model, LoRAParam, ...)
    lora_jit = np.asarray(jax.jit(lambda a, f: nnx.merge(graphdef, a, f)(TOKENS_BxT))(adapters, frozen))
    if param_dtype == "float32":
        np.testing.assert_array_equal(lora_jit, base_jit)
    else:  # the ratio is exactly 1 here too, but XLA compiles the bf16 casts into a graph that rounds differently
        np.testing.assert_allclose(lora_jit, base_jit, atol=1e-6, rtol=0)


def test_param_count_includes_the_magnitude_vector():
    model = Transformer(CFG)
    count = add_lora(model, "policy", LoRAConfig(rank=4, dora=True))
    # plain rank-4 attention adapters: 3,584 (test_lora.py); m adds q 64 + k 32 + v 32 + o 64 per layer, 2 layers
    assert count.adapter == 3_584 + 384
    assert count.total == 106_816 + 3_584 + 384
    assert count.adapter_bytes == 4 * (3_584 + 384)


# -- DoRA merging ------------------------------------------------------------------------------------------
def test_dora_merge_unmerge_and_merged_model():
    model = Transformer(QWEN2, rngs=nnx.Rngs(4))
    add_lora(model, "policy", LoRAConfig(rank=4, alpha=8.0, dora=True))
    perturb(model, LoRAParam, seed=5)  # b, and m away from ||W||_c
    q = model.layers[1].attn.q_proj
    adapter = q.lora["policy"]
    w = np.array(q.kernel.get_value())
    a, b, m = (np.asarray(v.get_value(), np.float64) for v in (adapter.a, adapter.b, adapter.magnitude))
    v = w + 2.0 * a @ b
    w_dora = m * v / np.linalg.norm(v, axis=0)
    adapted = np.asarray(model(TOKENS_BxT))
    with use_adapters(model):
        assert np.abs(adapted - np.asarray(model(TOKENS_BxT))).max() > 0.05

    path = ("layers", 1, "attn", "q_proj", "kernel")
    np.testing.assert_allclose(np.asarray(merged_kernels(model, "policy")[path]), w_dora, rtol=0, atol=1e-6)
    np.testing.assert_allclose(np.asarray(merged_model(model, "policy")(TOKENS_BxT)), adapted, atol=2e-5, rtol=0)

    merge_adapter(model, "policy")
    np.testing.assert_allclose(np.asarray(q.kernel.get_value()), w_dora, rtol=0, atol=1e-6)
    np.testing.assert_allclose(np.asarray(adapter.merged_ratio.get_value()), m / np.linalg.norm(v, axis=0),
                               rtol=1e-6)
    np.testing.assert_allclose(np.asarray(model(TOKENS_BxT)), adapted, atol=2e-5, rtol=0)
    assert path not in merged_kernels(model, "policy")  # merged already: not applied twice
    unmerge_adapter(model, "policy")
    # fp32 kernel: W' / r - scale a @ b gives W back to a few ulps (|W| <= ~0.5 here)
    np.testing.assert_allclose(np.asarray(q.kernel.get_value()), w, rtol=0, atol=1e-6)
    assert adapter.merged_ratio is None and q.merged == ()
    assert jax.tree.leaves(nnx.state(model, DoRAMergedRatio)) == []
    np.testing.assert_allclose(np.asarray(model(TOKENS_BxT)), adapted, atol=2e-5, rtol=0)


# -- gradients ------------------------------------------------------------------------------------------------
def test_dora_gradients_hold_the_column_norm_constant():
    layer, x = tiny_linear(6, alpha=3.0)
    w, bias, a, b, m = numpy_of(layer)
    x64 = np.asarray(x, np.float64)
    g = np.random.default_rng(7).normal(size=(4, 5))  # dL/dy of L = sum(g * y)
    graphdef, params, rest = nnx.split(layer, LoRAParam, ...)
    grads = jax.grad(lambda p: jnp.sum(jnp.asarray(g, jnp.float32) * nnx.merge(graphdef, p, rest)(x)))(params)
    d_a, d_b, d_m = (np.asarray(grads["lora"]["p"][k].get_value()) for k in ("a", "b", "magnitude"))

    # y = r * (x @ V) + bias, r = m / n, with n = ||V||_c a constant:
    s = 3.0 / 2
    v = w + s * a @ b
    n = np.linalg.norm(v, axis=0)
    gr = g * (m / n)
    np.testing.assert_allclose(d_m, np.sum(g * (x64 @ v), axis=0) / n, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(d_b, s * a.T @ x64.T @ gr, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(d_a, s * x64.T @ gr @ b.T, rtol=1e-5, atol=1e-6)

    # ... and not the gradient of the exact W' = m V / ||V||_c, which differs in a and b (not in m)
    def exact(a_, b_):
        v_ = jnp.asarray(w, jnp.float32) + s * a_ @ b_
        return jnp.sum(jnp.asarray(g, jnp.float32) * (x @ (layer.lora["p"].magnitude[...] * v_
                                                              / jnp.linalg.norm(v_, axis=0))))
    e_a, e_b = jax.grad(exact, argnums=(0, 1))(layer.lora["p"].a[...], layer.lora["p"].b[...])
    assert np.abs(np.asarray(e_b) - d_b).max() > 1e-2 and np.abs(np.asarray(e_a) - d_a).max() > 1e-2


# -- several adapters ---------------------------------------------------------------------------------
def test_dora_runs_and_merges_alone_on_its_projections():
    model = Transformer(CFG, rngs=nnx.Rngs(8))
    add_lora(model, "policy", LoRAConfig(rank=4, dora=True))  # attention
    add_lora(model, "reward", LoRAConfig(rank=2, targets="all_linear"))
    add_lora(model, "value", LoRAConfig(rank=2, targets="mlp"))
    perturb(model, LoRAParam, seed=9)

    with pytest.raises(LoRAError, match=r"use_adapters: adapter 'policy' is a DoRA adapter and cannot run or be "
                                        r"merged together with \['reward'\] on layers\.0\.attn\.k_proj"):
        with use_adapters(model, "policy", "reward"):
            pass
    with pytest.raises(LoRAError, match=r"forward pass: adapter 'policy' is a DoRA adapter .*use_adapters\(model, "
                                        r"'policy'\)"):
        model(TOKENS_BxT)  # every adapter is on after add_lora
    with pytest.raises(LoRAError, match="merged_kernels: adapter 'policy' is a DoRA adapter"):
        merged_kernels(model, "policy", "reward")
    merge_adapter(model, "reward")
    with pytest.raises(LoRAError, match=r"merge_adapter: adapter 'policy' .* with \['reward'\]"):
        merge_adapter(model, "policy")
    unmerge_adapter(model, "reward")

    # one at a time, and beside an adapter on other projections (value is on the MLP only)
    with use_adapters(model, "policy", "value"):
        both = np.asarray(model(TOKENS_BxT))
    np.testing.assert_allclose(np.asarray(merged_model(model, "policy", "value")(TOKENS_BxT)), both, atol=2e-5, rtol=0)
    with use_adapters(model, "reward"):
        np.testing.assert_allclose(np.asarray(model(TOKENS_BxT)),
                                   np.asarray(merged_model(model, "reward")(TOKENS_BxT)), atol=2e-5, rtol=0)
    merge_adapter(model, "policy")
    with use_adapters(model, "policy", "value"):
        np.testing.assert_allclose(np.asarray(model(TOKENS_BxT)), both, atol=2e-5, rtol=0)
    assert all(m.merged == ("policy",) for p, m in lora_modules(model) if p[2] == "attn")


# -- options and run records ---------------------------------------------------------------------------------
def test_bad_option_values_name_the_field():
    with pytest.raises(LoRAError, match=r"^LoRAConfig.dora=1: expected True or False$"):
        LoRAConfig(dora=1)
    with pytest.raises(LoRAError, match=r"^LoRAConfig.rslora='yes': expected True or False$"):
        LoRAConfig(rslora="yes")


def test_run_records_round_trip_the_options_and_old_records_load_with_defaults():
    cfg = LoRAConfig(rank=4, alpha=8.0, targets="all_linear", rslora=True, dora=True)
    info = json.loads(json.dumps({"tuning": "lora", "lora": dataclasses.asdict(cfg)}))
    assert lora_config_of(info) == cfg
    old = {"tuning": "lora", "lora": {"rank": 4, "alpha": 8.0, "targets": "attention", "param_dtype": "float32"}}
    assert lora_config_of(old) == LoRAConfig(rank=4, alpha=8.0)
    assert (lora_config_of(old).rslora, lora_config_of(old).dora) == (False, False)
