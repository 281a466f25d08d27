"""Packed reward-model batches give the padded batches' scores, loss and gradients, and train end to end."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from pe_rlhf import data as D
from pe_rlhf.data import packing as PK
from pe_rlhf.models import lora
from pe_rlhf.models.heads import RewardModel
from pe_rlhf.models.tiny import tiny_config
from pe_rlhf.models.transformer import Transformer
from pe_rlhf.train import supervised_steps
from pe_rlhf.train.optim import OptimizerConfig
from pe_rlhf.train.supervised import DataConfig, LoopConfig, TuningConfig, train_reward_model

from tests.train.test_reward_training import synthetic_pairs

MAX_PROMPT, MAX_RESPONSE = 30, 12
SPAN = PK.span(MAX_PROMPT, MAX_RESPONSE, 2)


def random_pairs(n, seed=0):
    rng = np.random.default_rng(seed)
    ids = lambda lo, hi: [int(x) for x in rng.integers(5, 90, rng.integers(lo, hi + 1))]
    return [D.TokenizedPair(ids(1, MAX_PROMPT), ids(0, MAX_RESPONSE), ids(1, MAX_RESPONSE),
                            margin=float(rng.uniform())) for _ in range(n)]


def reward_model(family, seed=0, attention_impl="auto"):
    backbone = Transformer(tiny_config(family).replace(attention_impl=attention_impl), rngs=nnx.Rngs(0))
    lora.add_lora(backbone, "reward", lora.LoRAConfig(rank=2, alpha=4.0))
    rm = RewardModel(backbone, adapters=("reward",))
    rng = np.random.default_rng(seed)
    rm.head.kernel[...] = jnp.asarray(rng.normal(size=rm.head.kernel.shape), jnp.float32)
    for _, module in lora.lora_modules(backbone):  # non-zero adapters, so they change the scores
        adapter = module.lora["reward"]
        adapter.b[...] = jnp.asarray(rng.normal(size=adapter.b.shape) * 0.1, jnp.float32)
    return rm


def in_pack_order(scores_RxPxK, pairs, options):
    """Packed scores back in the items' order."""
    rows, seen, out = PK.first_fit([PK.packed_length(p, options.share_prompt) for p in pairs], options), {}, []
    for r in rows:
        out.append(np.asarray(scores_RxPxK[r, seen.setdefault(r, 0)]))
        seen[r] += 1
    return np.stack(out)


@pytest.mark.parametrize("family", ["llama", "gemma3", "qwen2"])  # gemma3: sliding-window layers of 8 tokens
def test_packed_scores_equal_padded_scores(family):
    rm = reward_model(family)
    pairs = random_pairs(7)
    options = PK.PackOptions(rows=2, length=192, items_per_row=4)
    assert_scores_like_padded(rm, pairs, PK.pack(pairs, options), options, SPAN, atol=2e-5)


def assert_scores_like_padded(rm, pairs, batch, options, span, *, atol):
    """The packed batch's scores, in the items' order, equal each pair's padded chosen and rejected scores."""
    packed = rm.score_packed(jax.tree.map(jnp.asarray, batch), span)
    padded = D.batch_preferences(pairs, seq_len=MAX_PROMPT + MAX_RESPONSE)
    chosen = rm(jnp.asarray(padded["chosen_tokens_BxT"]), jnp.asarray(padded["chosen_mask_BxT"]))
    rejected = rm(jnp.asarray(padded["rejected_tokens_BxT"]), jnp.asarray(padded["rejected_mask_BxT"]))
    got = in_pack_order(packed, pairs, options)
    np.testing.assert_allclose(got[:, 0], chosen, atol=atol, rtol=1e-5)
    np.testing.assert_allclose(got[:, 1], rejected, atol=atol, rtol=1e-5)
    assert np.std(np.asarray(chosen)) > 0.1  # the scores differ from pair to pair


@pytest.mark.slow
@pytest.mark.parametrize("impl", ["xla", "cudnn", "mosaic_tpu"])
def test_unshared_prompts_score_like_padded_on_every_attention_path(impl):
    """[prompt | chosen][prompt | rejected] as plain causal segments: the fused kernels (splash in Pallas
    interpret mode, jax.nn's attention) take the rows and give the padded scores (gemma3: sliding windows)."""
    rm = reward_model("gemma3", attention_impl=impl)
    pairs = random_pairs(5, seed=3)
    options = PK.PackOptions(rows=2, length=256, items_per_row=3, share_prompt=False)
    batch = PK.pack(pairs, options)
    assert "branch_RxN" not in batch
    assert_scores_like_padded(rm, pairs, batch, options, PK.span(MAX_PROMPT, MAX_RESPONSE, 2, share_prompt=False),
                              atol=1e-4)


