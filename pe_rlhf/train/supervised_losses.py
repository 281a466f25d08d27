"""Reward-model and SFT losses: pure functions of scores, labels and masks."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _mean(x_B, weights_B=None):
    """Mean, or weighted mean over the examples with weight (packed batches: their valid slots)."""
    if weights_B is None:
        return jnp.mean(x_B)
    return jnp.sum(x_B * weights_B) / jnp.maximum(jnp.sum(weights_B), 1.0)


def bradley_terry_loss(r_chosen_B, r_rejected_B, margin_B=None, *, center_coef: float = 0.0, weights_B=None):
    """-log σ(r_c − r_r − margin), mean over pairs, plus center_coef · mean((r_c + r_r)²).

    The centring term (Eisenstein et al., 2023, "Helping or herding?") keeps rewards near zero
    without changing which response is preferred. `weights_B` (0/1) leaves empty slots out of
    every mean. Returns (loss, metrics).
    """
    margin_B = jnp.zeros_like(r_chosen_B) if margin_B is None else margin_B
    diff_B = r_chosen_B - r_rejected_B - margin_B
    nll = -_mean(jax.nn.log_sigmoid(diff_B), weights_B)
    centring = _mean(jnp.square(r_chosen_B + r_rejected_B), weights_B)
    loss = nll + center_coef * centring
    metrics = {
        "loss": loss,
        "bt_nll": nll,
        "accuracy": _mean((r_chosen_B > r_rejected_B).astype(jnp.float32), weights_B),
        "reward_margin": _mean(r_chosen_B - r_rejected_B, weights_B),
        "reward_mean": _mean(0.5 * (r_chosen_B + r_rejected_B), weights_B),
    }
    return loss, metrics


def binary_cross_entropy_loss(logits_B, labels_B, *, weights_B=None):
    """Sigmoid cross-entropy for 0/1 labels (Taskmaster good/bad generations). Returns (loss, metrics)."""
    labels_B = labels_B.astype(jnp.float32)
    loss = -_mean(labels_B * jax.nn.log_sigmoid(logits_B) + (1 - labels_B) * jax.nn.log_sigmoid(-logits_B),
                  weights_B)
    metrics = {
        "loss": loss,
        "accuracy": _mean(((logits_B > 0) == (labels_B > 0.5)).astype(jnp.float32), weights_B),
        "reward_mean": _mean(logits_B, weights_B),
    }
    return loss, metrics


def token_logprobs(logits_BxTxV, targets_BxT):
    """log p(target) per position, in float32."""
    logp_BxTxV = jax.nn.log_softmax(logits_BxTxV.astype(jnp.float32), axis=-1)
    return jnp.take_along_axis(logp_BxTxV, targets_BxT[..., None], axis=-1)[..., 0]


def next_token_loss(logits_BxTxV, tokens_BxT, loss_mask_BxT):
    """SFT cross-entropy: position t predicts token t+1; only targets with loss_mask count.

    `loss_mask_BxT` marks the tokens to be predicted (the response), so prompt tokens are
    never targets. Mean over counted tokens. Returns (loss, metrics) with the token count.
    """
    return masked_token_loss(logits_BxTxV[:, :-1], tokens_BxT[:, 1:], loss_mask_BxT[:, 1:])


def masked_token_loss(logits_BxNxV, targets_BxN, mask_BxN):
    """Cross-entropy of `targets` under `logits` (already aligned), mean over positions with mask."""
    logp_BxN = token_logprobs(logits_BxNxV, targets_BxN)
    mask_BxN = mask_BxN.astype(jnp.float32)
    count = jnp.maximum(mask_BxN.sum(), 1.0)
    loss = -(logp_BxN * mask_BxN).sum() / count
    return loss, {"loss": loss, "tokens": mask_BxN.sum(), "perplexity": jnp.exp(loss)}
