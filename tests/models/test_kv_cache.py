"""Decoding with a KV cache gives the logits of recomputing the whole sequence."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from pe_rlhf.models import ModelConfig, RopeConfig, Transformer
from tests.models.helpers import randomize

V = 128
_BASE = dict(vocab_size=V, hidden_size=64, intermediate_size=96, num_layers=3, num_heads=4, num_kv_heads=2,
             head_dim=16)
# Llama (GQA, llama3 rope) and Gemma 3 (QK-norm, sliding and full layers, two rope bases). Qwen's
# switches (QKV bias, QK-norm) act before the cache is written and are covered by test_parity.py.
CONFIGS = {
    "llama": ModelConfig(family="llama", **_BASE,
                         rope=RopeConfig(theta=10_000.0, kind="llama3", factor=8.0,
                                         original_max_position_embeddings=64)),
    # Window 3 is shorter than the prompt (5) and than prompt + generated (12).
    "gemma3": ModelConfig(family="gemma3", **_BASE, qk_norm=True, sliding_window=3,
                          layer_types=("sliding_attention", "full_attention", "sliding_attention"),
                          rope=RopeConfig(theta=1_000_000.0), local_rope=RopeConfig(theta=100.0),
                          query_pre_attn_scalar=24),
}
# All untied: with random tied embeddings greedy decoding just repeats the last token, a weak test.
# (Tied heads are checked against transformers in test_parity.py.)

# Jitted entry points, as the sampler uses them; tiny models compile in about a second.
_forward = nnx.jit(lambda model, ids, mask: model(ids, input_mask_BxT=mask))
_decode = nnx.jit(lambda model, ids, cache, mask: model.decode(ids, cache, input_mask_BxT=mask))

# Prompts of 5, 3 and 1 real tokens, left-padded to 5; 7 greedy tokens; 2 cache slots left unused.
PROMPT_LENGTHS, T, STEPS, SPARE = [5, 3, 1], 5, 7, 2


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def model(request):
    # Seed 3: no greedy row collapses into repeating one token (checked below).
    return randomize(Transformer(CONFIGS[request.param], rngs=nnx.Rngs(0)), seed=3)


def _prompt(lengths, total, seed=0):
    ids = np.random.RandomState(seed).randint(1, V, (len(lengths), total)).astype(np.int32)
    mask = np.arange(total)[None, :] >= total - np.asarray(lengths)[:, None]
    return jnp.asarray(np.where(mask, ids, 0)), jnp.asarray(mask)


def test_greedy_decode_matches_recomputation(model):
    ids_BxT, mask_BxT = _prompt(PROMPT_LENGTHS, T)
    b = ids_BxT.shape[0]

    # With the cache: prefill, then one token at a time, feeding back the argmax.
    cache = model.init_cache(b, T + STEPS + SPARE)
    prefill_BxTxV, cache = _decode(model, ids_BxT, cache, mask_BxT)
    step_logits = [prefill_BxTxV[:, -1]]
    tokens = [step_logits[-1].argmax(-1)]
    for _ in range(STEPS - 1):
        logits_Bx1xV, cache = _decode(model, tokens[-1][:, None], cache, None)
        step_logits.append(logits_Bx1xV[:, 0])
        tokens.append(step_logits[-1].argmax(-1))
    assert int(cache.end) == T + STEPS - 1
    cached_BxNxV = np.stack([np.asarray(x) for x in step_logits], 1)
    cached_tokens_BxN = np.stack([np.asarray(t) for t in tokens], 1)

    # Without: the whole sequence through model(...) at every step. One fixed shape [B, T + STEPS]
    # (slots not yet generated are zeros; causality keeps them out of earlier positions).
    seq_BxL = jnp.concatenate([ids_BxT, jnp.zeros((b, STEPS), jnp.int32)], 1)
    seq_mask_BxL = jnp.concatenate([mask_BxT, jnp.ones((b, STEPS), bool)], 1)
    full_logits, full_tokens = [], []
    for i in range(STEPS):
        logits_BxLxV = np.asarray(_forward(model, seq_BxL, seq_mask_BxL))
        full_logits.append(logits_BxLxV[:, T - 1 + i])
        full_tokens.append(logits_BxLxV[:, T - 1 + i].argmax(-1))
        seq_BxL = seq_BxL.at[:, T + i].set(full_tokens[-1])

    np.testing.assert_array_equal(cached_tokens_BxN, np.stack(full_tokens, 1))
    np.testing.assert_allclose(cached_BxNxV, np.stack(full_logits, 1), rtol=0, atol=1e-4)
    # The prefill's own logits at the prompt's real positions match too.
    real = np.asarray(mask_BxT)
    np.testing.assert_allclose(np.asarray(prefill_BxTxV)[real], logits_BxLxV[:, :T][real], rtol=0, atol=1e-4)
    # Not a degenerate case: no row just repeats one token.
    assert min(len(set(row)) for row in cached_tokens_BxN.tolist()) >= 3, cached_tokens_BxN


def test_prefill_in_two_chunks_equals_one(model):
    # Rows 1 and 2 are all padding in the first chunk. Chunks of T and the cache length of the greedy
    # test reuse its compiled functions.
    lengths, total, split = [10, 5, 2], 2 * T, T
    ids_BxT, mask_BxT = _prompt(lengths, total, seed=3)
    b, length = ids_BxT.shape[0], T + STEPS + SPARE

    one_BxTxV, one = _decode(model, ids_BxT, model.init_cache(b, length), mask_BxT)
    first, cache = _decode(model, ids_BxT[:, :split], model.init_cache(b, length), mask_BxT[:, :split])
    second, two = _decode(model, ids_BxT[:, split:], cache, mask_BxT[:, split:])
    two_BxTxV = np.concatenate([np.asarray(first), np.asarray(second)], 1)

    real_BxT = np.asarray(mask_BxT)
    np.testing.assert_allclose(two_BxTxV[real_BxT], np.asarray(one_BxTxV)[real_BxT], rtol=0, atol=1e-4)
    assert int(one.end) == int(two.end) == total
    np.testing.assert_array_equal(np.asarray(two.mask_BxS), np.asarray(one.mask_BxS))
    np.testing.assert_array_equal(np.asarray(one.mask_BxS)[:, :total], real_BxT)
    for layer in range(model.config.num_layers):  # keys and values of real tokens (padding slots are masked)
        for a, c in ((one.k[layer], two.k[layer]), (one.v[layer], two.v[layer])):
            np.testing.assert_allclose(np.asarray(a)[:, :total][real_BxT], np.asarray(c)[:, :total][real_BxT],
                                       rtol=0, atol=1e-5)

    # And the next token decodes the same from either cache.
    nxt_Bx1 = jnp.asarray(np.asarray(one_BxTxV[:, -1].argmax(-1))[:, None])
    a, _ = _decode(model, nxt_Bx1, one, None)
    c, _ = _decode(model, nxt_Bx1, two, None)
    np.testing.assert_allclose(np.asarray(a), np.asarray(c), rtol=0, atol=1e-4)


def test_sliding_window_is_in_effect():
    """Guards the gemma3 case above against passing vacuously: the window changes the late logits."""
    cfg = CONFIGS["gemma3"]
    windowed = randomize(Transformer(cfg, rngs=nnx.Rngs(0)), seed=3)
    # Same layers (and local rope) with a window longer than the sequence.
    unwindowed = nnx.merge(nnx.graphdef(Transformer(cfg.replace(sliding_window=1000), rngs=nnx.Rngs(0))),
                           nnx.state(windowed))
    ids_BxT, mask_BxT = _prompt([T + STEPS] * 3, T + STEPS)
    a = np.asarray(_forward(windowed, ids_BxT, mask_BxT))
    c = np.asarray(_forward(unwindowed, ids_BxT, mask_BxT))
    # Positions 0..2 see at most 3 tokens, so the window cuts nothing there; later positions differ.
    np.testing.assert_allclose(a[:, :3], c[:, :3], rtol=0, atol=1e-5)
    assert np.abs(a[:, 3:] - c[:, 3:]).max() > 1e-2


def test_rematerialised_blocks_give_the_same_logits_and_gradients():
    """`Transformer(remat=True)` recomputes blocks in the backward pass; values and gradients are unchanged."""
    from pe_rlhf.models.tiny import tiny_config

    cfg = tiny_config("gemma3")
    plain, remat = Transformer(cfg, rngs=nnx.Rngs(0)), Transformer(cfg, rngs=nnx.Rngs(0), remat=True)
    tokens = jnp.arange(24, dtype=jnp.int32).reshape(2, 12) % cfg.vocab_size

    def loss(model):
        return jnp.mean(jax.nn.log_softmax(model(tokens))[..., 5])

    (l1, g1), (l2, g2) = (nnx.value_and_grad(loss)(m) for m in (plain, remat))
    np.testing.assert_allclose(float(l1), float(l2), rtol=1e-6)
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7)
    def grad_jaxpr(model):
        graphdef, state = nnx.split(model)
        return str(jax.make_jaxpr(jax.grad(lambda st: jnp.mean(nnx.merge(graphdef, st)(tokens))))(state))

    assert "remat" in grad_jaxpr(remat) and "remat" not in grad_jaxpr(plain)  # blocks really are recomputed


@pytest.mark.parametrize("shape", [(8, 1), (2, 16), (4, 16), (3,)])
@pytest.mark.parametrize("vocab", [1000, 999])
def test_tied_logits_equal_the_plain_product(shape, vocab):
    """The vocabulary split that decoding takes on the CPU (<= 32 rows, even vocabulary) changes no value."""
    from pe_rlhf.models.transformer import _tied_logits

    kx, ke = jax.random.split(jax.random.key(3))
    x = jax.random.normal(kx, (*shape, 24))
    emb = jax.random.normal(ke, (vocab, 24))
    got = jax.jit(_tied_logits)(x, emb)
    assert got.shape == (*shape, vocab) and got.dtype == jnp.float32
    want = np.einsum("...d,vd->...v", np.asarray(x, np.float64), np.asarray(emb, np.float64))
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("impl", ["xla", "mosaic_tpu", "cudnn"])
def test_prefill_equals_a_pass_into_a_fresh_cache(model, impl):
    """`Transformer.prefill` (cache-less, the model's attention kernel) fills the cache that `hidden` with a fresh
    cache fills (the 'xla' path over slots): the same hidden states, keys and values at real tokens, mask and end,
    and the same next decode step. On the CPU 'mosaic_tpu' is the splash kernel in interpret mode."""
    fused = randomize(Transformer(model.config.replace(attention_impl=impl), rngs=nnx.Rngs(0)), seed=3)
    ids_BxT, mask_BxT = _prompt(PROMPT_LENGTHS, T)
    b, length = ids_BxT.shape[0], T + STEPS + SPARE
    want_h, want = nnx.jit(lambda m, i, c, k: m.hidden(i, input_mask_BxT=k, cache=c))(
        model, ids_BxT, model.init_cache(b, length), mask_BxT)
    got_h, got = nnx.jit(lambda m, i, k: m.prefill(i, input_mask_BxT=k, length=length))(fused, ids_BxT, mask_BxT)
    real_BxT = np.asarray(mask_BxT)
    np.testing.assert_allclose(np.asarray(got_h)[real_BxT], np.asarray(want_h)[real_BxT], rtol=0, atol=1e-5)
    assert int(got.end) == int(want.end) == T and got.length == length
    np.testing.assert_array_equal(np.asarray(got.mask_BxS), np.asarray(want.mask_BxS))
    for layer in range(model.config.num_layers):
        for a, c in ((got.k[layer], want.k[layer]), (got.v[layer], want.v[layer])):
            assert a.shape == c.shape and a.dtype == c.dtype
            np.testing.assert_allclose(np.asarray(a)[:, :T][real_BxT], np.asarray(c)[:, :T][real_BxT], rtol=0, atol=1e-5)
            assert not np.asarray(a)[:, T:].any()  # slots not yet written stay zero
    nxt_Bx1 = jnp.asarray(np.asarray(want_h[:, -1].argmax(-1))[:, None])  # any token; the same from both caches
    a, _ = _decode(model, nxt_Bx1, want, None)
    c, _ = _decode(fused, nxt_Bx1, got, None)
    np.testing.assert_allclose(np.asarray(c), np.asarray(a), rtol=0, atol=1e-4)
    with pytest.raises(ValueError, match="6 tokens does not fit a cache of 5 slots"):
        fused.prefill(jnp.zeros((1, 6), jnp.int32), length=5)


def test_write_puts_tokens_at_the_end_slots():
    """Two writes of 2 and 1 tokens into 4 slots: each at the slots after the last, by hand."""
    from pe_rlhf.models import KVCache

    cfg = CONFIGS["llama"]
    cache = KVCache.init(cfg, batch=2, length=4)
    shape = lambda t: (2, t, cfg.num_kv_heads, cfg.head_dim)
    k1, v1 = [jnp.full(shape(2), 1.0 + i) for i in range(cfg.num_layers)], [jnp.full(shape(2), -1.0 - i)
                                                                             for i in range(cfg.num_layers)]
    k2, v2 = [jnp.full(shape(1), 10.0 + i) for i in range(cfg.num_layers)], [jnp.full(shape(1), -10.0 - i)
                                                                              for i in range(cfg.num_layers)]
    cache = cache.write(k1, v1, jnp.array([[False, True], [True, True]]))
    cache = cache.write(k2, v2, jnp.array([[True], [True]]))
    assert int(cache.end) == 3
    np.testing.assert_array_equal(cache.mask_BxS, [[False, True, True, False], [True, True, True, False]])
    for i in range(cfg.num_layers):
        np.testing.assert_array_equal(cache.k[i][0, :, 0, 0], [1 + i, 1 + i, 10 + i, 0])
        np.testing.assert_array_equal(cache.v[i][1, :, 1, 3], [-1 - i, -1 - i, -10 - i, 0])
