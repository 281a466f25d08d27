"""PPO, the baseline ReMax is compared against: a value model, GAE, `ppo_epochs` clipped updates.

The rollout (sampling and rewards) is the REINFORCE family's (`rollout.rollout`); what
only PPO has is here: the value model's per-token estimates, per-token KL-penalised
rewards, GAE advantages and the clipped policy and value losses (`pe_rlhf.rl`).
In LoRA mode the value model is a `value` adapter and a per-token head on the
policy's backbone.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from pe_rlhf import rl
from pe_rlhf.train.optim import guarded_update
from pe_rlhf.train.precision import Precision
from pe_rlhf.train.rollout import RLConfig, RLModules, rollout, with_anchor


def ppo_step(trainable, opt_state, frozen, rl_state, batch, rng, *, graphdef, tx: optax.GradientTransformation,
             cfg: RLConfig, reward_fn: Callable | None, eos_ids: tuple[int, ...], pad_id: int,
             precision: Precision = Precision()):
    """PPO with a value model (a `value` adapter + per-token head on the same backbone in LoRA mode).

    Per-token rewards are -beta * KL to the anchor with the sequence reward added at the last real
    token; advantages by GAE over the value model's estimates, whitened; `ppo_epochs` full-batch
    epochs of the clipped policy loss + value_coef * the clipped value loss. `rl_state` is returned
    unchanged. With a mixed `precision`, `trainable` holds fp32 masters (the policy's, and a full value
    model's); rollout and losses run on their compute copy.
    """
    m: RLModules = nnx.merge(graphdef, precision.cast(trainable), frozen)

    # ROLLOUT: samples_per_prompt responses per prompt and their rewards
    ro = rollout(m, batch["prompt_BxT"], batch["prompt_mask_BxT"], rng, cfg.sampling, reward_fn=reward_fn,
                 eos_ids=eos_ids, pad_id=pad_id, samples_per_prompt=cfg.samples_per_prompt)

    # KL, VALUES
    ro = with_anchor(m, ro)
    old_values_SxN = jax.lax.stop_gradient(m.value.token_values(ro.seq_BxL, ro.seq_mask_BxL, ro.prompt_len))

    # ADVANTAGE (GAE)
    token_rewards_SxN = rl.kl_penalized_token_rewards(ro.rewards_B, ro.logprobs_BxN, ro.ref_logprobs_BxN, ro.mask_BxN,
                                                      beta=cfg.kl_beta)
    adv_SxN, returns_SxN = rl.gae_advantages(token_rewards_SxN, old_values_SxN, ro.mask_BxN, gamma=cfg.gamma,
                                             lam=cfg.lam)
    adv_SxN = jax.lax.stop_gradient(rl.masked_whiten(adv_SxN, ro.mask_BxN))
    returns_SxN = jax.lax.stop_gradient(returns_SxN)

    # UPDATE: ppo_epochs passes over the rollout
    def loss_fn(trainable):
        m = nnx.merge(graphdef, precision.cast(trainable), frozen)
        with m.as_policy() as policy:
            logp_SxN, entropy_SxN = ro.logprobs_under(policy)
        values_SxN = m.value.token_values(ro.seq_BxL, ro.seq_mask_BxL, ro.prompt_len)
        pg = rl.ppo_clipped_policy_loss(adv_SxN, logp_SxN, ro.logprobs_BxN, ro.mask_BxN,
                                        clip_epsilon=cfg.clip_epsilon)
        vf = rl.ppo_clipped_value_loss(values_SxN, old_values_SxN, returns_SxN, ro.mask_BxN,
                                       clip_epsilon=cfg.value_clip_epsilon)
        aux = {"policy_loss": pg, "value_loss": vf, "entropy": rl.masked_mean(entropy_SxN, ro.mask_BxN),
               "clip_fraction": rl.ppo_clip_fraction(adv_SxN, logp_SxN, ro.logprobs_BxN, ro.mask_BxN,
                                                     clip_epsilon=cfg.clip_epsilon)}
        return pg + cfg.value_coef * vf, aux

    def epoch(carry, _):
        trainable, opt_state = carry
        (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(trainable)
        return guarded_update(tx, grads, opt_state, trainable, loss), dict(aux, loss=loss,
                                                                           grad_norm=optax.global_norm(grads))

    (trainable, opt_state), per_epoch = jax.lax.scan(epoch, (trainable, opt_state), None, length=cfg.ppo_epochs)
    first = jax.tree.map(lambda x: x[0], per_epoch)  # metrics of the first epoch (on-policy)
    metrics = {
        "loss": first["loss"], "policy_loss": first["policy_loss"], "value_loss": first["value_loss"],
        "clip_fraction": jax.tree.map(lambda x: x[-1], per_epoch)["clip_fraction"],
        "reward_mean": ro.rewards_B.mean(), "reward_std": ro.rewards_B.std(),
        "baseline_reward": rl.masked_mean(old_values_SxN, ro.mask_BxN),
        "advantage_mean": rl.masked_mean(adv_SxN, ro.mask_BxN),
        "advantage_std": jnp.sqrt(rl.masked_var(adv_SxN, ro.mask_BxN)),
        "kl": ro.kl_B.mean(), "kl_k3": rl.token_mean_kl(ro.logprobs_BxN, ro.ref_logprobs_BxN, ro.mask_BxN),
        "entropy": first["entropy"], "response_length": ro.mask_BxN.sum(axis=1).mean(),
        "eos_fraction": ro.ended_with_eos_B.mean(), "grad_norm": first["grad_norm"],
        "nonfinite_reward": jnp.any(rl.nonfinite_rows(ro.rewards_B)).astype(jnp.float32),
    }
    return trainable, opt_state, rl_state, metrics
