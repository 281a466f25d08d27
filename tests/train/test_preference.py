"""DPO and IPO: the losses by hand, the step's reference (the backbone with adapters off), the job end to end."""

import functools
import json
import math
import random

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from pe_rlhf import data as D
from pe_rlhf.eval import winrate
from pe_rlhf.models import lora, merging
from pe_rlhf.models.tiny import tiny_model
from pe_rlhf.train import supervised_steps
from pe_rlhf.train.config import DataConfig, LoopConfig, TuningConfig
from pe_rlhf.train.optim import OptimizerConfig
from pe_rlhf.train.preference import batch_pairs, policy_filter, train_dpo
from pe_rlhf.train.rollout import RLModules
from pe_rlhf.train.supervised_losses import dpo_loss, ipo_loss, token_logprobs

BETA = 0.1
PC, PR = np.array([-3.0, -7.5, -2.0]), np.array([-4.0, -6.0, -2.5])
RC, RR = np.array([-3.5, -7.0, -2.2]), np.array([-3.8, -6.5, -2.6])


def _log_sigmoid(x):
    return -np.log1p(np.exp(-x))


# -- the losses, by hand -----------------------------------------------------------------------------
@pytest.mark.parametrize("eps", [0.0, 0.2])
def test_dpo_loss_by_hand(eps):
    h = (PC - PR) - (RC - RR)  # [0.7, -1.0, 0.1]
    want = np.mean(-(1 - eps) * _log_sigmoid(BETA * h) - eps * _log_sigmoid(-BETA * h))
    loss, m = dpo_loss(*map(jnp.asarray, (PC, PR, RC, RR)), beta=BETA, label_smoothing=eps)
    np.testing.assert_allclose(loss, want, rtol=1e-5)
    np.testing.assert_allclose(m["chosen_reward"], np.mean(BETA * (PC - RC)), rtol=1e-5)
    np.testing.assert_allclose(m["rejected_reward"], np.mean(BETA * (PR - RR)), rtol=1e-5)
    np.testing.assert_allclose(m["reward_margin"], np.mean(BETA * h), rtol=1e-5)
    np.testing.assert_allclose(m["accuracy"], 2 / 3, rtol=1e-5)  # rewards 0.05 > -0.02, -0.05 < 0.05, 0.02 > 0.01


def test_dpo_loss_at_zero_is_log_two_and_weights_drop_filler():
    zeros = jnp.zeros(3)
    loss, _ = dpo_loss(zeros, zeros, zeros, zeros, beta=BETA)
    np.testing.assert_allclose(loss, math.log(2), rtol=1e-7)
    loss, m = dpo_loss(*map(jnp.asarray, (PC, PR, RC, RR)), beta=BETA, weights_B=jnp.array([1.0, 0.0, 1.0]))
    h = np.array([0.7, 0.1])
    np.testing.assert_allclose(loss, np.mean(-_log_sigmoid(BETA * h)), rtol=1e-5)
    assert float(m["accuracy"]) == 1.0


def test_ipo_loss_by_hand():
    h = (PC - PR) - (RC - RR)
    loss, m = ipo_loss(*map(jnp.asarray, (PC, PR, RC, RR)), beta=BETA)
    np.testing.assert_allclose(loss, np.mean((h - 1 / (2 * BETA)) ** 2), rtol=1e-5)  # (h - 5)^2
    np.testing.assert_allclose(loss, np.mean([4.3 ** 2, 6.0 ** 2, 4.9 ** 2]), rtol=1e-5)
    np.testing.assert_allclose(m["reward_margin"], np.mean(BETA * h), rtol=1e-5)


# -- the step ------------------------------------------------------------------------------------------
PROMPT_LEN, RESPONSE_LEN = 8, 6
PAIRS = [D.TokenizedPair((2, 40, 41, 42), (50, 51, 1), (60, 1)),
         D.TokenizedPair((2, 43, 44, 45, 46, 47, 48, 49), (52, 53, 54, 55, 56, 1), (61, 62, 63, 1)),
         D.TokenizedPair((2, 70), (71, 1), (72, 73, 74, 1))]


def _batch():
    batch = batch_pairs(PAIRS, prompt_len=PROMPT_LEN, response_len=RESPONSE_LEN)
    batch["valid_B"] = np.ones(len(PAIRS), np.float32)
    return batch


def _plain_logp(model, pair, side):
    """log p(response | prompt) from the full logits of one unpadded row (no chunking, no RL layout)."""
    response = getattr(pair, side)
    tokens = jnp.asarray([pair.prompt + response], jnp.int32)
    logp = token_logprobs(model(tokens)[:, :-1], tokens[:, 1:])[0]
    return float(jnp.sum(logp[len(pair.prompt) - 1:]))


