"""Reward-model and SFT losses against hand computation; the head reads the last real token."""

import math

import jax.numpy as jnp
import numpy as np

from pe_rlhf.models.heads import RewardModel, last_real_index
from pe_rlhf.models.tiny import tiny_model
from pe_rlhf.train import supervised_losses
from pe_rlhf.train.metrics import classification_metrics, pairwise_metrics, roc_auc


def test_bradley_terry_by_hand():
    rc, rr = jnp.array([2.0, 0.0]), jnp.array([1.0, 1.0])
    loss, m = supervised_losses.bradley_terry_loss(rc, rr)
    # -log σ(1) = log(1 + e^-1) = 0.3132617; -log σ(-1) = 1.3132617
    np.testing.assert_allclose(float(loss), (0.31326169 + 1.31326169) / 2, rtol=1e-6)
    assert float(m["accuracy"]) == 0.5
    loss_m, _ = supervised_losses.bradley_terry_loss(rc, rr, jnp.array([1.0, 0.0]))  # margin 1 on the first pair
    np.testing.assert_allclose(float(loss_m), (math.log(2) + 1.31326169) / 2, rtol=1e-6)
    loss_c, m = supervised_losses.bradley_terry_loss(rc, rr, center_coef=0.1)  # + 0.1 * mean(9, 1)
    np.testing.assert_allclose(float(loss_c), float(loss) + 0.5, rtol=1e-6)
    np.testing.assert_allclose(float(m["bt_nll"]), float(loss), rtol=1e-6)


def test_bradley_terry_without_centring_stays_finite_where_the_centring_overflows():
    rc, rr = jnp.array([1e20, -1.0]), jnp.array([1e20, 0.0])  # (r_c + r_r)^2 = 4e40: inf in float32
    loss, m = supervised_losses.bradley_terry_loss(rc, rr)  # center_coef 0: the term is not added (0 * inf = NaN)
    np.testing.assert_allclose(float(loss), (math.log(2) + 1.31326169) / 2, rtol=1e-6)
    np.testing.assert_allclose(float(m["bt_nll"]), float(loss), rtol=1e-6)
    assert math.isinf(float(supervised_losses.bradley_terry_loss(rc, rr, center_coef=0.1)[0]))


def test_binary_cross_entropy_by_hand():
    loss, m = supervised_losses.binary_cross_entropy_loss(jnp.array([0.0, 2.0, -1.0]), jnp.array([1.0, 0.0, 0.0]))
    expected = (math.log(2) + math.log(1 + math.e ** 2) + math.log(1 + math.e ** -1)) / 3
    np.testing.assert_allclose(float(loss), expected, rtol=1e-6)
    np.testing.assert_allclose(float(m["accuracy"]), 1 / 3, rtol=1e-6)  # 0 -> predicted negative


def test_next_token_loss_counts_response_only():
    # vocab 2, uniform logits except one position: only targets under the mask count
    logits = jnp.zeros((1, 3, 2)).at[0, 1].set(jnp.array([0.0, math.log(3)]))
    tokens = jnp.array([[0, 1, 1]])
    mask = jnp.array([[0, 0, 1]])  # only token 2 (predicted from position 1) counts
    loss, m = supervised_losses.next_token_loss(logits, tokens, mask)
    np.testing.assert_allclose(float(loss), -math.log(0.75), rtol=1e-6)
    assert float(m["tokens"]) == 1.0
    loss_all, _ = supervised_losses.next_token_loss(logits, tokens, jnp.array([[0, 1, 1]]))
    np.testing.assert_allclose(float(loss_all), (math.log(2) - math.log(0.75)) / 2, rtol=1e-6)


def test_last_real_index_left_and_right_padding():
    mask = jnp.array([[1, 1, 1, 0, 0], [0, 0, 1, 1, 1], [1, 1, 1, 1, 1]], bool)
    assert last_real_index(mask).tolist() == [2, 4, 4]


def test_reward_head_reads_the_last_real_token_either_padding():
    backbone, _ = tiny_model("llama")
    rm = RewardModel(backbone)
    rm.head.kernel[...] = jnp.linspace(-1, 1, backbone.config.hidden_size)
    seq = jnp.array([[5, 6, 7, 8]])
    right = jnp.array([[5, 6, 7, 8, 0, 0]]), jnp.array([[1, 1, 1, 1, 0, 0]])
    left = jnp.array([[0, 0, 5, 6, 7, 8]]), jnp.array([[0, 0, 1, 1, 1, 1]])
    r_plain = rm(seq, jnp.ones_like(seq))
    np.testing.assert_allclose(np.asarray(rm(*right)), np.asarray(r_plain), atol=1e-5)
    np.testing.assert_allclose(np.asarray(rm(*left)), np.asarray(r_plain), atol=1e-5)
    # and it is not the score of a shorter prefix
    assert abs(float(rm(seq[:, :3], jnp.ones((1, 3)))[0]) - float(r_plain[0])) > 1e-4
    h, _ = backbone.hidden(seq)
    np.testing.assert_allclose(float(r_plain[0]), float(h[0, -1] @ rm.head.kernel[...]), rtol=1e-5)


def test_host_metrics_by_hand():
    m = pairwise_metrics(np.array([1.0, 2.0, 0.0, 3.0]), np.array([0.0, 2.5, 1.0, 1.0]))
    assert m["pairwise_accuracy"] == 0.5 and m["margin_mean"] == 0.375  # margins 1, -0.5, -1, 2 and m["num_pairs"] == 4
    assert roc_auc(np.array([0.1, 0.4, 0.35, 0.8]), np.array([0, 0, 1, 1])) == 0.75
    assert roc_auc(np.array([1.0, 1.0, 0.0, 0.0]), np.array([1, 0, 1, 0])) == 0.5  # ties count 1/2
    c = classification_metrics(np.array([2.0, 1.0, -1.0, -2.0, 3.0]), np.array([1, 1, 1, 0, 0]))
    assert c["accuracy"] == 0.6
    np.testing.assert_allclose(c["balanced_accuracy"], (2 / 3 + 1 / 2) / 2)
    np.testing.assert_allclose(c["roc_auc"], 3 / 6)  # positives beat -2, never 3
    one_class = classification_metrics(np.array([2.0, -1.0, 3.0]), np.array([1, 1, 1]))
    assert one_class["recall_negative"] is None and one_class["roc_auc"] is None  # undefined, not NaN
    np.testing.assert_allclose(one_class["balanced_accuracy"], 2 / 3)  # the recall of the class present