@pytest.mark.slow
def test_packed_loss_and_adapter_gradients_equal_padded():
    rm = reward_model("gemma3")
    pairs = random_pairs(6, seed=1)
    graphdef, trainable, frozen = nnx.split(rm, nnx.Any(lora.adapter_filter("reward"), nnx.PathContains("head")), ...)
    packed = jax.tree.map(jnp.asarray, PK.pack(pairs, PK.PackOptions(rows=1, length=256, items_per_row=8)))
    padded = jax.tree.map(jnp.asarray, D.batch_preferences(pairs, seq_len=MAX_PROMPT + MAX_RESPONSE))

    def grads(loss_fn, batch):
        def loss_of(trainable):
            return loss_fn(nnx.merge(graphdef, trainable, frozen), batch)
        return jax.value_and_grad(loss_of, has_aux=True)(trainable)

    (loss_p, metrics_p), g_p = grads(lambda m, b: supervised_steps.packed_pairwise_reward_loss(m, b, span=SPAN,
                                                                                              center_coef=0.1),
                                     packed)
    (loss_d, metrics_d), g_d = grads(lambda m, b: supervised_steps.pairwise_reward_loss(m, b, center_coef=0.1), padded)
    np.testing.assert_allclose(loss_p, loss_d, rtol=1e-5)
    np.testing.assert_allclose(metrics_p["accuracy"], metrics_d["accuracy"])
    for a, b in zip(jax.tree.leaves(g_p), jax.tree.leaves(g_d)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    assert float(optax_norm(g_d)) > 1e-3


def optax_norm(tree):
    return jnp.sqrt(sum(jnp.sum(jnp.square(x)) for x in jax.tree.leaves(tree)))


@pytest.mark.slow
def test_packed_training_learns_the_rule_and_evaluates_like_padded(tmp_path):
    common = dict(dataset=synthetic_pairs(400), model="tiny",
                  tuning=TuningConfig(mode="lora", lora=lora.LoRAConfig(rank=4, alpha=8.0)),
                  optimizer=OptimizerConfig(learning_rate=3e-3, schedule="constant"),
                  loop=LoopConfig(num_steps=120, batch_size=8, eval_every=0, log_every=40, checkpoint_every=1000,
                                  progress_bar=False, eval_batch_size=16))
    summary = train_reward_model(workdir=str(tmp_path / "packed"), **common,
                                 data=DataConfig(max_prompt_len=12, max_response_len=12, eval_size=100,
                                                 pack_length=128, pack_rows=2))
    assert summary["eval/pairwise_accuracy"] > 0.95, summary
    assert summary["eval/num_pairs"] == 100  # every held-out pair scored once
    assert summary["packing"] == {"length": 128, "rows": 2, "span": 36, "share_prompt": True}


def test_packed_config_errors_name_the_key(tmp_path):
    common = dict(workdir=str(tmp_path), dataset=synthetic_pairs(40), model="tiny",
                  loop=LoopConfig(num_steps=1, batch_size=6, eval_batch_size=8, progress_bar=False))
    with pytest.raises(ValueError, match="DataConfig.pack_length=64 is shorter than the longest item"):
        train_reward_model(**common, data=DataConfig(max_prompt_len=40, max_response_len=20, pack_length=64))
    with pytest.raises(ValueError, match=r"pack_length=128 is shorter than the longest item the config allows "
                                         r"\(144 tokens = 2 x \(max_prompt_len \+ max_response_len\), "
                                         r"pack_share_prompt=False\)"):
        train_reward_model(**common, data=DataConfig(max_prompt_len=52, max_response_len=20, pack_length=128,
                                                     pack_share_prompt=False))
    with pytest.raises(ValueError, match="LoopConfig.batch_size=6 must be a multiple of DataConfig.pack_rows=4"):
        train_reward_model(**common, data=DataConfig(max_prompt_len=12, max_response_len=12, pack_length=64,
                                                     pack_rows=4))


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_reading_only_the_last_tokens_equals_the_full_forward(family):
    """`hidden(read_BxM=...)` runs the last block at the read positions only; the states there are unchanged."""
    rm = reward_model(family)
    padded = D.batch_preferences(random_pairs(5, seed=2), seq_len=MAX_PROMPT + MAX_RESPONSE, padding="left")
    tokens, mask = jnp.asarray(padded["chosen_tokens_BxT"]), jnp.asarray(padded["chosen_mask_BxT"]).astype(bool)
    with lora.use_adapters(rm.backbone, "reward"):
        full_BxTxD, _ = rm.backbone.hidden(tokens, input_mask_BxT=mask)
        read_Bx3 = jnp.asarray([[t, t - 1, t - 5] for t in [tokens.shape[1] - 1] * tokens.shape[0]])
        read_Bx3xD, _ = rm.backbone.hidden(tokens, input_mask_BxT=mask, read_BxM=read_Bx3)
    np.testing.assert_allclose(read_Bx3xD, jnp.take_along_axis(full_BxTxD, read_Bx3[..., None], axis=1),
                               atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(rm(tokens, mask), rm.head(full_BxTxD[:, -1]), atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_packed_classification_trains_and_scores_every_held_out_example(tmp_path):
    """BCE on packed labelled responses: every held-out example scored once, with its own label."""
    rng = np.random.default_rng(3)
    word = lambda: "".join(rng.choice(list("abcdefgh")) for _ in range(rng.integers(3, 8)))
    examples = tuple(D.LabeledExample(f"Q{i}: say it", word() + ("!" if i % 3 else "."), 1.0 if i % 3 else 0.0)
                     for i in range(240))
    summary = train_reward_model(
        workdir=str(tmp_path), dataset=D.Loaded(examples=examples, source="synthetic-labeled"), model="tiny",
        tuning=TuningConfig(mode="lora", lora=lora.LoRAConfig(rank=4, alpha=8.0)),
        optimizer=OptimizerConfig(learning_rate=3e-3, schedule="constant"),
        loop=LoopConfig(num_steps=60, batch_size=8, eval_batch_size=8, eval_every=0, log_every=30,
                        checkpoint_every=1000, progress_bar=False),
        data=DataConfig(max_prompt_len=12, max_response_len=12, eval_size=60, pack_length=128))
    assert summary["eval/positive_fraction"] == pytest.approx(40 / 60, abs=0.1)  # labels travel with their scores
    assert summary["eval/accuracy"] > 0.9, summary
