"""Masked reductions, policy-gradient and PPO losses, log-probs and entropy on hand-computed arrays."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pe_rlhf import rl

NAN, INF = float("nan"), float("inf")


def test_masked_reductions_skip_padding_even_nan():
    x = jnp.array([[1.0, 2.0, NAN], [4.0, INF, 6.0]])
    mask = jnp.array([[1, 1, 0], [1, 0, 1]])
    np.testing.assert_allclose(rl.masked_sum(x, mask), 13.0)
    np.testing.assert_allclose(rl.masked_mean(x, mask), 3.25)
    np.testing.assert_allclose(rl.masked_sum(x, mask, axis=1), [3.0, 10.0])
    np.testing.assert_allclose(rl.masked_mean(x, mask, axis=1), [1.5, 5.0])
    np.testing.assert_allclose(rl.masked_count(x, mask), 4.0)
    # values 1, 2, 4, 6: mean 3.25, squared deviations 5.0625 + 1.5625 + 0.5625 + 7.5625 = 14.75
    np.testing.assert_allclose(rl.masked_var(x, mask), 14.75 / 4, rtol=1e-6)
    np.testing.assert_allclose(rl.masked_var(x, mask, axis=1), [0.25, 1.0], rtol=1e-6)
    assert float(rl.masked_mean(x, jnp.zeros_like(mask))) == 0.0


def test_masked_whiten_by_hand():
    x = jnp.array([[1.0, 2.0, NAN], [4.0, INF, 6.0]])
    mask = jnp.array([[1, 1, 0], [1, 0, 1]])
    # (v - 3.25) / sqrt(3.6875 + 1e-8)
    want = [[-1.1717002, -0.6509446, 0.0], [0.3905667, 0.0, 1.4320780]]
    np.testing.assert_allclose(rl.masked_whiten(x, mask), want, rtol=1e-6, atol=1e-7)
    want_scaled = [[2.0782998, 2.5990554, 0.0], [3.6405667, 0.0, 4.6820780]]
    np.testing.assert_allclose(rl.masked_whiten(x, mask, shift_mean=False), want_scaled, rtol=1e-6)


ADV_B = jnp.array([2.0, -1.0])
LOGPS = jnp.array([[-1.0, -2.0, -9.0], [-0.5, -0.25, -3.0]])
MASK = jnp.array([[1, 1, 0], [1, 1, 1]])


def test_sequence_policy_gradient_loss_by_hand():
    # row sums of real log-probs: -3, -3.75; A * sum: -6, 3.75; loss = -mean = 1.125
    np.testing.assert_allclose(rl.sequence_policy_gradient_loss(ADV_B, LOGPS, MASK), 1.125, rtol=1e-6)
    grad = jax.grad(lambda lp: rl.sequence_policy_gradient_loss(ADV_B, lp, MASK))(LOGPS)
    np.testing.assert_allclose(grad, [[-1.0, -1.0, 0.0], [0.5, 0.5, 0.5]], rtol=1e-6)
    # per-token advantages: -( (1*-1 + 2*-2) + (0*-.5 + 1*-.25 + 1*-3) ) / 2
    adv_BxN = jnp.array([[1.0, 2.0, 3.0], [0.0, 1.0, 1.0]])
    np.testing.assert_allclose(rl.sequence_policy_gradient_loss(adv_BxN, LOGPS, MASK), 4.125, rtol=1e-6)
    # -inf log-probs in padding do not leak into the value or the gradient
    padded = LOGPS.at[0, 2].set(-INF)
    np.testing.assert_allclose(rl.sequence_policy_gradient_loss(ADV_B, padded, MASK), 1.125, rtol=1e-6)
    assert np.all(np.isfinite(jax.grad(lambda lp: rl.sequence_policy_gradient_loss(ADV_B, lp, MASK))(padded)))
    # advantages are constants: no gradient through them
    np.testing.assert_array_equal(
        jax.grad(lambda a: rl.sequence_policy_gradient_loss(a, LOGPS, MASK))(ADV_B), [0.0, 0.0])
    with pytest.raises(ValueError, match=r"advantages must have shape \[B\] or \[B, N\]"):
        rl.sequence_policy_gradient_loss(jnp.ones(3), LOGPS, MASK)


def test_token_mean_policy_gradient_loss_by_hand():
    # sum of A * logp over 5 real tokens: 2*(-1) + 2*(-2) + (-1)*(-.5 - .25 - 3) = -2.25; loss = 2.25 / 5
    np.testing.assert_allclose(rl.token_mean_policy_gradient_loss(ADV_B, LOGPS, MASK), 0.45, rtol=1e-6)
    grad = jax.grad(lambda lp: rl.token_mean_policy_gradient_loss(ADV_B, lp, MASK))(LOGPS)
    np.testing.assert_allclose(grad, [[-0.4, -0.4, 0.0], [0.2, 0.2, 0.2]], rtol=1e-6)
    np.testing.assert_allclose(rl.token_mean_policy_gradient_loss(ADV_B[:, None], LOGPS, MASK), 0.45, rtol=1e-6)


def _ppo_case():
    # ratios 1.5, 0.5, 1.5, 0.5, 1.1 (and padding) with advantages +1, +1, -1, -1, +2
    ratio = jnp.array([[1.5, 0.5, 1.5, 0.5, 1.1, 7.0]])
    old = jnp.full((1, 6), -1.0)
    logps = jnp.log(ratio) + old
    adv = jnp.array([[1.0, 1.0, -1.0, -1.0, 2.0, 5.0]])
    mask = jnp.array([[1, 1, 1, 1, 1, 0]])
    return adv, logps, old, mask


def test_ppo_clipped_policy_loss_by_hand():
    adv, logps, old, mask = _ppo_case()
    # min(r A, clip(r, .8, 1.2) A): 1.2, 0.5, -1.5, -0.8, 2.2 -> mean 0.32, loss -0.32
    np.testing.assert_allclose(rl.ppo_clipped_policy_loss(adv, logps, old, mask), -0.32, rtol=1e-5)
    # gradient d(r A)/dlogp = r A where the unclipped term is active, 0 where clipped; divided by -5
    grad = jax.grad(lambda lp: rl.ppo_clipped_policy_loss(adv, lp, old, mask))(logps)
    np.testing.assert_allclose(grad, [[0.0, -0.1, 0.3, 0.0, -0.44, 0.0]], rtol=1e-5, atol=1e-7)
    # clipped term active (strictly smaller) on tokens 0 and 3
    np.testing.assert_allclose(rl.ppo_clip_fraction(adv, logps, old, mask), 0.4, rtol=1e-6)
    # a wider clip range leaves only the plain surrogate: mean(1.5, .5, -1.5, -.5, 2.2) = 0.44
    np.testing.assert_allclose(rl.ppo_clipped_policy_loss(adv, logps, old, mask, clip_epsilon=0.6), -0.44,
                               rtol=1e-5)
    assert rl.PPOOptions() == rl.PPOOptions(clip_epsilon=0.2, value_clip_epsilon=0.2, gamma=1.0, lam=0.95)


def test_ppo_clipped_value_loss_by_hand():
    values = jnp.array([[1.0, 0.6, 0.0, 9.0]])
    old = jnp.array([[0.5, 0.5, 0.5, 0.0]])
    returns = jnp.array([[1.0, 0.0, 1.0, 0.0]])
    mask = jnp.array([[1, 1, 1, 0]])
    # token 0: max(0, (0.7 - 1)^2) = .09; token 1: max(.36, .36); token 2: max(1, (0.3 - 1)^2) = 1
    np.testing.assert_allclose(rl.ppo_clipped_value_loss(values, old, returns, mask), 0.5 * 1.45 / 3, rtol=1e-6)
    # gradient: token 0 is clipped (0), token 1: (v - R) / 3 = 0.2, token 2: (v - R) / 3 = -1/3
    grad = jax.grad(lambda v: rl.ppo_clipped_value_loss(v, old, returns, mask))(values)
    np.testing.assert_allclose(grad, [[0.0, 0.2, -1 / 3, 0.0]], rtol=1e-6, atol=1e-7)


def test_token_logprobs_and_entropy_by_hand():
    log3 = math.log(3.0)
    logits = jnp.array([[[0.0, 0.0, 0.0, 0.0], [0.0, log3, -INF, -INF], [NAN, NAN, NAN, NAN]]])
    # uniform over 4: log 4; (1/4, 3/4): -(.25 log .25 + .75 log .75)
    np.testing.assert_allclose(rl.token_entropy(logits)[0, :2], [1.3862944, 0.5623351], rtol=1e-6)
    mask = jnp.array([[1, 1, 0]])
    np.testing.assert_allclose(rl.masked_entropy(logits, mask), (1.3862944 + 0.5623351) / 2, rtol=1e-6)
    finite = logits.at[0, 2].set(0.0)
    assert np.all(np.isfinite(jax.grad(lambda lg: rl.masked_entropy(lg, mask))(finite)))
    logps = rl.token_logprobs(logits[:, :2], jnp.array([[2, 1]]))
    np.testing.assert_allclose(logps, [[-1.3862944, -0.2876821]], rtol=1e-6)
    assert logps.dtype == jnp.float32
    assert rl.token_logprobs(logits[:, :2].astype(jnp.bfloat16), jnp.array([[2, 1]])).dtype == jnp.float32