def _modules(perturb: bool):
    backbone, _ = tiny_model("llama", seed=0)
    lora.add_lora(backbone, "policy", lora.LoRAConfig(rank=4, alpha=8.0))
    if perturb:  # a trained-looking adapter: b != 0, so the policy differs from the reference
        key = jax.random.key(1)
        for _, m in lora.lora_modules(backbone):
            key, sub = jax.random.split(key)
            b = m.lora["policy"].b
            b.set_value(0.3 * jax.random.normal(sub, b.get_value().shape))
    return backbone, RLModules(backbone, policy_adapters=("policy",))


@functools.partial(jax.jit, static_argnums=(0, 4))
def _loss(graphdef, trainable, frozen, batch, loss):
    m = nnx.merge(graphdef, trainable, frozen)
    return supervised_steps.preference_loss(m, batch, beta=BETA, loss=loss)


@pytest.mark.slow
def test_step_reference_is_the_backbone_with_adapters_off():
    backbone, modules = _modules(perturb=True)
    graphdef, trainable, frozen = nnx.split(modules, policy_filter(TuningConfig(), "policy"), ...)
    loss, m = _loss(graphdef, trainable, frozen, _batch(), "dpo")
    base, policy = merging.merged_model(backbone), merging.merged_model(backbone, "policy")  # two separate models
    pol = {s: np.array([_plain_logp(policy, p, s) for p in PAIRS]) for s in ("chosen", "rejected")}
    ref = {s: np.array([_plain_logp(base, p, s) for p in PAIRS]) for s in ("chosen", "rejected")}
    assert np.all(np.abs(pol["chosen"] - ref["chosen"]) > 1e-3)  # the adapter does move the policy
    np.testing.assert_allclose(m["chosen_reward"], BETA * np.mean(pol["chosen"] - ref["chosen"]), atol=1e-5)
    np.testing.assert_allclose(m["rejected_reward"], BETA * np.mean(pol["rejected"] - ref["rejected"]), atol=1e-5)
    h = (pol["chosen"] - pol["rejected"]) - (ref["chosen"] - ref["rejected"])
    np.testing.assert_allclose(loss, np.mean(-_log_sigmoid(BETA * h)), rtol=1e-5)
    # IPO: the same four log-probs, each averaged over its response tokens
    n = {s: np.array([len(getattr(p, s)) for p in PAIRS]) for s in ("chosen", "rejected")}
    h_avg = (pol["chosen"] / n["chosen"] - pol["rejected"] / n["rejected"]) - (
        ref["chosen"] / n["chosen"] - ref["rejected"] / n["rejected"])
    loss, _ = _loss(graphdef, trainable, frozen, _batch(), "ipo")
    np.testing.assert_allclose(loss, np.mean((h_avg - 1 / (2 * BETA)) ** 2), rtol=1e-5)


@pytest.mark.parametrize("mode", ["lora", "full"])
def test_fresh_policy_equals_reference_and_one_step_lowers_the_loss(mode):
    backbone, _ = tiny_model("llama", seed=0)
    if mode == "lora":
        lora.add_lora(backbone, "policy", lora.LoRAConfig(rank=4, alpha=8.0))
        modules = RLModules(backbone, policy_adapters=("policy",))
    else:
        modules = RLModules(backbone, policy_adapters=(), anchor=tiny_model("llama", seed=0)[0])
    graphdef, trainable, frozen = nnx.split(modules, policy_filter(TuningConfig(mode=mode), "policy"), ...)
    batch = _batch()
    loss0, m0 = _loss(graphdef, trainable, frozen, batch, "dpo")
    np.testing.assert_allclose(loss0, math.log(2), rtol=1e-6)  # policy == reference: h = 0
    np.testing.assert_allclose(m0["chosen_reward"], 0.0, atol=1e-6)
    ipo0, _ = _loss(graphdef, trainable, frozen, batch, "ipo")
    np.testing.assert_allclose(ipo0, (1 / (2 * BETA)) ** 2, rtol=1e-6)

    tx = optax.adam(1e-2 if mode == "lora" else 1e-3)
    loss_fn = functools.partial(supervised_steps.preference_loss, beta=BETA, loss="dpo")
    step = jax.jit(functools.partial(supervised_steps.train_step, graphdef=graphdef, tx=tx, loss_fn=loss_fn))
    frozen_before = jax.tree.map(np.asarray, frozen)
    trainable1, _, metrics = step(trainable, tx.init(trainable), frozen, batch)
    assert float(metrics["grad_norm"]) > 0
    loss1, m1 = _loss(graphdef, trainable1, frozen, batch, "dpo")
    assert float(loss1) < float(loss0) - 1e-3, (float(loss0), float(loss1))
    assert float(m1["reward_margin"]) > 0
    # the reference did not move: its weights are frozen and read, never written
    jax.tree.map(np.testing.assert_array_equal, frozen_before, jax.tree.map(np.asarray, frozen))


