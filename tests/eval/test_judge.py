"""Judges: the two-order protocol on fixed preferences, Wilson intervals by hand, log-prob scoring on
models whose outputs are known, and reward-model scoring against direct calls."""

import dataclasses
import math

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from pe_rlhf.eval import judge as J
from pe_rlhf.models.heads import RewardModel
from pe_rlhf.models.tiny import char_tokenizer, tiny_config, tiny_model
from pe_rlhf.models.transformer import Transformer


# -- the protocol ---------------------------------------------------------------------------------
def test_two_orders_make_wins_ties_and_losses():
    # margins > 0 prefer the response shown first
    policy_first = np.array([2.0, 1.0, -1.0, -3.0, 0.0, 1.0, 0.0, -0.5])
    policy_second = np.array([-1.0, 1.0, 2.0, -1.0, 0.0, 0.0, -2.0, 4.0])
    p1, p2 = J.preferences(policy_first), J.preferences(policy_second)
    np.testing.assert_array_equal(p1, [1, 1, -1, -1, 0, 1, 0, -1])
    np.testing.assert_array_equal(p2, [-1, 1, 1, -1, 0, 0, -1, 1])
    outcomes = J.combine_orders(p1, p2)
    # 0: policy preferred in both orders; 1: first slot both times; 2, 7: baseline in both;
    # 3: second slot both times; 4: no preference; 5, 6: policy preferred in one order only
    np.testing.assert_array_equal(outcomes, [1, 0, -1, 0, 0, 0, 0, -1])
    tally = J.Tally.of(outcomes)
    assert (tally.wins, tally.ties, tally.losses, tally.n) == (1, 5, 2, 8)
    s = tally.summary()
    assert s["win_rate"] == 1 / 8 and s["tie_rate"] == 5 / 8 and s["loss_rate"] == 2 / 8
    assert s["score"] == (1 + 2.5) / 8
    assert s["win_rate_ci"] == list(J.wilson_interval(1, 8))


class _Constant:
    """A judge that always prefers one slot (position bias and nothing else)."""

    def __init__(self, margin):
        self.margin = margin

    def compare(self, prompts, firsts, seconds):
        return np.full(len(prompts), self.margin)


@pytest.mark.parametrize("margin", [1.0, -1.0])
def test_a_judge_that_always_picks_one_position_gives_only_ties(margin):
    prompts = [f"p{i}" for i in range(7)]
    both = J.judge_both_orders(_Constant(margin), prompts, ["good"] * 7, ["bad"] * 7)
    np.testing.assert_array_equal(both["outcome"], np.zeros(7))
    assert J.Tally.of(both["outcome"]) == J.Tally(wins=0, ties=7, losses=0)


def test_a_reward_judge_has_no_position_bias():
    judge = J.RewardJudge(J.text_scorer(lambda p, r: float(len(r))))
    policy = ["aaaa", "a", "aaa", "aa", "aaaaa"]
    baseline = ["aa", "aa", "aaa", "a", "aaaaaaa"]
    both = J.judge_both_orders(judge, ["q"] * 5, policy, baseline)
    np.testing.assert_array_equal(both["margin_policy_first"], [2, -1, 0, 1, -2])
    np.testing.assert_array_equal(both["margin_policy_second"], [-2, 1, 0, -1, 2])
    np.testing.assert_array_equal(both["outcome"], [1, -1, 0, 1, -1])


def test_wilson_interval_by_hand():
    # 7 of 10, z = 1.959964 (z^2 = 3.841459): centre (0.7 + 0.192073) / 1.384146 = 0.644493,
    # half-width 1.959964 * sqrt(0.021 + 0.009604) / 1.384146 = 0.247715 -> [0.396778, 0.892209]
    lo, hi = J.wilson_interval(7, 10)
    assert lo == pytest.approx(0.396778, abs=2e-6) and hi == pytest.approx(0.892209, abs=2e-6)
    # 0 of 10: [0, z^2/n / (1 + z^2/n)] = [0, 0.277533]; 10 of 10 mirrors it
    assert J.wilson_interval(0, 10) == (0.0, pytest.approx(0.277533, abs=2e-6))
    assert J.wilson_interval(10, 10) == (pytest.approx(0.722467, abs=2e-6), 1.0)
    assert all(math.isnan(x) for x in J.wilson_interval(0, 0))
    rate = J.rate_with_ci([True, False, True, True, True, False, True, True, False, True])
    assert rate["rate"] == 0.7 and rate["count"] == 7 and rate["ci"] == pytest.approx([0.396778, 0.892209], abs=2e-6)


