"""Advantages: REINFORCE, ReMax, RLOO, GRPO baselines and PPO's GAE, as pure jnp functions.

Shapes: B sequences, N response tokens, K samples per prompt. Sequence-level
estimators take one scalar reward per sequence (`rewards_B`, or `rewards_BxK`
for K samples of each of B prompts: reshape a prompt-major `[B*K]` batch with
`rewards.reshape(B, K)`). Token-level functions take `[B, N]` arrays and a
mask that is 1 on real response tokens.

Every function here is a baseline subtraction or a recursion over rewards: no
gradients flow through advantages in any estimator, so callers should treat
outputs as constants (the loss functions in `losses.py` do not differentiate
through them, but `jax.lax.stop_gradient` is cheap insurance).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

# ----------------------------------------------------------------------------- options


@dataclasses.dataclass(frozen=True)
class GRPOOptions:
    """Group-normalised advantages (r - mean) / (std + epsilon) within each prompt's K samples.

    The normalisation is GRPO's outcome supervision (DeepSeekMath, arXiv
    2402.03300, Sec. 4.1.2); the paper gives no epsilon, so epsilon = 1e-6 and
    the sample standard deviation (ddof=1) follow verl's
    `compute_grpo_outcome_advantage` (torch.std). `scale_by_std=False` gives
    Dr. GRPO's mean-only centring (arXiv 2503.20783).
    """

    epsilon: float = 1e-6
    scale_by_std: bool = True


# ----------------------------------------------------------------------------- bad rewards


def nonfinite_rows(x_B):
    """bool[B]: True where row b of `x_B` (shape [B, ...]) holds a NaN or an infinity.

    A train step uses it to skip an update whose rewards are bad and to count
    the skip: `bad_B = nonfinite_rows(rewards_B); skip = jnp.any(bad_B)`.
    """
    x_B = jnp.asarray(x_B)
    if x_B.ndim == 0:
        raise ValueError("nonfinite_rows: expected an array of shape [B, ...], got a scalar")
    finite = jnp.isfinite(x_B).reshape(x_B.shape[0], -1)
    return ~jnp.all(finite, axis=1)


# ----------------------------------------------------------------------------- sequence-level baselines


def reinforce_advantages(rewards_B):
    """Plain REINFORCE (Williams 1992) without a baseline: the advantage is the reward itself."""
    return jnp.asarray(rewards_B)


def moving_average_baseline_advantages(rewards_B, baseline, *, decay):
    """REINFORCE with an exponential moving-average reward baseline.

    Returns `(advantages_B, new_baseline)` with
        advantages_B = rewards_B - baseline
        new_baseline = decay * baseline + (1 - decay) * mean(rewards_B).
    The advantages use the baseline from *before* this batch, so it does not
    depend on the sampled responses and the gradient stays unbiased (the
    reinforcement-comparison baseline of Williams 1992). `decay` in [0, 1]:
    0 keeps only the last batch mean, 1 freezes the baseline. Carry
    `new_baseline` in the train state (start it at 0.0).
    """
    if isinstance(decay, (int, float)) and not 0.0 <= decay <= 1.0:
        raise ValueError(f"moving_average_baseline_advantages: decay must be in [0, 1], got {decay}")
    rewards_B = jnp.asarray(rewards_B)
    advantages_B = rewards_B - baseline
    new_baseline = decay * baseline + (1.0 - decay) * jnp.mean(rewards_B)
    return advantages_B, new_baseline


def remax_advantages(rewards_B, greedy_rewards_B):
    """ReMax (arXiv 2310.10505, Algorithm 1): reward of the sample minus reward of the greedy response.

    The greedy response depends only on the prompt and the current policy, not
    on the sample, so subtracting its reward leaves the gradient unbiased.
    """
    return jnp.asarray(rewards_B) - jnp.asarray(greedy_rewards_B)


def _check_group(rewards_BxK, who):
    rewards_BxK = jnp.asarray(rewards_BxK)
    if rewards_BxK.ndim != 2:
        raise ValueError(f"{who}: expected rewards of shape [B, K] (K samples per prompt), got {rewards_BxK.shape}; "
                         f"reshape a prompt-major batch with rewards.reshape(B, K)")
    if rewards_BxK.shape[1] < 2:
        raise ValueError(f"{who}: needs K >= 2 samples per prompt, got K = {rewards_BxK.shape[1]}")
    return rewards_BxK


def rloo_advantages(rewards_BxK):
    """RLOO: each sample's reward minus the mean reward of the other K - 1 samples of its prompt.

    A_i = r_i - (sum_j r_j - r_i) / (K - 1) = K / (K - 1) * (r_i - mean(r)).
    (Kool et al. 2019, "Buy 4 REINFORCE samples, get a baseline for free";
    Ahmadian et al. 2024, arXiv 2402.14740.) Unbiased: the baseline of sample
    i does not depend on sample i.
    """
    rewards_BxK = _check_group(rewards_BxK, "rloo_advantages")
    k = rewards_BxK.shape[1]
    others_BxK = (jnp.sum(rewards_BxK, axis=1, keepdims=True) - rewards_BxK) / (k - 1)
    return rewards_BxK - others_BxK


def grpo_advantages(rewards_BxK, *, epsilon=GRPOOptions.epsilon, scale_by_std=GRPOOptions.scale_by_std):
    """GRPO: (r - mean_K(r)) / (std_K(r) + epsilon) within each prompt; see `GRPOOptions`.

    std is the sample standard deviation (ddof=1) of the K rewards. With
    `scale_by_std=False` the advantage is r - mean_K(r) (Dr. GRPO).
    """
    rewards_BxK = _check_group(rewards_BxK, "grpo_advantages")
    centred_BxK = rewards_BxK - jnp.mean(rewards_BxK, axis=1, keepdims=True)
    if not scale_by_std:
        return centred_BxK
    std_Bx1 = jnp.std(rewards_BxK, axis=1, keepdims=True, ddof=1)
    return centred_BxK / (std_Bx1 + epsilon)


# ----------------------------------------------------------------------------- token-level (PPO)


def _reverse_recursion(rewards_BxN, values_BxN, mask_BxN, gamma, lam):
    """A_t = delta_t + gamma * lam * A_{t+1}, delta_t = r_t + gamma * V_{t+1} - V_t over real tokens.

    Padding is transparent: a masked position neither contributes nor breaks
    the chain, so "next token" means the next *real* token, and the token after
    the last real one is terminal (V = 0, A = 0). This handles right padding,
    left padding and holes alike.
    """
    real_BxN = jnp.asarray(mask_BxN).astype(bool)
    rewards_BxN = jnp.asarray(rewards_BxN)
    values_BxN = jnp.asarray(values_BxN, dtype=rewards_BxN.dtype)
    zeros_B = jnp.zeros(rewards_BxN.shape[:1], rewards_BxN.dtype)

    def step(carry, xs):
        next_value_B, next_adv_B = carry
        reward_B, value_B, real_B = xs
        delta_B = reward_B + gamma * next_value_B - value_B
        adv_B = delta_B + gamma * lam * next_adv_B
        carry = (jnp.where(real_B, value_B, next_value_B), jnp.where(real_B, adv_B, next_adv_B))
        return carry, jnp.where(real_B, adv_B, 0)

    _, adv_NxB = jax.lax.scan(step, (zeros_B, zeros_B), (rewards_BxN.T, values_BxN.T, real_BxN.T), reverse=True)
    return adv_NxB.T


def gae_advantages(rewards_BxN, values_BxN, mask_BxN, *, gamma, lam):
    """Generalised advantage estimation (Schulman et al. 2015, arXiv 1506.02438) with masks.

    Returns `(advantages_BxN, returns_BxN)`, returns = advantages + values on
    real tokens; both are 0 on padding. Rewards and values at padded positions
    are ignored (see `_reverse_recursion`), so a sequence reward must sit on
    the last real token (`kl.kl_penalized_token_rewards` puts it there). PPO
    defaults for language models: gamma = 1, lam = 0.95 (`losses.PPOOptions`).
    """
    advantages_BxN = _reverse_recursion(rewards_BxN, values_BxN, mask_BxN, gamma, lam)
    real_BxN = jnp.asarray(mask_BxN).astype(bool)
    returns_BxN = jnp.where(real_BxN, advantages_BxN + jnp.asarray(values_BxN), 0)
    return advantages_BxN, returns_BxN


def discounted_returns(token_rewards_BxN, mask_BxN, *, gamma=1.0):
    """Reward-to-go G_t = sum_{l >= 0} gamma^l r_{t+l} over real tokens; 0 on padding.

    Turns per-token rewards (a sequence reward on the last token minus a
    per-token KL penalty) into per-token REINFORCE/ReMax advantages. It is GAE
    with V = 0 and lam = 1.
    """
    token_rewards_BxN = jnp.asarray(token_rewards_BxN)
    return _reverse_recursion(token_rewards_BxN, jnp.zeros_like(token_rewards_BxN), mask_BxN, gamma, 1.0)
