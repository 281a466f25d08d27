"""RL math as pure jnp functions: advantages, KL to the anchor, losses, masked reductions.

No model code here. Shapes: B sequences, N response tokens, K samples per
prompt, V vocabulary. Functions are top-level with keyword options so gin can
bind them by reference (e.g. `@rl.remax_advantages`). `ADVANTAGES` names the
sequence-level estimators an RL step chooses from (`estimators.py`).
"""

from pe_rlhf.rl.advantages import (
    GRPOOptions,
    discounted_returns,
    gae_advantages,
    grpo_advantages,
    moving_average_baseline_advantages,
    nonfinite_rows,
    reinforce_advantages,
    remax_advantages,
    rloo_advantages,
)
from pe_rlhf.rl.estimators import (
    ADVANTAGES,
    Estimator,
    Scores,
    grpo_estimate,
    reinforce_estimate,
    remax_estimate,
    rloo_estimate,
)
from pe_rlhf.rl.kl import (
    KLOptions,
    kl_k1,
    kl_k2,
    kl_k3,
    kl_penalized_token_rewards,
    last_real_token_mask,
    sequence_kl,
    token_mean_kl,
)
from pe_rlhf.rl.losses import (
    PPOOptions,
    masked_entropy,
    ppo_clip_fraction,
    ppo_clipped_policy_loss,
    ppo_clipped_value_loss,
    sequence_policy_gradient_loss,
    token_entropy,
    token_logprobs,
    token_mean_policy_gradient_loss,
)
from pe_rlhf.rl.masked import masked_count, masked_mean, masked_sum, masked_var, masked_whiten

__all__ = [
    "GRPOOptions", "discounted_returns", "gae_advantages", "grpo_advantages", "moving_average_baseline_advantages",
    "nonfinite_rows", "reinforce_advantages", "remax_advantages", "rloo_advantages",
    "ADVANTAGES", "Estimator", "Scores", "grpo_estimate", "reinforce_estimate", "remax_estimate", "rloo_estimate",
    "KLOptions", "kl_k1", "kl_k2", "kl_k3", "kl_penalized_token_rewards", "last_real_token_mask", "sequence_kl",
    "token_mean_kl",
    "PPOOptions", "masked_entropy", "ppo_clip_fraction", "ppo_clipped_policy_loss", "ppo_clipped_value_loss",
    "sequence_policy_gradient_loss", "token_entropy", "token_logprobs", "token_mean_policy_gradient_loss",
    "masked_count", "masked_mean", "masked_sum", "masked_var", "masked_whiten",
]
