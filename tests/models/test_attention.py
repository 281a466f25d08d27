"""Fused attention kernels against the XLA einsum attention.

On the CPU the "mosaic_tpu" path runs the splash kernel in Pallas interpret mode and "cudnn" runs
`jax.nn.dot_product_attention`'s XLA implementation: the arguments are the ones a TPU or GPU gets.
Everything is float32; fused and einsum attention agree to 1e-5 (the kernels sum in another order).
They agree at real tokens only: a padding query sees no real key, which the einsum path turns into
a uniform average over every key and the kernels into attention among the padding itself; neither
is read by anything.
"""

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from pe_rlhf.models import attention
from pe_rlhf.models.attention import attention_path, fused_attention, resolve_attention_impl
from pe_rlhf.models.config import ModelConfig
from pe_rlhf.models.tiny import tiny_config
from pe_rlhf.models.attention import Packing
from pe_rlhf.models.transformer import Transformer, _attend

from tests.models.helpers import left_padded_batch, randomize

FUSED = ("mosaic_tpu", "cudnn")
ATOL = 1e-5


def _qkv(b, t, n, k, h, seed=0):
    rng = np.random.RandomState(seed)
    return tuple(jnp.asarray(rng.randn(b, t, heads, h), jnp.float32) for heads in (n, k, k))


def _reference(q_BxTxNxH, k_BxTxKxH, v_BxTxKxH, segment_BxT, *, scale, softcap, window):
    """Today's einsum attention over the dense mask the segment ids stand for."""
    b, t, n, h = q_BxTxNxH.shape
    k = k_BxTxKxH.shape[2]
    slots = jnp.arange(t)
    mask_BxTxS = (segment_BxT[:, :, None] == segment_BxT[:, None, :]) & (slots[None, :] <= slots[:, None])
    if window is not None:
        mask_BxTxS &= (slots[:, None] - slots[None, :]) < window
    out = _attend(q_BxTxNxH.reshape(b, t, k, n // k, h), k_BxTxKxH, v_BxTxKxH, mask_BxTxS, scale, softcap,
                  jnp.float32)
    return out.reshape(b, t, n, h)


# Each case: (heads N, kv heads K, window, softcap, segment ids). Left padding is segment 0 then 1;
# packed rows are items 0, 1, 2 then -1 padding.
LEFT_PADDED = [[0] * 7 + [1] * 13, [1] * 20]
PACKED = [[0] * 6 + [1] * 9 + [-1] * 5, [0] * 11 + [1] * 3 + [2] * 6]
CASES = {
    "causal": (4, 4, None, None, [[1] * 20] * 2),
    "gqa": (4, 2, None, None, [[1] * 20] * 2),
    "mqa": (4, 1, None, None, [[1] * 20] * 2),
    "sliding_window": (4, 2, 5, None, [[1] * 20] * 2),
    "softcap": (4, 2, None, 2.0, [[1] * 20] * 2),
    "left_padding": (4, 2, None, None, LEFT_PADDED),
    "left_padding_window_softcap": (4, 2, 5, 2.0, LEFT_PADDED),
    "packed_segments": (4, 2, None, None, PACKED),
    "packed_segments_window": (4, 2, 4, None, PACKED),
}


@pytest.mark.parametrize("impl", FUSED)
@pytest.mark.parametrize("case", sorted(CASES))
def test_fused_equals_einsum_attention(impl, case):
    n, k, window, softcap, segments = CASES[case]
    if impl == "cudnn" and softcap is not None:
        pytest.skip("jax.nn.dot_product_attention has no softcap; such models run on 'xla' (tested below)")
    q, kk, v = _qkv(2, 20, n, k, 16)
    segment_BxT = jnp.asarray(segments, jnp.int32)
    kw = dict(scale=0.3, softcap=softcap, window=window)
    got = jax.jit(lambda q, kk, v: fused_attention(impl, q, kk, v, segment_BxT, **kw))(q, kk, v)
    want = _reference(q, kk, v, segment_BxT, **kw)
    real = np.asarray(segment_BxT) >= 0  # packing's padding (-1) is compared nowhere downstream
    assert np.all(np.isfinite(np.asarray(got)))
    np.testing.assert_allclose(np.asarray(got)[real], np.asarray(want)[real], atol=ATOL, rtol=0)


def test_splash_gradients_equal_einsum_gradients():
    q, kk, v = _qkv(2, 20, 4, 2, 16, seed=1)
    segment_BxT = jnp.asarray(LEFT_PADDED, jnp.int32)
    kw = dict(scale=0.3, softcap=2.0, window=5)
    weights = jnp.asarray(np.random.RandomState(2).randn(2, 20, 4, 16), jnp.float32)
    loss = lambda f: lambda q, kk, v: jnp.sum(weights * f(q, kk, v, segment_BxT, **kw))
    got = jax.grad(loss(lambda *a, **k: fused_attention("mosaic_tpu", *a, **k)), argnums=(0, 1, 2))(q, kk, v)
    want = jax.grad(loss(_reference), argnums=(0, 1, 2))(q, kk, v)
    for g, w in zip(got, want):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), atol=ATOL, rtol=0)


