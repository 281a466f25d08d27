"""LoRA adapters: identity at init, gradients, the adapter-only optimizer, switching, merging, errors."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from pe_rlhf.models import ModelConfig, Transformer
from pe_rlhf.models.lora import (LoRAConfig, LoRAError, LoRALinear, LoRAParam, ParamCount, adapter_filter,
                                 adapter_names, add_lora, lora_modules, param_count, use_adapters)
from pe_rlhf.models.merging import merge_adapter, merged_model, unmerge_adapter

CFG = ModelConfig()  # tiny Llama: D=64, 4 heads and 2 kv heads of 16, F=128, 2 layers, V=256, untied
GEMMA = ModelConfig(family="gemma3", qk_norm=True, sliding_window=4, layer_types=("sliding_attention", "full_attention"),
                    query_pre_attn_scalar=16, tie_word_embeddings=True)
TOKENS_BxT = jnp.array([[5, 17, 3, 99, 42, 7, 250, 11], [8, 8, 200, 31, 2, 77, 140, 9]])


def perturb(model, filter_, seed, std=0.1):
    """Add N(0, std) to the variables selected by `filter_` (e.g. make adapter B nonzero)."""
    state = nnx.state(model, filter_)
    leaves, treedef = jax.tree.flatten(state)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    new = [x + std * jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves)]
    nnx.update(model, jax.tree.unflatten(treedef, new))


def next_token_loss(logits_BxTxV, tokens_BxT):
    logp = jax.nn.log_softmax(logits_BxTxV[:, :-1].astype(jnp.float32))
    return -jnp.take_along_axis(logp, tokens_BxT[:, 1:, None], axis=-1).mean()


def tree_bytes(tree):
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))


# -- a fresh adapter ------------------------------------------------------------------------
@pytest.mark.parametrize("cfg", [CFG, GEMMA], ids=["llama", "gemma3"])
def test_fresh_adapter_leaves_logits_bitwise_identical(cfg):
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    base_eager = np.asarray(model(TOKENS_BxT))
    graphdef, state = nnx.split(model)
    base_jit = np.asarray(jax.jit(lambda s: nnx.merge(graphdef, s)(TOKENS_BxT))(state))

    add_lora(model, "policy", LoRAConfig(rank=4, targets="all_linear"))
    assert len(lora_modules(model)) == 7 * 2
    q = model.layers[0].attn.q_proj
    assert isinstance(q, LoRALinear) and q.active == ("policy",)
    np.testing.assert_array_equal(np.asarray(q.lora["policy"].b.get_value()), np.zeros((4, 64)))
    assert np.asarray(q.lora["policy"].a.get_value()).std() > 0.05  # N(0, 1/64): std 0.125
    assert q.lora["policy"].a.get_metadata()["logical_axes"] == ("embed", "lora_rank")
    assert q.lora["policy"].b.get_metadata()["logical_axes"] == ("lora_rank", "heads")
    assert q.lora["policy"].a.get_value().dtype == jnp.float32

    np.testing.assert_array_equal(np.asarray(model(TOKENS_BxT)), base_eager)
    graphdef, adapters, frozen = nnx.split(model, LoRAParam, ...)
    lora_jit = jax.jit(lambda a, f: nnx.merge(graphdef, a, f)(TOKENS_BxT))(adapters, frozen)
    np.testing.assert_array_equal(np.asarray(lora_jit), base_jit)


def test_param_count_is_the_hand_count():
    model = Transformer(CFG)
    # base: embedding 256*64 + lm_head 64*256 + final norm 64
    #   + 2 layers * (q 64*64 + k 64*32 + v 64*32 + o 64*64 + 2 norms * 64 + mlp 3 * 64*128) = 106,816
    count = add_lora(model, "policy", LoRAConfig(rank=4))
    # rank 4 on q, k, v, o: 4*(64+64) + 4*(64+32) + 4*(64+32) + 4*(64+64) = 1,792 per layer
    assert count == ParamCount(total=106_816 + 3_584, adapter=3_584, total_bytes=4 * 110_400,
                               adapter_bytes=4 * 3_584)
    assert count.percent == pytest.approx(100 * 3_584 / 110_400)
    assert str(count) == ("adapter params: 3,584 (14,336 B) || all params: 110,400 (441,600 B) "
                          "|| adapter%: 3.2464")
    add_lora(model, "reward", LoRAConfig(rank=2, targets="mlp"))  # 2 * 3 * 2*(64+128) = 2,304
    assert param_count(model, "reward").adapter == 2_304
    assert param_count(model).adapter == 3_584 + 2_304
    assert param_count(model).total == 106_816 + 3_584 + 2_304


# -- gradients and the adapter-only optimizer ---------------------------------------------------
def test_adapter_grads_equal_chain_rule_through_the_merged_weight():
    model = Transformer(CFG, rngs=nnx.Rngs(1))
    add_lora(model, "policy", LoRAConfig(rank=4, alpha=8.0))
    perturb(model, LoRAParam, seed=2)  # nonzero B, so dA is nonzero too

    graphdef, adapters, frozen = nnx.split(model, LoRAParam, ...)
    grads = jax.jit(jax.grad(lambda a: next_token_loss(nnx.merge(graphdef, a, frozen)(TOKENS_BxT), TOKENS_BxT)))(
        adapters)

    merged = merged_model(model, "policy")  # plain Transformer with W' = W + (alpha/r) A B
    m_graphdef, m_params = nnx.split(merged)
    grads_w = jax.jit(jax.grad(lambda p: next_token_loss(nnx.merge(m_graphdef, p)(TOKENS_BxT), TOKENS_BxT)))(
        m_params)
    grads_w = dict(nnx.to_flat_state(grads_w))
    grads = dict(nnx.to_flat_state(grads))
    scale = 8.0 / 4
    for path, m in lora_modules(model):
        a, b = m.lora["policy"].a.get_value(), m.lora["policy"].b.get_value()
        g_w = grads_w[path + ("kernel",)].get_value()
        d_a = grads[path + ("lora", "policy", "a")].get_value()
        d_b = grads[path + ("lora", "policy", "b")].get_value()
        assert np.abs(d_a).max() > 1e-4 and np.abs(d_b).max() > 1e-4
        np.testing.assert_allclose(d_a, scale * g_w @ b.T, rtol=1e-4, atol=1e-7)
        np.testing.assert_allclose(d_b, scale * a.T @ g_w, rtol=1e-4, atol=1e-7)


def test_optax_step_sees_only_the_adapters():
    model = Transformer(CFG, rngs=nnx.Rngs(3))
    add_lora(model, "policy", LoRAConfig(rank=4))
    add_lora(model, "reward", LoRAConfig(rank=2, targets="mlp"))
    graphdef, policy, frozen = nnx.split(model, adapter_filter("policy"), ...)  # frozen: base + reward
    assert len(jax.tree.leaves(policy)) == 2 * 4 * 2  # a and b of q, k, v, o in 2 layers
    assert tree_bytes(policy) == 4 * 3_584
    frozen_before = [np.array(x) for x in jax.tree.leaves(frozen)]

    opt = optax.adam(1e-2)
    opt_state = opt.init(policy)
    adam = opt_state[0]
    assert jax.tree.structure(adam.mu) == jax.tree.structure(policy)
    assert jax.tree.structure(adam.nu) == jax.tree.structure(policy)
    assert len(jax.tree.leaves(opt_state)) == 2 * 16 + 1  # mu, nu per adapter leaf, one step count
    assert tree_bytes(opt_state) == 2 * 4 * 3_584 + 4

    @jax.jit
    def step(policy, opt_state, frozen, tokens_BxT):
        def loss_fn(policy):
            m = nnx.merge(graphdef, policy, frozen)
            with use_adapters(m, "policy"):
                return next_token_loss(m(tokens_BxT), tokens_BxT)

        loss, grads = jax.value_and_grad(loss_fn)(policy)
        updates, opt_state = opt.update(grads, opt_state, policy)
        return optax.apply_updates(policy, updates), opt_state, loss

    new_policy, opt_state, loss0 = step(policy, opt_state, frozen, TOKENS_BxT)
    for _ in range(3):
        new_policy, opt_state, loss = step(new_policy, opt_state, frozen, TOKENS_BxT)
    assert float(loss) < float(loss0)
    assert int(opt_state[0].count) == 4
    b_old = policy["layers"][0]["attn"]["q_proj"]["lora"]["policy"]["b"].get_value()
    b_new = new_policy["layers"][0]["attn"]["q_proj"]["lora"]["policy"]["b"].get_value()
    assert np.abs(np.asarray(b_new - b_old)).max() > 1e-3
    nnx.update(model, new_policy)
    _, _, frozen_after = nnx.split(model, adapter_filter("policy"), ...)
    after = jax.tree.leaves(frozen_after)
    assert len(after) == len(frozen_before)
    for x, y in zip(frozen_before, after):
        np.testing.assert_array_equal(x, np.asarray(y))


# -- several adapters on one backbone -------------------------------------------------------
def test_adapters_switch_off_and_do_not_interfere():
    model = Transformer(CFG, rngs=nnx.Rngs(4))
    base = np.asarray(model(TOKENS_BxT))
    add_lora(model, "policy", LoRAConfig(rank=4))
    add_lora(model, "reward", LoRAConfig(rank=2, targets="all_linear"))
    perturb(model, LoRAParam, seed=5)
    assert adapter_names(model) == ("policy", "reward")
    g, p, r, rest = nnx.split(model, adapter_filter("policy"), adapter_filter("reward"), ...)
    assert (len(jax.tree.leaves(p)), len(jax.tree.leaves(r))) == (16, 28)

    with use_adapters(model):
        np.testing.assert_array_equal(np.asarray(model(TOKENS_BxT)), base)
    outs = {}
    for names in [("policy",), ("reward",), ("policy", "reward")]:
        with use_adapters(model, *names):
            outs[names] = np.asarray(model(TOKENS_BxT))
        reference = np.asarray(merged_model(model, *names)(TOKENS_BxT))
        np.testing.assert_allclose(outs[names], reference, atol=2e-5, rtol=0)
        assert np.abs(outs[names] - base).max() > 0.05
    assert np.abs(outs[("policy",)] - outs[("reward",)]).max() > 0.05
    # outside any use_adapters every adapter is on, and the switch is restored on exit
    np.testing.assert_array_equal(np.asarray(model(TOKENS_BxT)), outs[("policy", "reward")])
    assert model.layers[1].mlp.up_proj.active == ("reward",)


def test_use_adapters_inside_jit():
    model = Transformer(CFG, rngs=nnx.Rngs(6))
    add_lora(model, "policy", LoRAConfig(rank=4))
    perturb(model, LoRAParam, seed=7)
    graphdef, state = nnx.split(model)

    @jax.jit
    def policy_and_anchor(state):
        m = nnx.merge(graphdef, state)
        with use_adapters(m):
            anchor = m(TOKENS_BxT)
        with use_adapters(m, "policy"):
            policy = m(TOKENS_BxT)
        return policy, anchor

    policy, anchor = policy_and_anchor(state)
    base = merged_model(model)
    b_graphdef, b_state = nnx.split(base)
    np.testing.assert_array_equal(anchor, jax.jit(lambda s: nnx.merge(b_graphdef, s)(TOKENS_BxT))(b_state))
    np.testing.assert_allclose(policy, merged_model(model, "policy")(TOKENS_BxT), atol=2e-5, rtol=0)

    @nnx.jit
    def anchor_nnx(m):
        with use_adapters(m):
            return m(TOKENS_BxT)

    np.testing.assert_array_equal(anchor_nnx(model), anchor)

    @jax.jit
    def captured():
        with use_adapters(model):
            return model(TOKENS_BxT)

    with pytest.raises(LoRAError, match="nnx.merge"):
        captured()


def test_merge_and_unmerge():
    model = Transformer(CFG, rngs=nnx.Rngs(8))
    add_lora(model, "policy", LoRAConfig(rank=4, alpha=4.0))
    perturb(model, LoRAParam, seed=9)
    q = model.layers[0].attn.q_proj
    w = np.array(q.kernel.get_value())
    a, b = np.asarray(q.lora["policy"].a.get_value()), np.asarray(q.lora["policy"].b.get_value())
    adapted = np.asarray(model(TOKENS_BxT))

    merge_adapter(model, "policy")
    np.testing.assert_allclose(np.asarray(q.kernel.get_value()), w + 1.0 * a @ b, rtol=0, atol=1e-7)
    np.testing.assert_allclose(np.asarray(model(TOKENS_BxT)), adapted, atol=2e-5, rtol=0)
    with pytest.raises(LoRAError, match="merged into the base weights"):
        with use_adapters(model):
            pass
    with pytest.raises(LoRAError, match="already merged"):
        merge_adapter(model, "policy")
    unmerge_adapter(model, "policy")
    np.testing.assert_allclose(np.asarray(q.kernel.get_value()), w, rtol=0, atol=1e-7)
    np.testing.assert_allclose(np.asarray(model(TOKENS_BxT)), adapted, atol=2e-5, rtol=0)
    assert q.merged == ()


# -- mixed precision -----------------------------------------------------------------------------
def test_bf16_frozen_with_fp32_adapters():
    model = Transformer(CFG, dtype=jnp.bfloat16, rngs=nnx.Rngs(10))
    base = np.asarray(model(TOKENS_BxT))
    add_lora(model, "policy", LoRAConfig(rank=4))
    np.testing.assert_array_equal(np.asarray(model(TOKENS_BxT)), base)
    graphdef, adapters, frozen = nnx.split(model, LoRAParam, ...)
    assert {x.dtype for x in jax.tree.leaves(adapters)} == {jnp.dtype(jnp.float32)}
    assert {x.dtype for x in jax.tree.leaves(frozen)} == {jnp.dtype(jnp.bfloat16)}

    # one projection by hand: bf16 base output plus the fp32 update cast to bf16
    perturb(model, LoRAParam, seed=11)
    q = model.layers[0].attn.q_proj
    x = jax.random.normal(jax.random.key(0), (3, 64), jnp.bfloat16)
    w, a, b = q.kernel.get_value(), q.lora["policy"].a.get_value(), q.lora["policy"].b.get_value()
    expected = x @ w + ((x.astype(jnp.float32) @ a @ b) * (16.0 / 4)).astype(jnp.bfloat16)
    y = q(x)
    assert y.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(y, np.float32), np.asarray(expected, np.float32))

    graphdef, adapters, frozen = nnx.split(model, LoRAParam, ...)
    frozen_before = [np.array(x) for x in jax.tree.leaves(frozen)]
    opt = optax.adam(1e-2)
    opt_state = opt.init(adapters)

    @jax.jit
    def step(adapters, opt_state, frozen):
        loss_fn = lambda a: next_token_loss(nnx.merge(graphdef, a, frozen)(TOKENS_BxT), TOKENS_BxT)
        loss, grads = jax.value_and_grad(loss_fn)(adapters)
        updates, opt_state = opt.update(grads, opt_state, adapters)
        return optax.apply_updates(adapters, updates), opt_state, loss, grads

    adapters, opt_state, loss0, grads = step(adapters, opt_state, frozen)
    assert {x.dtype for x in jax.tree.leaves(grads)} == {jnp.dtype(jnp.float32)}
    assert all(np.isfinite(np.asarray(g)).all() for g in jax.tree.leaves(grads))
    for _ in range(4):
        adapters, opt_state, loss, _ = step(adapters, opt_state, frozen)
    assert float(loss) < float(loss0)
    assert {x.dtype for x in jax.tree.leaves(opt_state[0].mu)} == {jnp.dtype(jnp.float32)}
    assert {x.dtype for x in jax.tree.leaves(adapters)} == {jnp.dtype(jnp.float32)}
    for x, y in zip(frozen_before, jax.tree.leaves(frozen)):
        np.testing.assert_array_equal(x, np.asarray(y))


# -- bad input -------------------------------------------------------------------------------------
def test_errors_name_the_problem():
    model = Transformer(CFG)
    with pytest.raises(LoRAError, match=r"targets 'x_proj'.*match no projection.*layers\.0\.attn\.q_proj"):
        add_lora(model, "policy", LoRAConfig(targets="x_proj"))
    with pytest.raises(LoRAError, match=r"^LoRAConfig.rank=0: expected an integer >= 1$"):
        LoRAConfig(rank=0)
    with pytest.raises(LoRAError, match=r"^LoRAConfig.rank=-2: expected an integer >= 1$"):
        LoRAConfig(rank=-2)
    with pytest.raises(LoRAError, match=r"^LoRAConfig.param_dtype='int8': expected one of 'float32', 'bfloat16', "
                                        r"'float16'$"):
        LoRAConfig(param_dtype="int8")
    # k_proj is [64, 32]: rank 40 fits q and o ([64, 64]) but not k
    with pytest.raises(LoRAError, match=r"rank 40 .* parameter layers\.0\.attn\.k_proj\.kernel of shape \[64, 32\]"):
        add_lora(model, "policy", LoRAConfig(rank=40))
    assert lora_modules(model) == []  # a failed add changes nothing
    with pytest.raises(LoRAError, match="Python identifier"):
        add_lora(model, "my.policy")
    add_lora(model, "policy", LoRAConfig(rank=2))
    with pytest.raises(LoRAError, match="already exists"):
        add_lora(model, "policy")
    with pytest.raises(LoRAError, match=r"no adapter named \['reward'\]"):
        with use_adapters(model, "reward"):
            pass


# -- the real model ----------------------------------------------------------------------------------
@pytest.mark.real_model
def test_real_gemma_270m_rank8_attention(gemma_gguf_path):
    from pe_rlhf.checkpoints import from_pretrained

    model, tokenizer = from_pretrained(gemma_gguf_path)
    tokens_BxT = jnp.asarray([tokenizer("The capital of France is")["input_ids"]])
    base = np.asarray(model(tokens_BxT))
    base_total = param_count(model).total
    count = add_lora(model, "policy", LoRAConfig(rank=8, targets="attention"))
    # per layer: 8 * ((640 + 1024) + (640 + 256) + (640 + 256) + (1024 + 640)) = 40,960; 18 layers
    assert count.adapter == 737_280
    assert count.total == base_total + 737_280
    assert count.percent < 0.5
    np.testing.assert_array_equal(np.asarray(model(tokens_BxT)), base)