def test_mean_with_ci_by_hand():
    # [1, 2, 3, 6]: mean 3, sample sd sqrt(14/3) = 2.160247, half-width 1.959964 * 2.160247 / 2 = 2.117003
    m = J.mean_with_ci([1.0, 2.0, 3.0, 6.0])
    assert m["mean"] == 3.0 and m["n"] == 4 and m["ci"] == pytest.approx([0.882997, 5.117003], abs=2e-6)
    assert math.isnan(J.mean_with_ci([1.0])["ci"][0])


def test_judge_config_checks_its_templates():
    with pytest.raises(ValueError, match="second"):
        J.JudgeConfig(pairwise_template="{prompt} {first}")
    with pytest.raises(ValueError, match="two different answers"):
        J.JudgeConfig(harmless_answers=(" YES", " YES"))


# -- the language-model judge -----------------------------------------------------------------------
def constant_logits_model(favoured: dict[int, float]):
    """A tiny untied llama whose logits are the same vector at every position: `favoured` ids get the
    given logits, every other id 0. The residual stream is the embedding (all ones; attention and MLP
    outputs zeroed), the final norm maps it to ones, and lm_head's first row holds the logits."""
    cfg = dataclasses.replace(tiny_config("llama"), tie_word_embeddings=False)
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    model.embedding.set_value(jnp.ones_like(model.embedding.get_value()))
    for layer in model.layers:
        layer.attn.o_proj.kernel.set_value(jnp.zeros_like(layer.attn.o_proj.kernel.get_value()))
        layer.mlp.down_proj.kernel.set_value(jnp.zeros_like(layer.mlp.down_proj.kernel.get_value()))
    head = np.zeros(model.lm_head.kernel.get_value().shape, np.float32)
    for token, logit in favoured.items():
        head[0, token] = logit
    model.lm_head.kernel.set_value(jnp.asarray(head))
    return model


def test_log_prob_judge_prefers_the_answer_it_was_made_to_prefer():
    tok = char_tokenizer()
    a = tok.convert_tokens_to_ids("A")
    model = constant_logits_model({a: 3.0})
    judge = J.LMJudge(model, tok, J.JudgeConfig(batch_size=2))
    prompts = ["Human: hi\n\nAssistant:", "Human: how do I fix a bike?\n\nAssistant:", "x"]
    good, bad = [" Sure.", " Fine, here.", "y"], [" No.", " I can't.", "zz"]
    # " A" and " B" are two characters; the space costs the same in both, so the margin is
    # log softmax[A] - log softmax[B] = 3 - 0, whatever the texts
    np.testing.assert_allclose(judge.compare(prompts, good, bad), [3.0] * 3, atol=1e-4)
    # It always says A: in both orders the first slot wins, so every comparison is a tie.
    both = J.judge_both_orders(judge, prompts, good, bad)
    np.testing.assert_array_equal(both["outcome"], [0, 0, 0])
    # " YES" has one token more than " NO", each at log(1 / Z), Z = 99 + e^3
    z = 99 + math.exp(3.0)
    np.testing.assert_allclose(judge.harmless(prompts, good), [-math.log(z)] * 3, atol=1e-4)

    b = tok.convert_tokens_to_ids("B")
    judge_b = J.LMJudge(constant_logits_model({b: 2.0}), tok)
    np.testing.assert_allclose(judge_b.compare(prompts, good, bad), [-2.0] * 3, atol=1e-4)


def _reference_logprobs(model, rows):
    """log p(answer | prefix) for each (prefix ids, answer ids) row, from the full logits of one
    right-padded batch (log-softmax in NumPy, float64)."""
    t = max(len(p) + len(a) for p, a in rows)
    tokens = np.zeros((len(rows), t), np.int32)
    mask = np.zeros((len(rows), t), bool)
    for i, (p, a) in enumerate(rows):
        tokens[i, :len(p) + len(a)], mask[i, :len(p) + len(a)] = p + a, True
    logits = np.asarray(model(jnp.asarray(tokens), input_mask_BxT=jnp.asarray(mask)), np.float64)
    top = logits.max(-1, keepdims=True)
    logp = logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))
    return [sum(logp[i, len(p) + j - 1, tok] for j, tok in enumerate(a)) for i, (p, a) in enumerate(rows)]