# -- the whole model ----------------------------------------------------------------------

def _model(cfg: ModelConfig, impl: str) -> Transformer:
    return randomize(Transformer(cfg.replace(attention_impl=impl), rngs=nnx.Rngs(0)), seed=3)


MODELS = {
    "llama": tiny_config("llama", vocab_size=128),
    # window 8 < 24 tokens: the sliding layer's window matters
    "gemma3": tiny_config("gemma3", vocab_size=128),
    "gemma3_softcap": tiny_config("gemma3", vocab_size=128).replace(attn_logit_softcap=3.0),
}


@pytest.mark.parametrize("impl", FUSED)
@pytest.mark.parametrize("family", sorted(MODELS))
def test_tiny_model_logits_fused_equal_xla(family, impl):
    ids, mask = left_padded_batch(4, [24, 15, 9], 24)
    logits = {name: np.asarray(_model(MODELS[family], name)(jnp.asarray(ids), input_mask_BxT=jnp.asarray(mask)))
              for name in ("xla", impl)}
    real = mask.astype(bool)
    np.testing.assert_allclose(logits[impl][real], logits["xla"][real], atol=1e-4, rtol=0)


def test_tiny_model_gradients_fused_equal_xla():
    ids, mask = left_padded_batch(5, [24, 13], 24)

    def grads(impl):
        model = _model(MODELS["gemma3"], impl)
        graphdef, params = nnx.split(model, nnx.Param)

        def loss(params):
            logits = nnx.merge(graphdef, params)(jnp.asarray(ids), input_mask_BxT=jnp.asarray(mask))
            logp = jax.nn.log_softmax(logits, -1)[:, :-1]
            picked = jnp.take_along_axis(logp, jnp.asarray(ids)[:, 1:, None], -1)[..., 0]
            real_to_real = jnp.asarray(mask[:, :-1] * mask[:, 1:])  # padding's outputs differ: see below
            return -jnp.sum(picked * real_to_real)

        return nnx.to_flat_state(jax.grad(loss)(params))

    for (path, g), (_, w) in zip(grads("mosaic_tpu"), grads("xla")):
        g, w = np.asarray(g.get_value()), np.asarray(w.get_value())
        np.testing.assert_allclose(g, w, atol=1e-4 * max(1.0, np.abs(w).max()), rtol=0, err_msg=str(path))


def _packed_batch(branches: int):
    """Two rows of 64 slots: items [prompt | response] (or [prompt | response 1 | response 2]) and padding."""
    layouts = {1: [[(0, 10, 0), (0, 8, 1), (1, 6, 0), (1, 12, 1)], [(0, 20, 0), (0, 14, 1)]],
               2: [[(0, 10, 0), (0, 8, 1), (0, 5, 2), (1, 6, 0), (1, 12, 1)], [(0, 20, 0), (0, 14, 1), (0, 9, 2)]]}
    segment, branch, position = (np.full((2, 64), -1), np.zeros((2, 64), int), np.zeros((2, 64), int))
    for row, spans in enumerate(layouts[branches]):
        slot, prompt_end = 0, 0
        for seg, length, br in spans:
            start = 0 if br == 0 else prompt_end  # every response continues its prompt's positions
            segment[row, slot:slot + length], branch[row, slot:slot + length] = seg, br
            position[row, slot:slot + length] = np.arange(start, start + length)
            prompt_end = start + length if br == 0 else prompt_end
            slot += length
    tokens = np.random.RandomState(6).randint(0, 128, (2, 64))
    packing = Packing(jnp.asarray(segment), jnp.asarray(branch), span=48, branches=branches)
    return jnp.asarray(tokens), jnp.asarray(position), packing, segment >= 0


