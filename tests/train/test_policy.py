"""The RL step: KL at step 0, a frozen anchor, ReMax learning and its lower variance, bad rewards."""

import string

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from pe_rlhf.models import lora
from pe_rlhf.models.tiny import tiny_model
from pe_rlhf.train.optim import OptimizerConfig, make_optimizer
from pe_rlhf.train.policy import RLConfig, RLModules, guard_nonfinite, rl_step, skipped_steps


def setup(seed=0):
    backbone, tok = tiny_model("llama", seed=seed)
    lora.add_lora(backbone, "policy", lora.LoRAConfig(rank=8, alpha=16.0, targets="all_linear"))
    graphdef, trainable, frozen = nnx.split(RLModules(backbone), lora.adapter_filter("policy"), ...)
    prompts = np.array([tok("Say a:").input_ids] * 16, np.int32)
    batch = {"prompt_BxT": jnp.asarray(prompts), "prompt_mask_BxT": jnp.ones(prompts.shape, jnp.int32)}
    lower = jnp.array([tok.convert_tokens_to_ids(c) for c in string.ascii_lowercase])

    def lowercase_fraction(prompt, prompt_mask, resp, resp_mask):
        return (jnp.isin(resp, lower) & resp_mask).sum(1) / jnp.maximum(resp_mask.sum(1), 1)

    return graphdef, trainable, frozen, batch, lowercase_fraction


def make_step(graphdef, tx, cfg, reward_fn, donate=True):
    fn = lambda tr, os, fr, st, b, r: rl_step(tr, os, fr, st, b, r, graphdef=graphdef, tx=tx, cfg=cfg,
                                              reward_fn=reward_fn, eos_ids=(1,), pad_id=0)
    return jax.jit(fn, donate_argnums=(0, 1) if donate else ())


def run(algorithm, steps, lr=3e-3, seed=0, **cfg_kw):
    graphdef, trainable, frozen, batch, reward_fn = setup()
    tx = guard_nonfinite(make_optimizer(OptimizerConfig(learning_rate=lr, schedule="constant")))
    opt = tx.init(trainable)
    cfg = RLConfig(algorithm=algorithm, max_new_tokens=8, kl_beta=0.01, **cfg_kw)
    step = make_step(graphdef, tx, cfg, reward_fn)
    state, rng, rewards = {"baseline": jnp.zeros(())}, jax.random.key(seed), []
    for _ in range(steps):
        rng, r = jax.random.split(rng)
        trainable, opt, state, m = step(trainable, opt, frozen, state, batch, r)
        rewards.append(float(m["reward_mean"]))
    return rewards, m


def test_remax_raises_the_reward_within_a_few_dozen_steps():
    rewards, metrics = run("remax", 40)
    start, end = np.mean(rewards[:5]), np.mean(rewards[-5:])
    assert end > start + 0.25, (start, end, rewards)
    assert float(metrics["kl"]) > 0  # the policy moved away from the anchor


def test_kl_is_zero_at_step_zero_and_the_anchor_never_changes():
    graphdef, trainable, frozen, batch, reward_fn = setup()
    base = nnx.merge(graphdef, trainable, frozen)
    with base.as_anchor() as anchor:
        anchor_logits_before = np.asarray(anchor(batch["prompt_BxT"]))
    frozen_before = jax.tree.map(np.asarray, frozen)
    tx = make_optimizer(OptimizerConfig(learning_rate=1e-2, schedule="constant"))
    opt = tx.init(trainable)
    step = make_step(graphdef, tx, RLConfig(algorithm="remax", max_new_tokens=8), reward_fn)
    state = {"baseline": jnp.zeros(())}
    trainable, opt, state, m0 = step(trainable, opt, frozen, state, batch, jax.random.key(0))
    # fresh adapter: policy == anchor. The policy's log-probs come from the cached decode and the
    # anchor's from a full forward, so they agree to float rounding, not bitwise.
    assert abs(float(m0["kl"])) < 1e-5 and abs(float(m0["kl_k3"])) < 1e-6
    for i in range(3):
        trainable, opt, state, m = step(trainable, opt, frozen, state, batch, jax.random.key(i + 1))
    assert float(m["kl"]) != 0.0
    model = nnx.merge(graphdef, trainable, frozen)
    with model.as_anchor() as anchor:
        np.testing.assert_array_equal(np.asarray(anchor(batch["prompt_BxT"])), anchor_logits_before)
    with model.as_policy() as policy:
        assert np.abs(np.asarray(policy(batch["prompt_BxT"])) - anchor_logits_before).max() > 1e-3
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, frozen), frozen_before)


