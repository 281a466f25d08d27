"""The sampler against full forward passes: log-probs, greedy decoding, EOS masking, filtering."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from pe_rlhf.models import ModelConfig, Transformer
from pe_rlhf.sampling import filter_logits, sample

CFG = ModelConfig(family="gemma3", vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=2,
                  num_kv_heads=1, head_dim=16, sliding_window=3, layer_types=("sliding_attention", "full_attention"),
                  qk_norm=True, eos_token_ids=(5,), pad_token_id=0)


@pytest.fixture(scope="module")
def model():
    return Transformer(CFG, rngs=nnx.Rngs(1))


PROMPT = jnp.array([[0, 0, 7, 8, 9], [11, 12, 13, 14, 15]])  # row 0 left-padded
PROMPT_MASK = PROMPT > 0


def full_logprobs(model, out):
    tokens = jnp.concatenate([PROMPT, out.tokens_BxN], 1)
    mask = jnp.concatenate([PROMPT_MASK, out.mask_BxN], 1)
    logp = jax.nn.log_softmax(model(tokens, input_mask_BxT=mask), -1)
    t = PROMPT.shape[1]
    return jnp.take_along_axis(logp[:, t - 1:-1], out.tokens_BxN[..., None], -1)[..., 0], logp


def test_logprobs_equal_full_forward(model):
    out = sample(model, PROMPT, PROMPT_MASK, rng=jax.random.key(3), max_new_tokens=8, temperature=1.0, eos_ids=())
    ref, _ = full_logprobs(model, out)
    assert out.mask_BxN.all()
    np.testing.assert_allclose(np.asarray(out.logprobs_BxN), np.asarray(ref), atol=2e-5)


@pytest.mark.slow
def test_greedy_equals_argmax_decoding(model):
    out = sample(model, PROMPT, PROMPT_MASK, max_new_tokens=6, temperature=0.0, eos_ids=())
    tokens, mask = PROMPT, PROMPT_MASK
    for _ in range(6):  # recompute the whole sequence each step
        nxt = jnp.argmax(model(tokens, input_mask_BxT=mask)[:, -1], -1)
        tokens = jnp.concatenate([tokens, nxt[:, None]], 1)
        mask = jnp.concatenate([mask, jnp.ones((2, 1), bool)], 1)
    np.testing.assert_array_equal(np.asarray(out.tokens_BxN), np.asarray(tokens[:, 5:]))


def test_greedy_rows_in_a_sampled_batch(model):
    """ReMax: sampled and greedy rollouts in one call; greedy rows equal a greedy-only call."""
    both = sample(model, jnp.concatenate([PROMPT, PROMPT]), jnp.concatenate([PROMPT_MASK, PROMPT_MASK]),
                  rng=jax.random.key(0), max_new_tokens=6, greedy_B=[False, False, True, True], eos_ids=())
    greedy = sample(model, PROMPT, PROMPT_MASK, max_new_tokens=6, temperature=0.0, eos_ids=())
    np.testing.assert_array_equal(np.asarray(both.tokens_BxN[2:]), np.asarray(greedy.tokens_BxN))


def test_eos_stops_a_row_and_masks_what_follows(model):
    greedy = sample(model, PROMPT, PROMPT_MASK, max_new_tokens=6, temperature=0.0, eos_ids=())
    eos = int(greedy.tokens_BxN[0, 2])  # make row 0's third greedy token the EOS
    out = sample(model, PROMPT, PROMPT_MASK, max_new_tokens=6, temperature=0.0, eos_ids=(eos,))
    row0 = np.asarray(out.tokens_BxN[0])
    first = int(np.argmax(row0 == eos))
    assert np.asarray(out.mask_BxN[0]).tolist() == [True] * (first + 1) + [False] * (5 - first)
    assert (row0[first + 1:] == 0).all() and bool(out.ended_with_eos_B[0])
    assert int(out.length_B[0]) == first + 1
    assert (np.asarray(out.logprobs_BxN[0, first + 1:]) == 0).all()


def test_sampling_is_reproducible_from_the_key(model):
    a = sample(model, PROMPT, PROMPT_MASK, rng=jax.random.key(7), max_new_tokens=5, eos_ids=())
    b = sample(model, PROMPT, PROMPT_MASK, rng=jax.random.key(7), max_new_tokens=5, eos_ids=())
    c = sample(model, PROMPT, PROMPT_MASK, rng=jax.random.key(8), max_new_tokens=5, eos_ids=())
    np.testing.assert_array_equal(np.asarray(a.tokens_BxN), np.asarray(b.tokens_BxN))
    assert not np.array_equal(np.asarray(a.tokens_BxN), np.asarray(c.tokens_BxN))


def test_filter_logits_by_hand():
    logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]]))
    top2 = filter_logits(logits, temperature=1.0, top_k=2, top_p=None)
    assert np.isfinite(np.asarray(top2)).tolist() == [[True, True, False, False]]
    # nucleus 0.7: 0.5 alone is below 0.7, 0.5+0.3 reaches it -> keep two
    nucleus = filter_logits(logits, temperature=1.0, top_k=None, top_p=0.7)
    assert np.isfinite(np.asarray(nucleus)).tolist() == [[True, True, False, False]]
    hot = filter_logits(logits, temperature=2.0, top_k=None, top_p=None)
    np.testing.assert_allclose(np.asarray(hot), np.asarray(logits) / 2, rtol=1e-6)