@pytest.mark.parametrize("impl", FUSED)
def test_packed_rows_one_continuation_fused_equal_xla(impl):
    tokens, positions, packing, real = _packed_batch(branches=1)
    hidden = {name: np.asarray(_model(MODELS["gemma3"], name).hidden(tokens, positions_BxT=positions,
                                                                     packing=packing)[0])
              for name in ("xla", impl)}
    np.testing.assert_allclose(hidden[impl][real], hidden["xla"][real], atol=1e-4, rtol=0)


def test_packed_rows_with_shared_prompts_keep_xla_and_say_so(caplog):
    tokens, positions, packing, real = _packed_batch(branches=2)
    attention.log_once.cache_clear()
    with caplog.at_level(logging.WARNING, logger=attention.__name__):
        hidden = {name: np.asarray(_model(MODELS["gemma3"], name).hidden(tokens, positions_BxT=positions,
                                                                         packing=packing)[0])
                  for name in ("xla", "mosaic_tpu")}
    assert "segment ids cannot let two continuations share a prompt" in caplog.text
    np.testing.assert_array_equal(hidden["mosaic_tpu"], hidden["xla"])


def test_reward_read_and_kv_cache_decoding_with_a_fused_impl():
    """The scorer's last layer (read_BxM) and cached decoding run the XLA path inside a fused model."""
    ids, mask = left_padded_batch(7, [24, 11], 24)
    ids, mask = jnp.asarray(ids), jnp.asarray(mask)
    read_Bx1 = jnp.full((2, 1), 23)
    models = {name: _model(MODELS["gemma3"], name) for name in ("xla", "mosaic_tpu")}
    read = {name: np.asarray(m.hidden(ids, input_mask_BxT=mask, read_BxM=read_Bx1)[0]) for name, m in models.items()}
    np.testing.assert_allclose(read["mosaic_tpu"], read["xla"], atol=1e-4, rtol=0)
    decoded = {}
    for name, m in models.items():
        logits, cache = m.decode(ids, m.init_cache(2, 32), input_mask_BxT=mask)
        decoded[name] = np.asarray(m.decode(ids[:, -1:], cache)[0])
    np.testing.assert_array_equal(decoded["mosaic_tpu"], decoded["xla"])


# -- the choice ---------------------------------------------------------------------------

def test_auto_is_todays_attention_on_cpu():
    assert jax.default_backend() == "cpu"
    assert ModelConfig().attention_impl == "auto"
    assert resolve_attention_impl("auto", None) == "xla"
    ids, mask = left_padded_batch(8, [24, 10], 24)
    logits = [np.asarray(_model(MODELS["gemma3"], name)(jnp.asarray(ids), input_mask_BxT=jnp.asarray(mask)))
              for name in ("auto", "xla")]
    np.testing.assert_array_equal(logits[0], logits[1])


def test_paths_that_keep_xla(caplog, monkeypatch):
    attention.log_once.cache_clear()
    with caplog.at_level(logging.WARNING, logger=attention.__name__):
        assert resolve_attention_impl("cudnn", 50.0) == "xla"
    assert "no logit softcap" in caplog.text
    assert resolve_attention_impl("mosaic_tpu", 50.0) == "mosaic_tpu"  # the splash kernel caps logits
    assert attention_path("mosaic_tpu", None, cached=True, packed=False, branches=None) == "xla"
    assert attention_path("mosaic_tpu", None, cached=False, packed=True, branches=None) == "xla"
    assert attention_path("mosaic_tpu", None, cached=False, packed=True, branches=1) == "mosaic_tpu"
    assert attention_path("cudnn", None, cached=False, packed=False, branches=None) == "cudnn"
    # on a GPU cuDNN takes fp16/bf16 only: an fp32 model keeps the XLA path, a bf16 one gets the kernel
    assert attention_path("cudnn", None, cached=False, packed=False, branches=None, dtype=jnp.float32) == "cudnn"
    monkeypatch.setattr(attention.jax, "default_backend", lambda: "gpu")
    assert attention_path("cudnn", None, cached=False, packed=False, branches=None, dtype=jnp.float32) == "xla"
    assert attention_path("cudnn", None, cached=False, packed=False, branches=None, dtype=jnp.bfloat16) == "cudnn"


def test_unknown_impl_is_refused():
    with pytest.raises(ValueError, match="attention_impl 'splash' is not one of auto, xla, mosaic_tpu, cudnn"):
        ModelConfig(attention_impl="splash")