def _gradient_samples(algorithm, n):
    """n independent gradient estimates at the same parameters (SGD with lr 1: update = -grad)."""
    graphdef, trainable, frozen, batch, reward_fn = setup()
    batch = {k: v[:4] for k, v in batch.items()}
    tx = optax.sgd(1.0)
    step = make_step(graphdef, tx, RLConfig(algorithm=algorithm, max_new_tokens=8, kl_beta=0.0), reward_fn,
                     donate=False)
    before = jnp.concatenate([x.ravel() for x in jax.tree.leaves(trainable)])
    grads = []
    for i in range(n):
        new, *_ = step(trainable, tx.init(trainable), frozen, {"baseline": jnp.zeros(())}, batch,
                       jax.random.key(100 + i))
        grads.append(np.asarray(before - jnp.concatenate([x.ravel() for x in jax.tree.leaves(new)])))
    return np.stack(grads)


def test_remax_gradient_variance_is_lower_than_reinforce():
    g_remax, g_reinforce = _gradient_samples("remax", 24), _gradient_samples("reinforce", 24)
    var_remax = g_remax.var(axis=0).sum()
    var_reinforce = g_reinforce.var(axis=0).sum()
    assert var_remax < 0.5 * var_reinforce, (var_remax, var_reinforce)
    # both estimate the same gradient: their means point the same way
    mean_r, mean_f = g_remax.mean(0), g_reinforce.mean(0)
    assert mean_r @ mean_f > 0


def test_nonfinite_reward_skips_the_step_and_training_goes_on():
    graphdef, trainable, frozen, batch, reward_fn = setup()
    calls = {"bad": True}

    def sometimes_nan(*args):
        r = reward_fn(*args)
        return r.at[0].set(jnp.nan) if calls["bad"] else r

    tx = guard_nonfinite(make_optimizer(OptimizerConfig(learning_rate=1e-2, schedule="constant")))
    cfg = RLConfig(algorithm="remax", max_new_tokens=8)
    bad_step = make_step(graphdef, tx, cfg, sometimes_nan, donate=False)
    opt = tx.init(trainable)
    state = {"baseline": jnp.zeros(())}
    new, opt, state, m = bad_step(trainable, opt, frozen, state, batch, jax.random.key(0))
    assert float(m["nonfinite_reward"]) == 1.0 and skipped_steps(opt) == 1
    jax.tree.map(np.testing.assert_array_equal, new, trainable)  # nothing moved
    calls["bad"] = False
    good_step = make_step(graphdef, tx, cfg, sometimes_nan, donate=False)
    new2, opt, state, m = good_step(new, opt, frozen, state, batch, jax.random.key(1))
    assert float(m["nonfinite_reward"]) == 0.0 and skipped_steps(opt) == 1
    assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(new2), jax.tree.leaves(new)))


@pytest.mark.parametrize("algorithm", ["rloo", "grpo"])
def test_group_algorithms_run_and_center_advantages(algorithm):
    rewards, metrics = run(algorithm, 2, samples_per_prompt=4)
    assert abs(float(metrics["advantage_mean"])) < 1e-5  # leave-one-out / group-normalised: zero mean


def test_bad_config_is_a_clear_error():
    with pytest.raises(ValueError, match="samples_per_prompt >= 2"):
        RLConfig(algorithm="rloo")
    with pytest.raises(ValueError, match="^RLConfig.algorithm='ppo2': expected one of 'remax', 'reinforce', 'rloo', "
                                         "'grpo', 'ppo'$"):
        RLConfig(algorithm="ppo2")


def test_ppo_with_a_lora_value_model_on_the_same_backbone():
    from pe_rlhf.models.heads import RewardModel

    backbone, tok = tiny_model("llama", seed=0)
    lora.add_lora(backbone, "policy", lora.LoRAConfig(rank=8, alpha=16.0, targets="all_linear"))
    lora.add_lora(backbone, "value", lora.LoRAConfig(rank=4, alpha=8.0))
    modules = RLModules(backbone, value=RewardModel(backbone, adapters=("value",)))
    trainable_filter = nnx.Any(lora.adapter_filter("policy", "value"), nnx.PathContains("head"))
    graphdef, trainable, frozen = nnx.split(modules, trainable_filter, ...)
    paths = {".".join(map(str, p)) for p, _ in nnx.to_flat_state(trainable)}
    assert "value.head.kernel" in paths and any(".lora.value." in p for p in paths)
    assert not any(p.startswith("value.backbone") for p in paths)  # one backbone, stored once under policy
    _, _, _, batch, reward_fn = setup()
    tx = make_optimizer(OptimizerConfig(learning_rate=3e-3, schedule="constant"))
    opt = tx.init(trainable)
    cfg = RLConfig(algorithm="ppo", max_new_tokens=8, ppo_epochs=2, kl_beta=0.01)
    step = make_step(graphdef, tx, cfg, reward_fn)
    state, rewards = {"baseline": jnp.zeros(())}, []
    head_before = np.asarray(modules.value.head.kernel[...])
    for i in range(25):
        trainable, opt, state, m = step(trainable, opt, frozen, state, batch, jax.random.key(i))
        rewards.append(float(m["reward_mean"]))
        assert all(np.isfinite(float(v)) for v in m.values())
    assert np.mean(rewards[-5:]) > np.mean(rewards[:5]) + 0.15, rewards
    head_after = np.asarray(nnx.merge(graphdef, trainable, frozen).value.head.kernel[...])
    assert np.abs(head_after - head_before).max() > 0