# -- the job -------------------------------------------------------------------------------------------
def synthetic_pairs(n, seed=0):
    """A response ending in '!' is preferred to one ending in '.'."""
    rng = random.Random(seed)

    def text(end):
        return "".join(rng.choice("abcdefgh ") for _ in range(rng.randint(3, 8))) + end

    return D.Loaded(examples=tuple(D.PreferenceExample(f"Q{rng.randint(0, 9)}: say it", text("!"), text("."))
                                   for _ in range(n)), source="synthetic")


def _run(workdir, steps, **kw):
    return train_dpo(workdir=str(workdir), dataset=synthetic_pairs(120), model="tiny",
                     tuning=TuningConfig(mode="lora", lora=lora.LoRAConfig(rank=4, alpha=8.0)),
                     optimizer=OptimizerConfig(learning_rate=1e-2, schedule="constant"),
                     loop=LoopConfig(num_steps=steps, batch_size=8, eval_every=0, eval_batch_size=16, log_every=1,
                                     checkpoint_every=2, progress_bar=False),
                     data=DataConfig(max_prompt_len=16, max_response_len=12, eval_size=24),
                     reward_model="/ignored", **kw)


@pytest.mark.slow
def test_train_dpo_resumes_and_loads_as_a_policy(tmp_path, capsys):
    first = _run(tmp_path, 4)
    assert first["step"] == 4 and first["stage"] == "rl" and first["algorithm"] == "dpo"
    assert first["eval/pairs"] == 24
    summary = _run(tmp_path, 6)
    assert "resumed from" in capsys.readouterr().out
    rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    losses = {r["step"]: r["train/loss"] for r in rows if "train/loss" in r}
    assert sorted(losses) == [1, 2, 3, 4, 5, 6]  # each step logged once across the two calls
    np.testing.assert_allclose(losses[1], math.log(2), rtol=1e-5)  # fresh adapter: policy == reference
    assert summary["eval/accuracy"] > 0.5 and summary["eval/loss"] < math.log(2), summary

    # the workdir is a policy: load_policy merges the trained adapter into the base
    policy, tokenizer, desc = winrate.load_policy(str(tmp_path))
    assert "dpo" in desc and "step 6" in desc
    reference, _ = tiny_model("llama", seed=0)
    info = json.load(open(tmp_path / "run_info.json"))
    assert info["dpo"] == {"beta": 0.1, "loss": "dpo", "label_smoothing": 0.0}
    # its implicit rewards on the held-out pairs are the ones the run's final evaluation reported
    data = DataConfig(max_prompt_len=16, max_response_len=12, eval_size=24)
    pairs, _ = D.tokenize_preferences(synthetic_pairs(120).examples, tokenizer,
                                      D.TokenizeOptions(max_prompt_len=16, max_response_len=12))
    _, held = D.train_eval_split(list(pairs), eval_size=data.eval_size, seed=data.split_seed)
    b = batch_pairs(held, prompt_len=16, response_len=12)
    logp = {}
    for name, model in (("policy", policy), ("reference", reference)):
        for side in ("chosen", "rejected"):
            logp[name, side] = np.asarray(supervised_steps.response_sequence_logprobs(
                model, b["prompt_BxT"], b["prompt_mask_BxT"], b[f"{side}_BxN"], b[f"{side}_mask_BxN"]))
    chosen = BETA * (logp["policy", "chosen"] - logp["reference", "chosen"])
    rejected = BETA * (logp["policy", "rejected"] - logp["reference", "rejected"])
    np.testing.assert_allclose(summary["eval/chosen_reward"], chosen.mean(), atol=1e-4)
    np.testing.assert_allclose(summary["eval/accuracy"], np.mean(chosen > rejected), atol=1e-6)


def test_bad_options_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="IPO has no label smoothing"):
        _run(tmp_path, 1, loss="ipo", label_smoothing=0.1)
    with pytest.raises(ValueError, match="train_dpo.loss='kto'"):
        _run(tmp_path, 1, loss="kto")
    with pytest.raises(D.DataError, match="needs preference pairs"):
        train_dpo(workdir=str(tmp_path), dataset=D.Loaded(examples=(D.PromptResponse("a", "b"),), source="sft"))
