"""KL estimators, the KL-penalised token rewards and the KL loss term, by hand and by enumeration."""

import jax
import jax.numpy as jnp
import numpy as np

from pe_rlhf import rl

INF = float("inf")
LOGP = jnp.array([[-1.0, -2.0, -0.5]])
REF = jnp.array([[-1.5, -1.0, -0.5]])  # logp - ref = (0.5, -1, 0)


def test_estimators_by_hand():
    np.testing.assert_allclose(rl.kl_k1(LOGP, REF), [[0.5, -1.0, 0.0]], atol=1e-7)
    np.testing.assert_allclose(rl.kl_k2(LOGP, REF), [[0.125, 0.5, 0.0]], atol=1e-7)
    # ref - logp = (-0.5, 1, 0): exp(-0.5) + 0.5 - 1, e - 1 - 1, 0
    np.testing.assert_allclose(rl.kl_k3(LOGP, REF), [[0.1065307, 0.7182818, 0.0]], rtol=1e-6, atol=1e-7)


def test_k1_and_k3_average_to_the_exact_kl():
    """Under tokens drawn from p, E_p[k1] = E_p[k3] = KL(p || q) = sum_v p log(p / q)."""
    logp = jax.nn.log_softmax(jnp.array([1.0, 0.0, -1.0, 0.3]))
    logq = jax.nn.log_softmax(jnp.array([0.0, 0.5, 0.0, -2.0]))
    p, q = np.exp(np.asarray(logp, np.float64)), np.exp(np.asarray(logq, np.float64))
    exact = float(np.sum(p * np.log(p / q)))
    assert exact > 0.1
    for estimator in (rl.kl_k1, rl.kl_k3):
        np.testing.assert_allclose(float(jnp.sum(jnp.exp(logp) * estimator(logp, logq))), exact, rtol=1e-5)
    # k2 is biased: E_p[k2] differs from the KL by more than rounding here
    assert abs(float(jnp.sum(jnp.exp(logp) * rl.kl_k2(logp, logq))) - exact) > 1e-3


def test_kl_penalized_token_rewards_by_hand():
    rewards = jnp.array([2.0, -1.0, 1.0, 5.0])
    ref = jnp.zeros((4, 3))
    logp = jnp.array([
        [0.5, -1.0, 0.2],     # full row
        [1.0, 0.3, -INF],     # right padded: -inf (k1 = -inf) in padding must not leak
        [9.0, 0.4, -0.6],     # left padded
        [1.0, 1.0, 1.0],      # no real token: reward dropped, all zeros
    ])
    ref = ref.at[1, 2].set(-INF)  # k1 = -inf - -inf = nan at the padded position
    mask = jnp.array([[1, 1, 1], [1, 1, 0], [0, 1, 1], [0, 0, 0]])
    got = rl.kl_penalized_token_rewards(rewards, logp, ref, mask, beta=0.1)
    want = [
        [-0.05, 0.1, -0.02 + 2.0],
        [-0.1, -0.03 - 1.0, 0.0],
        [0.0, -0.04, 0.06 + 1.0],
        [0.0, 0.0, 0.0],
    ]
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(rl.last_real_token_mask(mask),
                                  [[0, 0, 1], [0, 1, 0], [0, 0, 1], [0, 0, 0]])
    # by default beta = 0.05 (KLOptions: ReMax's training script) and the k1 estimator
    got = rl.kl_penalized_token_rewards(jnp.array([1.0]), jnp.array([[1.0, 2.0]]), jnp.zeros((1, 2)), jnp.ones((1, 2)))
    np.testing.assert_allclose(got, [[-0.05, 0.9]], rtol=1e-6)
    # with k3 instead: k3(logp = 1, ref = 0) = exp(-1) + 1 - 1
    got = rl.kl_penalized_token_rewards(jnp.array([0.0]), jnp.array([[1.0]]), jnp.zeros((1, 1)), jnp.ones((1, 1)),
                                        beta=1.0, estimator=rl.kl_k3)
    np.testing.assert_allclose(got, [[-0.3678794]], rtol=1e-6)
    # a reward, not a loss: no gradient flows into the log-probs
    grad = jax.grad(lambda lp: jnp.sum(rl.kl_penalized_token_rewards(rewards, lp, jnp.zeros((4, 3)), mask)))(
        jnp.ones((4, 3)))
    np.testing.assert_array_equal(grad, np.zeros((4, 3)))


def test_token_mean_kl_value_and_gradient():
    logp = jnp.array([[-1.0, -2.0, -INF]])
    ref = jnp.array([[-1.5, -1.0, -0.5]])
    mask = jnp.array([[1, 1, 0]])
    # mean of k3 = (0.1065307 + 0.7182818) / 2
    np.testing.assert_allclose(rl.token_mean_kl(logp, ref, mask), 0.4124062, rtol=1e-6)
    # d k3 / d logp = 1 - exp(ref - logp), divided by 2 real tokens
    grad = jax.grad(lambda lp: rl.token_mean_kl(lp, ref, mask))(jnp.array([[-1.0, -2.0, -0.7]]))
    np.testing.assert_allclose(grad, [[0.1967347, -0.8591409, 0.0]], rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(rl.token_mean_kl(logp, ref, mask, estimator=rl.kl_k1), (0.5 - 1.0) / 2, rtol=1e-6)


def test_sequence_kl():
    np.testing.assert_allclose(rl.sequence_kl(LOGP, REF, jnp.array([[1, 1, 1]])), [-0.5], rtol=1e-6)
    np.testing.assert_allclose(rl.sequence_kl(LOGP, REF, jnp.array([[1, 0, 1]]), estimator=rl.kl_k2), [0.125],
                               rtol=1e-6)
