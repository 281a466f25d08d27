"""Policy-gradient and PPO losses, token log-probs and entropy, as pure jnp functions.

Losses are minimised. Advantages, old log-probs, old values and returns are
constants (wrapped in `stop_gradient` here); only the current `logps_BxN`
(or `values_BxN`) carry gradients. Masks are 1 on real response tokens.

Normalisation (how token terms are averaged) changes the effective step size
and the weight of long responses, so each loss states it:
  * `sequence_policy_gradient_loss`: sum over a sequence's tokens, mean over
    sequences — the REINFORCE/ReMax estimator exactly (its gradient is
    -1/B sum_b A_b grad log p(y_b)).
  * `token_mean_policy_gradient_loss` and the PPO losses: mean over every real
    token of the batch (ReMax's released trainer and lm-human-preferences).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from pe_rlhf.rl.masked import masked_mean, masked_sum


@dataclasses.dataclass(frozen=True)
class PPOOptions:
    """PPO for language models: ratio clip, value clip, GAE discount and lambda.

    clip_epsilon = 0.2 is the best clipping setting in PPO (arXiv 1707.06347,
    Table 1); value_clip_epsilon = 0.2, gamma = 1 and lam = 0.95 are
    openai/lm-human-preferences `PpoHParams` (cliprange_value, gamma, lam;
    Ziegler et al., arXiv 1909.08593).
    """

    clip_epsilon: float = 0.2
    value_clip_epsilon: float = 0.2
    gamma: float = 1.0
    lam: float = 0.95


# ----------------------------------------------------------------------------- per-token quantities


def token_logprobs(logits_BxNxV, tokens_BxN):
    """log softmax(logits)[token] for each position: logps_BxN (float32 or wider)."""
    logits_BxNxV = jnp.asarray(logits_BxNxV)
    logits_BxNxV = logits_BxNxV.astype(jnp.promote_types(logits_BxNxV.dtype, jnp.float32))
    logp_BxNxV = jax.nn.log_softmax(logits_BxNxV, axis=-1)
    return jnp.take_along_axis(logp_BxNxV, jnp.asarray(tokens_BxN)[..., None], axis=-1)[..., 0]


def token_entropy(logits_BxNxV):
    """Entropy -sum_v p log p of the next-token distribution at each position: entropy_BxN.

    Logits of -inf (banned tokens) contribute 0 log 0 = 0, in value and gradient.
    """
    logits_BxNxV = jnp.asarray(logits_BxNxV)
    logits_BxNxV = logits_BxNxV.astype(jnp.promote_types(logits_BxNxV.dtype, jnp.float32))
    logp_BxNxV = jax.nn.log_softmax(logits_BxNxV, axis=-1)
    p_BxNxV = jnp.exp(logp_BxNxV)
    return -jnp.sum(p_BxNxV * jnp.where(p_BxNxV > 0, logp_BxNxV, 0), axis=-1)


def masked_entropy(logits_BxNxV, mask_BxN):
    """Mean next-token entropy over every real token of the batch (scalar)."""
    return masked_mean(token_entropy(logits_BxNxV), mask_BxN)


# ----------------------------------------------------------------------------- policy gradient


def _per_token(advantages, logps_BxN, who):
    """Advantages of shape [B] (one per sequence) or [B, N] (per token) -> [B, N], as constants."""
    advantages = jax.lax.stop_gradient(jnp.asarray(advantages))
    if advantages.ndim == 1:
        advantages = advantages[:, None]
    if advantages.ndim != 2 or advantages.shape[0] != logps_BxN.shape[0]:
        raise ValueError(f"{who}: advantages must have shape [B] or [B, N] with B = {logps_BxN.shape[0]}, "
                         f"got {jnp.shape(advantages)} for logps of shape {logps_BxN.shape}")
    return jnp.broadcast_to(advantages, logps_BxN.shape)


def sequence_policy_gradient_loss(advantages, logps_BxN, mask_BxN):
    """-1/B sum_b sum_t mask[b,t] * A[b,(t)] * logp[b,t]: the REINFORCE/ReMax loss.

    Normalisation: tokens are *summed* within a sequence (so A_b multiplies
    log p(y_b) = sum_t log p(y_bt | ...)), sequences are *averaged*. With
    sequence-level advantages_B this is exactly -mean_b A_b log p(y_b), whose
    gradient is the unbiased score-function estimator. `advantages` may be
    [B] or per-token [B, N] (e.g. `advantages.discounted_returns` of
    KL-penalised token rewards).
    """
    logps_BxN = jnp.asarray(logps_BxN)
    advantages_BxN = _per_token(advantages, logps_BxN, "sequence_policy_gradient_loss")
    return -jnp.mean(masked_sum(advantages_BxN * logps_BxN, mask_BxN, axis=1))


def token_mean_policy_gradient_loss(advantages, logps_BxN, mask_BxN):
    """-sum_{b,t} mask * A * logp / sum_{b,t} mask: the same estimator averaged over real tokens.

    Normalisation: mean over every real token of the batch, so each token
    weighs the same and long responses weigh more in total (ReMax's released
    trainer, `actor_loss_fn`). `advantages` may be [B] or [B, N].
    """
    logps_BxN = jnp.asarray(logps_BxN)
    advantages_BxN = _per_token(advantages, logps_BxN, "token_mean_policy_gradient_loss")
    return -masked_mean(advantages_BxN * logps_BxN, mask_BxN)


# ----------------------------------------------------------------------------- PPO


def ppo_clipped_policy_loss(advantages_BxN, logps_BxN, old_logps_BxN, mask_BxN, *,
                            clip_epsilon=PPOOptions.clip_epsilon):
    """PPO's clipped surrogate, token mean over real tokens (arXiv 1707.06347, eq. 7):

        ratio = exp(logp - old_logp)
        loss = -mean_real_tokens( min(ratio * A, clip(ratio, 1 - eps, 1 + eps) * A) )
    """
    logps_BxN = jnp.asarray(logps_BxN)
    advantages_BxN = _per_token(advantages_BxN, logps_BxN, "ppo_clipped_policy_loss")
    ratio_BxN = jnp.exp(logps_BxN - jax.lax.stop_gradient(jnp.asarray(old_logps_BxN)))
    clipped_BxN = jnp.clip(ratio_BxN, 1.0 - clip_epsilon, 1.0 + clip_epsilon)
    surrogate_BxN = jnp.minimum(ratio_BxN * advantages_BxN, clipped_BxN * advantages_BxN)
    return -masked_mean(surrogate_BxN, mask_BxN)


def ppo_clip_fraction(advantages_BxN, logps_BxN, old_logps_BxN, mask_BxN, *, clip_epsilon=PPOOptions.clip_epsilon):
    """Fraction of real tokens where the clipped term is the active one (its gradient is zero)."""
    logps_BxN = jnp.asarray(logps_BxN)
    advantages_BxN = _per_token(advantages_BxN, logps_BxN, "ppo_clip_fraction")
    ratio_BxN = jnp.exp(logps_BxN - jnp.asarray(old_logps_BxN))
    clipped_BxN = jnp.clip(ratio_BxN, 1.0 - clip_epsilon, 1.0 + clip_epsilon)
    active_BxN = clipped_BxN * advantages_BxN < ratio_BxN * advantages_BxN
    return masked_mean(active_BxN.astype(logps_BxN.dtype), mask_BxN)


def ppo_clipped_value_loss(values_BxN, old_values_BxN, returns_BxN, mask_BxN, *,
                           clip_epsilon=PPOOptions.value_clip_epsilon):
    """Clipped value loss, token mean over real tokens (as in lm-human-preferences):

        v_clipped = old_v + clip(v - old_v, -eps, eps)
        loss = 0.5 * mean_real_tokens( max((v - R)^2, (v_clipped - R)^2) )
    """
    values_BxN = jnp.asarray(values_BxN)
    old_values_BxN = jax.lax.stop_gradient(jnp.asarray(old_values_BxN))
    returns_BxN = jax.lax.stop_gradient(jnp.asarray(returns_BxN))
    clipped_BxN = old_values_BxN + jnp.clip(values_BxN - old_values_BxN, -clip_epsilon, clip_epsilon)
    squared_BxN = jnp.maximum(jnp.square(values_BxN - returns_BxN), jnp.square(clipped_BxN - returns_BxN))
    return 0.5 * masked_mean(squared_BxN, mask_BxN)
