"""Advantages on small hand-computed arrays; GAE against a slow Python loop."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pe_rlhf import rl

NAN, INF = float("nan"), float("inf")


def test_reinforce_and_remax_by_hand():
    np.testing.assert_allclose(rl.reinforce_advantages(jnp.array([1.5, -0.5, 2.0])), [1.5, -0.5, 2.0])
    adv = rl.remax_advantages(jnp.array([1.5, -0.5, 2.0]), jnp.array([1.0, 0.5, 2.0]))
    np.testing.assert_allclose(adv, [0.5, -1.0, 0.0], atol=1e-7)


def test_moving_average_baseline_two_steps():
    # step 1: baseline 0 -> advantages = rewards; new = 0.9 * 0 + 0.1 * mean(1, 3) = 0.2
    adv, baseline = rl.moving_average_baseline_advantages(jnp.array([1.0, 3.0]), 0.0, decay=0.9)
    np.testing.assert_allclose(adv, [1.0, 3.0])
    np.testing.assert_allclose(baseline, 0.2, rtol=1e-6)
    # step 2: advantages use the old baseline 0.2; new = 0.9 * 0.2 + 0.1 * 0.5 = 0.23
    adv, baseline = rl.moving_average_baseline_advantages(jnp.array([0.0, 1.0]), baseline, decay=0.9)
    np.testing.assert_allclose(adv, [-0.2, 0.8], rtol=1e-6)
    np.testing.assert_allclose(baseline, 0.23, rtol=1e-6)
    with pytest.raises(ValueError, match="decay must be in"):
        rl.moving_average_baseline_advantages(jnp.array([1.0]), 0.0, decay=1.5)


def test_rloo_by_hand():
    adv = rl.rloo_advantages(jnp.array([[1.0, 2.0, 6.0], [0.0, 0.0, 3.0]]))
    # 1 - (2+6)/2, 2 - (1+6)/2, 6 - (1+2)/2 ; 0 - 1.5, 0 - 1.5, 3 - 0
    np.testing.assert_allclose(adv, [[-3.0, -1.5, 4.5], [-1.5, -1.5, 3.0]], atol=1e-6)
    with pytest.raises(ValueError, match="K >= 2"):
        rl.rloo_advantages(jnp.ones((3, 1)))
    with pytest.raises(ValueError, match=r"shape \[B, K\]"):
        rl.rloo_advantages(jnp.ones((6,)))


def test_grpo_by_hand():
    # mean 3, centred (-2, -1, 3), sample variance (4 + 1 + 9) / 2 = 7
    adv = rl.grpo_advantages(jnp.array([[1.0, 2.0, 6.0], [2.0, 2.0, 2.0]]))
    np.testing.assert_allclose(adv[0], [-0.7559287, -0.3779643, 1.1338930], rtol=1e-6)
    np.testing.assert_array_equal(adv[1], [0.0, 0.0, 0.0])  # equal rewards: epsilon keeps it finite
    # K = 2: sample std of (0, 1) is sqrt(0.5)
    np.testing.assert_allclose(rl.grpo_advantages(jnp.array([[0.0, 1.0]])), [[-0.7071058, 0.7071058]], rtol=1e-6)
    np.testing.assert_allclose(rl.grpo_advantages(jnp.array([[0.0, 1.0]]), epsilon=1.0),
                               [[-0.2928932, 0.2928932]], rtol=1e-6)
    np.testing.assert_allclose(rl.grpo_advantages(jnp.array([[1.0, 2.0, 6.0]]), scale_by_std=False),
                               [[-2.0, -1.0, 3.0]], atol=1e-6)
    # GRPOOptions holds grpo_advantages's options: its fields are the keywords, its defaults the function's
    rewards = jnp.array([[1.0, 2.0, 6.0], [0.0, 1.0, 1.0]])
    np.testing.assert_array_equal(rl.grpo_advantages(rewards, **dataclasses.asdict(rl.GRPOOptions())),
                                  rl.grpo_advantages(rewards))
    dr_grpo = dataclasses.asdict(rl.GRPOOptions(scale_by_std=False))
    np.testing.assert_allclose(rl.grpo_advantages(rewards, **dr_grpo), [[-2.0, -1.0, 3.0], [-2 / 3, 1 / 3, 1 / 3]],
                               rtol=1e-6)
    jitted = jax.jit(rl.grpo_advantages, static_argnames="scale_by_std")
    np.testing.assert_allclose(jitted(jnp.array([[0.0, 1.0]])), [[-0.7071058, 0.7071058]], rtol=1e-6)


def test_gae_by_hand():
    rewards, values, mask = jnp.array([[0.0, 0.0, 1.0]]), jnp.array([[0.5, 0.6, 0.7]]), jnp.ones((1, 3))
    # gamma 1, lam .95: deltas (0.1, 0.1, 0.3); A2 = .3, A1 = .1 + .95 * .3, A0 = .1 + .95 * .385
    adv, ret = rl.gae_advantages(rewards, values, mask, gamma=1.0, lam=0.95)
    np.testing.assert_allclose(adv, [[0.46575, 0.385, 0.3]], rtol=1e-6)
    np.testing.assert_allclose(ret, [[0.96575, 0.985, 1.0]], rtol=1e-6)
    # gamma .9, lam .5: deltas (.9*.6-.5, .9*.7-.6, 1-.7) = (.04, .03, .3); A1 = .03 + .45*.3, A0 = .04 + .45*.165
    adv, ret = rl.gae_advantages(rewards, values, mask, gamma=0.9, lam=0.5)
    np.testing.assert_allclose(adv, [[0.11425, 0.165, 0.3]], rtol=1e-6)
    np.testing.assert_allclose(ret, [[0.61425, 0.765, 1.0]], rtol=1e-6)


def test_gae_ignores_padding_right_and_left():
    rewards = jnp.array([[0.0, 1.0, 99.0], [99.0, 0.0, 1.0]])
    values = jnp.array([[0.5, 0.7, 99.0], [99.0, 0.5, 0.7]])
    mask = jnp.array([[1, 1, 0], [0, 1, 1]])
    adv, ret = rl.gae_advantages(rewards, values, mask, gamma=1.0, lam=0.95)
    # deltas (.2, .3), A = (.2 + .95 * .3, .3)
    np.testing.assert_allclose(adv, [[0.485, 0.3, 0.0], [0.0, 0.485, 0.3]], rtol=1e-6)
    np.testing.assert_allclose(ret, [[0.985, 1.0, 0.0], [0.0, 0.985, 1.0]], rtol=1e-6)


def slow_gae(rewards, values, mask, gamma, lam):
    """Textbook GAE over each row's real tokens only, then scattered back (float64 NumPy)."""
    adv = np.zeros_like(rewards)
    for b in range(rewards.shape[0]):
        idx = [t for t in range(rewards.shape[1]) if mask[b, t]]
        last = 0.0
        for i in reversed(range(len(idx))):
            next_value = values[b, idx[i + 1]] if i + 1 < len(idx) else 0.0
            delta = rewards[b, idx[i]] + gamma * next_value - values[b, idx[i]]
            last = delta + gamma * lam * last
            adv[b, idx[i]] = last
    return adv, np.where(mask, adv + values, 0.0)


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.9, 0.7), (0.99, 1.0), (1.0, 0.0)])
def test_gae_matches_slow_loop(gamma, lam):
    rng = np.random.default_rng(0)
    rewards = rng.normal(size=(5, 7))
    values = rng.normal(size=(5, 7))
    mask = np.array([
        [1, 1, 1, 1, 1, 1, 1],  # full
        [1, 1, 1, 1, 0, 0, 0],  # right padding
        [0, 0, 1, 1, 1, 1, 1],  # left padding
        [1, 0, 1, 1, 0, 1, 0],  # holes
        [0, 0, 0, 0, 0, 0, 0],  # empty
    ])
    want_adv, want_ret = slow_gae(rewards, values, mask, gamma, lam)
    adv, ret = rl.gae_advantages(jnp.asarray(rewards, jnp.float32), jnp.asarray(values, jnp.float32), mask,
                                 gamma=gamma, lam=lam)
    np.testing.assert_allclose(adv, want_adv, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(ret, want_ret, rtol=1e-5, atol=1e-5)
    adv_jit, _ = jax.jit(rl.gae_advantages)(jnp.asarray(rewards, jnp.float32), jnp.asarray(values, jnp.float32),
                                            mask, gamma=gamma, lam=lam)
    np.testing.assert_allclose(adv_jit, want_adv, rtol=1e-5, atol=1e-5)


def test_discounted_returns_by_hand():
    token_rewards = jnp.array([[0.1, -0.2, 1.0, 5.0]])
    mask = jnp.array([[1, 1, 1, 0]])
    np.testing.assert_allclose(rl.discounted_returns(token_rewards, mask), [[0.9, 0.8, 1.0, 0.0]], rtol=1e-6)
    # gamma .5: G2 = 1, G1 = -.2 + .5 * 1 = .3, G0 = .1 + .5 * .3 = .25
    np.testing.assert_allclose(rl.discounted_returns(token_rewards, mask, gamma=0.5), [[0.25, 0.3, 1.0, 0.0]],
                               rtol=1e-6)


def test_nonfinite_rows():
    bad = rl.nonfinite_rows(jnp.array([[1.0, NAN], [2.0, 3.0], [INF, 0.0], [-INF, 1.0]]))
    np.testing.assert_array_equal(bad, [True, False, True, True])
    np.testing.assert_array_equal(rl.nonfinite_rows(jnp.array([1.0, NAN, 2.0])), [False, True, False])
    assert int(jnp.sum(rl.nonfinite_rows(jnp.array([1.0, NAN, INF])))) == 2
    with pytest.raises(ValueError, match=r"shape \[B, \.\.\.\]"):
        rl.nonfinite_rows(jnp.array(1.0))
