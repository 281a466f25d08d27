"""KL to the anchor (reference) policy: per-token estimators, the reward penalty, the loss term.

Inputs are the log-probabilities of the *sampled* tokens under the policy
(`logps_BxN`) and under the frozen anchor (`ref_logps_BxN`). With tokens
drawn from the policy, each estimator below averages to KL(policy || anchor)
(Schulman, "Approximating KL divergence", 2020):
    k1 = logp - ref                              unbiased, can be negative
    k2 = (logp - ref)^2 / 2                      biased, low variance, >= 0
    k3 = exp(ref - logp) - (ref - logp) - 1      unbiased, >= 0
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from pe_rlhf.rl.masked import masked_mean, masked_sum


@dataclasses.dataclass(frozen=True)
class KLOptions:
    """KL regularisation to the anchor: coefficient beta, folded into the reward or added as a loss.

    Defaults: beta = 0.05 and the k1 penalty folded into per-token rewards, as
    ReMax's released training script runs it (arXiv 2310.10505; liziniu/ReMax
    step3_rlhf_finetuning/training_scripts/llama2/run_llama2_7b.sh `--kl_ctl 0.05`,
    remax_trainer.py: per-token reward -kl_ctl * (logp - ref_logp)).
    PE-RLHF (arXiv 2403.10704) also regularises towards the anchor policy with
    a KL term. `in_reward=False` uses the k3 loss term instead
    (`token_mean_kl`, as in GRPO, arXiv 2402.03300 eq. 4).
    """

    beta: float = 0.05
    in_reward: bool = True


def kl_k1(logps_BxN, ref_logps_BxN):
    """k1 = logp - ref_logp per token."""
    return jnp.asarray(logps_BxN) - jnp.asarray(ref_logps_BxN)


def kl_k2(logps_BxN, ref_logps_BxN):
    """k2 = (logp - ref_logp)^2 / 2 per token."""
    return 0.5 * jnp.square(jnp.asarray(logps_BxN) - jnp.asarray(ref_logps_BxN))


def kl_k3(logps_BxN, ref_logps_BxN):
    """k3 = exp(ref_logp - logp) - (ref_logp - logp) - 1 per token (never negative)."""
    log_ratio = jnp.asarray(ref_logps_BxN) - jnp.asarray(logps_BxN)
    return jnp.expm1(log_ratio) - log_ratio


def sequence_kl(logps_BxN, ref_logps_BxN, mask_BxN, *, estimator=kl_k1):
    """kl_B: the per-token estimate summed over each sequence's real tokens (for logging)."""
    return masked_sum(estimator(logps_BxN, ref_logps_BxN), mask_BxN, axis=1)


def last_real_token_mask(mask_BxN):
    """bool[B, N], True only at each row's last real token; all False for a row with no real token."""
    real_BxN = jnp.asarray(mask_BxN).astype(bool)
    n = real_BxN.shape[1]
    position_BxN = jnp.where(real_BxN, jnp.arange(n)[None, :], -1)
    last_B = jnp.max(position_BxN, axis=1)
    return jnp.arange(n)[None, :] == last_B[:, None]


def kl_penalized_token_rewards(rewards_B, logps_BxN, ref_logps_BxN, mask_BxN, *, beta=KLOptions.beta,
                               estimator=kl_k1):
    """Per-token rewards: -beta * KL_t on every real token, plus the sequence reward on the last one.

        token_rewards[b, t] = -beta * estimator(logp, ref)[b, t] + rewards[b] * [t == last real token of b]

    0 on padding. The log-probs are treated as constants (stop_gradient): this
    is a reward, not a loss. A row with no real tokens gets all zeros (its
    sequence reward is dropped). Feed the result to
    `advantages.discounted_returns` (REINFORCE/ReMax) or
    `advantages.gae_advantages` (PPO).
    """
    logps_BxN = jax.lax.stop_gradient(jnp.asarray(logps_BxN))
    ref_logps_BxN = jax.lax.stop_gradient(jnp.asarray(ref_logps_BxN))
    real_BxN = jnp.asarray(mask_BxN).astype(bool)
    penalty_BxN = -beta * estimator(logps_BxN, ref_logps_BxN)
    rewards_B = jax.lax.stop_gradient(jnp.asarray(rewards_B, dtype=penalty_BxN.dtype))
    last_BxN = last_real_token_mask(real_BxN)
    return jnp.where(real_BxN, penalty_BxN, 0) + jnp.where(last_BxN, rewards_B[:, None], 0)


def token_mean_kl(logps_BxN, ref_logps_BxN, mask_BxN, *, estimator=kl_k3):
    """KL as a loss term: the estimator averaged over every real token of the batch (scalar).

    Differentiable in `logps_BxN`; the caller adds `beta * token_mean_kl(...)`
    to the policy loss (`KLOptions.in_reward=False`).
    """
    return masked_mean(estimator(logps_BxN, ref_logps_BxN), mask_BxN)