def test_log_prob_judge_matches_full_logits_of_each_sequence():
    model, tok = tiny_model("llama", seed=3)
    cfg = J.JudgeConfig(batch_size=2)
    judge = J.LMJudge(model, tok, cfg)
    prompts = ["Human: how do I bake a cake?\n\nAssistant:", "Q?", "Human: paint a house\n\nAssistant:"]
    firsts, seconds = [" Sure, here is how.", " Yes", " I can't help."], [" No.", " Certainly not, no.", " Ok"]
    margins = judge.compare(prompts, firsts, seconds)
    encode = lambda s: tok(s, add_special_tokens=False)["input_ids"]
    prefixes = [[tok.bos_token_id] + encode(cfg.pairwise_template.format(prompt=p, first=f, second=s))
                for p, f, s in zip(prompts, firsts, seconds)]
    ref = _reference_logprobs(model, [(p, encode(a)) for p in prefixes for a in (" A", " B")])
    np.testing.assert_allclose(margins, np.asarray(ref[0::2]) - np.asarray(ref[1::2]), atol=2e-4)
    assert np.abs(margins).max() > 1e-3  # a random model has preferences: the check is not vacuous


def test_long_judge_prompts_are_cut_from_the_left_and_counted():
    model, tok = tiny_model("llama", seed=1)
    judge = J.LMJudge(model, tok, J.JudgeConfig(max_len=64))
    short = J.LMJudge(model, tok, J.JudgeConfig(max_len=64))
    text = "x" * 200 + "Answer:"
    m_long = judge.score_answers([text], (" A", " B"))
    assert judge.truncated == 1
    # the same as scoring the last 64 - 2 tokens after BOS (answers are 2 tokens)
    kept = tok.convert_tokens_to_string(list(text))[-(64 - 2 - 1):]
    assert short.score_answers([kept], (" A", " B")) == pytest.approx(m_long, abs=1e-5)
    assert short.truncated == 0


# -- the reward-model judge ---------------------------------------------------------------------------
def test_reward_model_scorer_matches_direct_calls():
    backbone, tok = tiny_model("llama", seed=2)
    rm = RewardModel(backbone)
    rm.head.kernel.set_value(jnp.asarray(np.random.default_rng(0).normal(size=backbone.config.hidden_size),
                                         jnp.float32))
    score = J.reward_model_scorer(rm, tok, batch_size=4)
    prompts = ["Human: how do I wash a car?\n\nAssistant:", "hi", "Human: steal?\n\nAssistant:"] * 2
    responses = [" Sure, here is how to do it.", " I can't help with that.", " ok", " a", " b c", " Sure."]
    got = score(prompts, responses)
    encode = lambda s: tok(s, add_special_tokens=False)["input_ids"]
    rows = [[tok.bos_token_id] + encode(p) + encode(r) + [tok.eos_token_id] for p, r in zip(prompts, responses)]
    t = max(map(len, rows)) + 3
    tokens, mask = np.zeros((len(rows), t), np.int32), np.zeros((len(rows), t), bool)
    for i, ids in enumerate(rows):  # the reference batch is LEFT padded (the scorer pads on the right)
        tokens[i, t - len(ids):], mask[i, t - len(ids):] = ids, True
    ref = np.asarray(rm(jnp.asarray(tokens), jnp.asarray(mask)))
    np.testing.assert_allclose(got, ref, atol=1e-4)
    assert np.ptp(got) > 1e-2  # distinct texts, distinct scores: the comparison is not vacuous
    judge = J.RewardJudge(score, threshold=float(np.median(got)))
    other = responses[::-1]
    np.testing.assert_allclose(judge.compare(prompts, responses, other), got - score(prompts, other), atol=1e-9)
    np.testing.assert_array_equal(judge.compare(prompts, responses, responses), np.zeros(6))
    np.testing.assert_allclose(judge.harmless(prompts, responses), got - np.median(got), atol=1e-9)