@pytest.mark.slow
def test_chunked_response_logprobs_equal_the_full_softmax():
    from pe_rlhf import rl
    from pe_rlhf.train.policy import response_logprobs

    backbone, _ = tiny_model("gemma3", seed=1)
    seq = jax.random.randint(jax.random.key(0), (3, 12), 4, 100)
    mask = jnp.ones((3, 12), bool).at[0, :2].set(False)  # a left-padded prompt
    t, tokens = 5, seq[:, 5:]  # 7 response tokens: not a multiple of the chunk

    def full(model):
        h, _ = model.hidden(seq, input_mask_BxT=mask)
        logits = model.logits(h[:, t - 1:-1])
        return rl.token_logprobs(logits, tokens), rl.token_entropy(logits)

    (lp_full, ent_full), (lp, ent) = full(backbone), response_logprobs(backbone, seq, mask, t, tokens, chunk=3)
    np.testing.assert_allclose(np.asarray(lp), np.asarray(lp_full), atol=2e-5)
    np.testing.assert_allclose(np.asarray(ent), np.asarray(ent_full), atol=2e-5)
    g_full = nnx.grad(lambda m: full(m)[0].sum())(backbone)
    g = nnx.grad(lambda m: response_logprobs(m, seq, mask, t, tokens, chunk=3)[0].sum())(backbone)
    for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g_full)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-5, rtol=1e-4)


def test_one_rollout_holds_the_samples_then_the_greedy_rows():
    from pe_rlhf.sampling.sampler import SamplingConfig
    from pe_rlhf.train.rollout import rollout

    graphdef, trainable, frozen, batch, reward_fn = setup()
    prompts, mask = batch["prompt_BxT"][:3], batch["prompt_mask_BxT"][:3].at[1, 0].set(0)
    m = nnx.merge(graphdef, trainable, frozen)
    kw = dict(reward_fn=reward_fn, eos_ids=(1,), pad_id=0)
    ro = rollout(m, prompts, mask, jax.random.key(0), SamplingConfig(max_new_tokens=6), samples_per_prompt=2,
                 greedy=True, **kw)
    assert ro.tokens_BxN.shape == (9, 6) and ro.num_sampled == 6
    np.testing.assert_array_equal(np.asarray(ro.greedy_B), [False] * 6 + [True] * 3)
    np.testing.assert_array_equal(np.asarray(ro.prompt_BxT), np.concatenate([np.repeat(prompts, 2, 0), prompts]))
    np.testing.assert_array_equal(np.asarray(ro.prompt_mask_BxT)[[2, 3, 7]], np.asarray(mask, bool)[[1, 1, 1]])
    np.testing.assert_array_equal(np.asarray(ro.rewards_B),
                                  np.asarray(reward_fn(ro.prompt_BxT, ro.prompt_mask_BxT, ro.tokens_BxN, ro.mask_BxN)))
    sampled, greedy = ro.split()
    np.testing.assert_array_equal(np.asarray(sampled.tokens_BxN), np.asarray(ro.tokens_BxN)[:6])
    assert not np.asarray(sampled.greedy_B).any() and np.asarray(greedy.greedy_B).all()
    # the greedy rows are what a temperature-0 rollout of the same prompts decodes
    alone = rollout(m, prompts, mask, jax.random.key(1), SamplingConfig(max_new_tokens=6, temperature=0.0), **kw)
    np.testing.assert_array_equal(np.asarray(greedy.tokens_BxN), np.asarray(alone.tokens_BxN))
    assert alone.split()[1] is None and alone.ref_logprobs_BxN is None


def test_an_estimator_added_to_the_registry_is_an_algorithm(monkeypatch):
    from pe_rlhf import rl

    def zero_estimate(scores, cfg, baseline):
        return jnp.zeros_like(scores.sampled_S), jnp.zeros(()), baseline

    with pytest.raises(ValueError, match="expected one of 'remax', 'reinforce', 'rloo', 'grpo', 'ppo'"):
        RLConfig(algorithm="zero")
    monkeypatch.setitem(rl.ADVANTAGES, "zero", rl.Estimator(zero_estimate))
    graphdef, trainable, frozen, batch, reward_fn = setup()
    tx = optax.sgd(1.0)
    step = make_step(graphdef, tx, RLConfig(algorithm="zero", max_new_tokens=4), reward_fn, donate=False)
    new, _, _, m = step(trainable, tx.init(trainable), frozen, {"baseline": jnp.zeros(())}, batch, jax.random.key(0))
    assert float(m["advantage_std"]) == 0.0 and float(m["grad_norm"]) == 0.0 and float(m["reward_mean"]) > 0
    jax.tree.map(np.testing.assert_array_equal, new, trainable)  # no advantage, no update
