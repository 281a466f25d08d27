"""ReMax is unbiased and has lower variance than REINFORCE: exact expectations by enumeration.

The policy emits 2-token responses over a 3-token vocabulary (9 responses):
p(y1, y2) = softmax(first)[y1] * softmax(second[y1])[y2]. Each response has a
known reward; the greedy response takes the argmax token at each step. The
per-sample gradient estimator is the gradient of the library's
`sequence_policy_gradient_loss` for that one sample (negated), with
advantages from `remax_advantages` / `reinforce_advantages` /
`moving_average_baseline_advantages` / `rloo_advantages`. Its exact
expectation sum_y p(y) g(y) is compared with the true gradient of the expected
reward sum_y p(y) r(y) from jax.grad, in float64.
"""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from pe_rlhf import rl

FIRST = [0.4, -0.3, 0.1]
SECOND = [[0.2, 0.9, -0.5], [-0.4, 0.3, 0.6], [0.0, -0.7, 0.5]]
# rewards r(y1, y2), offset by 3 so that REINFORCE without a baseline is noisy
REWARD = [[3.2, 4.0, 2.5], [3.8, 2.0, 3.3], [4.5, 3.0, 2.8]]
RESPONSES = list(itertools.product(range(3), range(3)))


@pytest.fixture
def x64():
    with jax.enable_x64(True):
        yield


def setup():
    theta = {"first": jnp.array(FIRST, jnp.float64), "second": jnp.array(SECOND, jnp.float64)}
    reward_3x3 = jnp.array(REWARD, jnp.float64)
    y_Sx2 = jnp.array(RESPONSES)
    return theta, reward_3x3, y_Sx2


def token_logps(theta, y_2):
    """[log p(y1), log p(y2 | y1)]."""
    first = jax.nn.log_softmax(theta["first"])[y_2[0]]
    second = jax.nn.log_softmax(theta["second"][y_2[0]])[y_2[1]]
    return jnp.stack([first, second])


def probs(theta, y_Sx2):
    return jnp.exp(jax.vmap(lambda y: jnp.sum(token_logps(theta, y)))(y_Sx2))


@jax.jit
def true_gradient(theta, y_Sx2, rewards_S):
    """grad_theta of the expected reward sum_y p(y) r(y), flattened."""
    return ravel_pytree(jax.grad(lambda th: probs(th, y_Sx2) @ rewards_S)(theta))[0]


def greedy_response(theta):
    y1 = int(jnp.argmax(theta["first"]))
    return y1, int(jnp.argmax(theta["second"][y1]))


@jax.jit
def per_sample_gradients(theta, y_Sx2, advantages_S):
    """g(y) = -grad loss for the one-sample batch (y, A(y)), flattened: [S, P]."""
    def one(y_2, a):
        loss = lambda th: rl.sequence_policy_gradient_loss(a[None], token_logps(th, y_2)[None], jnp.ones((1, 2)))
        return -ravel_pytree(jax.grad(loss)(theta))[0]
    return jax.vmap(one)(y_Sx2, advantages_S)


def exact_mean_and_variance(p_S, g_SxP):
    """E[g] and the total variance E||g||^2 - ||E g||^2 of the estimator, by enumeration."""
    mean_P = p_S @ g_SxP
    return mean_P, float(p_S @ jnp.sum(g_SxP**2, axis=1) - mean_P @ mean_P)


def test_remax_expected_gradient_is_the_true_gradient_and_variance_is_lower(x64):
    theta, reward_3x3, y_Sx2 = setup()
    rewards_S = reward_3x3[y_Sx2[:, 0], y_Sx2[:, 1]]
    p_S = probs(theta, y_Sx2)
    np.testing.assert_allclose(float(jnp.sum(p_S)), 1.0, rtol=1e-12)

    true_grad = true_gradient(theta, y_Sx2, rewards_S)
    assert float(jnp.linalg.norm(true_grad)) > 0.1  # a gradient worth matching

    greedy = greedy_response(theta)
    assert greedy == (0, 1)  # argmax of FIRST, then of SECOND[0]
    greedy_rewards_S = jnp.full_like(rewards_S, reward_3x3[greedy])

    g_remax = per_sample_gradients(theta, y_Sx2, rl.remax_advantages(rewards_S, greedy_rewards_S))
    g_reinforce = per_sample_gradients(theta, y_Sx2, rl.reinforce_advantages(rewards_S))
    mean_remax, var_remax = exact_mean_and_variance(p_S, g_remax)
    mean_reinforce, var_reinforce = exact_mean_and_variance(p_S, g_reinforce)

    np.testing.assert_allclose(mean_remax, true_grad, atol=1e-6)
    np.testing.assert_allclose(mean_reinforce, true_grad, atol=1e-6)
    np.testing.assert_allclose(mean_remax, mean_reinforce, atol=1e-6)
    # ReMax's greedy baseline cuts the variance; with the +3 offset REINFORCE's is far larger
    print(f"exact estimator variance: ReMax {var_remax:.6f}, REINFORCE {var_reinforce:.6f}")
    assert var_remax < 0.5 * var_reinforce, (var_remax, var_reinforce)

    # any sample-independent baseline (here a moving average of 2.5) is unbiased too
    advantages_S, _ = rl.moving_average_baseline_advantages(rewards_S, 2.5, decay=0.9)
    mean_avg, _ = exact_mean_and_variance(p_S, per_sample_gradients(theta, y_Sx2, advantages_S))
    np.testing.assert_allclose(mean_avg, true_grad, atol=1e-6)


def test_rloo_expected_gradient_is_the_true_gradient(x64):
    """K = 2 samples per prompt: enumerate all 81 ordered pairs (y_i, y_j), probability p(y_i) p(y_j)."""
    theta, reward_3x3, y_Sx2 = setup()
    rewards_S = reward_3x3[y_Sx2[:, 0], y_Sx2[:, 1]]
    p_S = probs(theta, y_Sx2)
    true_grad = true_gradient(theta, y_Sx2, rewards_S)

    pairs = jnp.array(list(itertools.product(range(9), range(9))))  # [81, 2] indices into responses

    def batch_gradient(pair_2, advantages_fn):
        y_2x2 = y_Sx2[pair_2]
        advantages_2 = advantages_fn(rewards_S[pair_2][None, :])[0]
        loss = lambda th: rl.sequence_policy_gradient_loss(
            advantages_2, jax.vmap(lambda y: token_logps(th, y))(y_2x2), jnp.ones((2, 2)))
        return -ravel_pytree(jax.grad(loss)(theta))[0]

    p_81 = p_S[pairs[:, 0]] * p_S[pairs[:, 1]]
    g_81xP = jax.jit(jax.vmap(lambda pair: batch_gradient(pair, rl.rloo_advantages)))(pairs)
    np.testing.assert_allclose(p_81 @ g_81xP, true_grad, atol=1e-6)
    # control: centring on the group mean *including* the sample (Dr. GRPO) is biased by (K - 1) / K = 1/2
    centred = lambda r: rl.grpo_advantages(r, scale_by_std=False)
    g_81xP = jax.jit(jax.vmap(lambda pair: batch_gradient(pair, centred)))(pairs)
    np.testing.assert_allclose(p_81 @ g_81xP, 0.5 * true_grad, atol=1e-6)
