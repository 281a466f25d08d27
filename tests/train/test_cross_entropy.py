"""The SFT cross-entropy through tokamax's fused op (its XLA reference on CPU) against the logits path."""

import dataclasses
import importlib.util

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from pe_rlhf.models import lora
from pe_rlhf.models.config import CROSS_ENTROPY_IMPLS
from pe_rlhf.models.tiny import tiny_config
from pe_rlhf.models.transformer import Transformer
from pe_rlhf.train.cross_entropy import resolve_cross_entropy_impl, token_nll
from pe_rlhf.train.supervised_steps import sft_loss


def _model(tied: bool, impl: str):
    cfg = dataclasses.replace(tiny_config("gemma3"), tie_word_embeddings=tied, cross_entropy_impl=impl)
    model = Transformer(cfg, dtype=jnp.float32, rngs=nnx.Rngs(0))
    lora.add_lora(model, "sft", lora.LoRAConfig(rank=4, alpha=8.0))
    key = jax.random.key(3)
    for _, m in lora.lora_modules(model):  # non-zero b: the adapter's gradient is not trivially the same
        key, k = jax.random.split(key)
        m.lora["sft"].b.set_value(jax.random.normal(k, m.lora["sft"].b[...].shape) * 0.1)
    return model


def _batch():
    tokens = jax.random.randint(jax.random.key(1), (3, 12), 3, 40)
    mask = jnp.ones((3, 12), jnp.int32).at[1, :2].set(0)
    response = jnp.zeros((3, 12), jnp.int32).at[0, 6:].set(1).at[1, 9:].set(1).at[2, 3:8].set(1)
    return {"tokens_BxT": tokens, "mask_BxT": mask, "response_mask_BxT": response}


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("window", [None, 6])
def test_fused_cross_entropy_equals_the_logits_path_in_loss_and_gradient(tied, window):
    batch = _batch()
    out = {}
    for impl in ("logits", "tokamax_xla"):
        model = _model(tied, impl)
        graphdef, adapter, rest = nnx.split(model, lora.adapter_filter("sft"), ...)

        def loss(a, graphdef=graphdef, rest=rest):
            return sft_loss(nnx.merge(graphdef, a, rest), batch, response_window=window)

        (value, metrics), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(adapter)
        out[impl] = (value, metrics, grads)
    (v0, m0, g0), (v1, m1, g1) = out["logits"], out["tokamax_xla"]
    assert float(m0["tokens"]) == float(m1["tokens"]) == 6 + 3 + 5  # the response tokens, either layout
    np.testing.assert_allclose(float(v1), float(v0), rtol=1e-5)
    assert float(v0) > 1.0  # a real loss (random model: about log 40 tokens)
    for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1)):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=2e-5 * float(np.abs(a).max()) + 1e-7)


def test_auto_takes_the_fused_kernel_where_the_aot_plans_say_it_pays():
    """The four v5p:2x2x1 plans of docs/results.md (8 rows, bf16, 4 chips): rows per chip and hidden size."""
    from pe_rlhf.train.cross_entropy import fused_cross_entropy_pays

    assert fused_cross_entropy_pays(8 * 2047 // 4, 1152, 2)  # gemma3-1b, every position: 20.97 -> 2.66 GiB
    assert fused_cross_entropy_pays(8 * 512 // 4, 1152, 2)  # gemma3-1b, 512 positions: 5.94 -> 2.62 GiB
    assert fused_cross_entropy_pays(8 * 2047 // 4, 4096, 2)  # llama3-8b, every position: 16.62 -> 9.54 GiB
    assert not fused_cross_entropy_pays(8 * 512 // 4, 4096, 2)  # llama3-8b, 512 positions: 8.23 -> 9.63 GiB


def test_masked_rows_add_nothing_and_choices_are_checked():
    model = _model(True, "tokamax_xla")
    h = jax.random.normal(jax.random.key(0), (2, 5, model.config.hidden_size))
    targets = jax.random.randint(jax.random.key(1), (2, 5), 0, model.config.vocab_size)
    mask = jnp.array([[1, 1, 0, 0, 0], [0, 1, 0, 1, 0]])
    loss, metrics = token_nll(model, h, targets, mask)
    logp = jax.nn.log_softmax(model.logits(h), axis=-1)
    by_hand = -np.mean([float(logp[b, t, targets[b, t]]) for b, t in ((0, 0), (0, 1), (1, 1), (1, 3))])
    np.testing.assert_allclose(float(loss), by_hand, rtol=1e-5)
    assert float(metrics["tokens"]) == 4
    assert resolve_cross_entropy_impl("auto", None) == "logits"  # CPU
    assert resolve_cross_entropy_impl("auto", 30.0) == "logits"
    with pytest.raises(ValueError, match="softcaps its final logits"):
        resolve_cross_entropy_impl("mosaic_tpu", 30.0)
    with pytest.raises(ValueError, match="cross_entropy_impl 'fused' is not one of"):
        dataclasses.replace(tiny_config(), cross_entropy_impl="fused")
    for impl in CROSS_ENTROPY_IMPLS:  # and every listed choice is taken as given
        assert dataclasses.replace(tiny_config(), cross_entropy_impl=impl).cross_entropy_impl == impl


needs_libtpu = pytest.mark.skipif(
    importlib.util.find_spec("libtpu") is None,
    reason=f'libtpu is not installed; AOT TPU compilation needs: pip install "jax[tpu]=={jax.__version__}"')


@pytest.mark.slow
@needs_libtpu
def test_fused_sft_step_compiles_for_tpu_with_the_mosaic_kernel():
    """tokamax's Mosaic cross-entropy in an SFT step AOT-compiled for v5e:2x2 (rows split over the 4 chips,
    1,020 rows padded to 4 x 1,024); the logits path has no such kernel and holds the [rows, V] logits."""
    from pe_rlhf.profiling.measure import compile_step
    from pe_rlhf.profiling.step_builders import build_sft_step
    from pe_rlhf.train.config import TuningConfig

    cfg = dataclasses.replace(tiny_config("llama"), vocab_size=1024)
    tuning = TuningConfig(mode="lora", lora=lora.LoRAConfig(rank=4, alpha=8.0))
    text = {}
    for impl in ("logits", "mosaic_tpu"):
        spec = build_sft_step(cfg, tuning, rows=4, seq_len=256, frozen_dtype="bfloat16", cross_entropy_impl=impl)
        assert ("logits" in spec.estimates) == (impl == "logits")
        with jax.default_matmul_precision("default"):  # as a TPU run would
            text[impl] = compile_step(spec, topology="v5e:2x2").as_text()
    assert "tpu_custom_call" in text["mosaic_tpu"] and "tpu_custom_call" not in text["logits"]
