"""Reward-model, SFT and direct-preference (DPO, IPO) losses: pure functions of scores, log-probs and masks."""

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
    loss = nll
    if center_coef:  # not 0 * centring: an overflowing centring would make that NaN (0 * inf)
        loss = nll + center_coef * _mean(jnp.square(r_chosen_B + r_rejected_B), weights_B)
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


# -- direct preference optimisation: the policy's log-probs against a reference's ------------------------
def _preference_metrics(loss, chosen_reward_B, rejected_reward_B, weights_B):
    """(loss, metrics): the implicit rewards beta * (log p - log p_ref), their accuracy and margin."""
    chosen_reward_B = jax.lax.stop_gradient(chosen_reward_B)
    rejected_reward_B = jax.lax.stop_gradient(rejected_reward_B)
    return loss, {
        "loss": loss,
        "accuracy": _mean((chosen_reward_B > rejected_reward_B).astype(jnp.float32), weights_B),
        "chosen_reward": _mean(chosen_reward_B, weights_B),
        "rejected_reward": _mean(rejected_reward_B, weights_B),
        "reward_margin": _mean(chosen_reward_B - rejected_reward_B, weights_B),
    }


def dpo_loss(policy_chosen_logp_B, policy_rejected_logp_B, ref_chosen_logp_B, ref_rejected_logp_B, *,
             beta: float, label_smoothing: float = 0.0, weights_B=None):
    """DPO (Rafailov et al., 2023, eq. 7): -log σ(β h), h = (log π_c - log π_r) - (log π_ref_c - log π_ref_r).

    `label_smoothing` ε > 0 is conservative DPO (Mitchell, 2023), as TRL's `label_smoothing`: each label
    is taken to be flipped with probability ε, -(1 - ε) log σ(β h) - ε log σ(-β h). Log-probs are of whole
    responses (summed over their tokens). `weights_B` (0/1) leaves filler pairs out of every mean.
    Returns (loss, metrics) with the implicit rewards β (log π - log π_ref) of chosen and rejected.
    """
    h_B = (policy_chosen_logp_B - policy_rejected_logp_B) - (ref_chosen_logp_B - ref_rejected_logp_B)
    losses_B = (-(1.0 - label_smoothing) * jax.nn.log_sigmoid(beta * h_B)
                - label_smoothing * jax.nn.log_sigmoid(-beta * h_B))
    return _preference_metrics(_mean(losses_B, weights_B), beta * (policy_chosen_logp_B - ref_chosen_logp_B),
                               beta * (policy_rejected_logp_B - ref_rejected_logp_B), weights_B)


def ipo_loss(policy_chosen_logp_B, policy_rejected_logp_B, ref_chosen_logp_B, ref_rejected_logp_B, *,
             beta: float, weights_B=None):
    """IPO (Azar et al., 2023, eq. 17, their τ is β): (h - 1/(2β))², h as in `dpo_loss`.

    It regresses the log-ratio difference to a finite target instead of pushing it to infinity. TRL's
    DPOTrainer (loss_type="ipo") feeds it log-probs averaged over each response's tokens, and so does
    `supervised_steps.preference_loss`; this function takes whatever log-probs it is given. Returns
    (loss, metrics) as `dpo_loss`.
    """
    h_B = (policy_chosen_logp_B - policy_rejected_logp_B) - (ref_chosen_logp_B - ref_rejected_logp_B)
    losses_B = jnp.square(h_B - 1.0 / (2.0 * beta))
    return _preference_metrics(_mean(losses_B, weights_B), beta * (policy_chosen_logp_B - ref_chosen_logp_B),
                               beta * (policy_rejected_logp_B - ref_rejected_logp_B), weights_B)


PREFERENCE_LOSSES = ("dpo", "ipo")
