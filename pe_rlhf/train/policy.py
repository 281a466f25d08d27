"""The policy-optimisation step: rollout -> anchor log-probs -> advantages -> adapter update.

One pure function, jit-compiled end to end. In parameter-efficient mode one
backbone serves three roles:

- the policy: the backbone with the `policy` LoRA adapter on;
- the KL anchor: the same backbone with every adapter off (no second copy);
- the reward model: the same backbone with the `reward` adapter and a scalar head
  (when policy and RM share a base checkpoint), or a separate frozen RewardModel,
  or a programmatic reward function of the tokens.

Algorithms (REINFORCE with an optional moving-average baseline, ReMax, RLOO, GRPO)
differ only in which rollouts they make and in the advantage estimator, chosen by
name from `rl.ADVANTAGES`. ReMax's sampled and greedy rollouts go through one
sampler call (`rollout.rollout`). PPO, with its value model and GAE, is `ppo.py`.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from pe_rlhf import rl
from pe_rlhf.train.optim import guard_nonfinite, guarded_update, nonfinite_updates
from pe_rlhf.train.ppo import ppo_step
from pe_rlhf.train.precision import Precision
from pe_rlhf.train.rollout import (
    ALGORITHMS,
    RLConfig,
    RLModules,
    Rollout,
    response_logprobs,
    rollout,
    with_anchor,
)


def _score_B(part: Rollout, cfg: RLConfig):
    """What the estimator sees of each row: its reward, minus beta * its KL when the KL is in the reward."""
    return part.rewards_B - cfg.kl_beta * part.kl_B if cfg.kl_in_reward else part.rewards_B


def rl_step(trainable, opt_state, frozen, rl_state, batch, rng, *, graphdef, tx: optax.GradientTransformation,
            cfg: RLConfig, reward_fn: Callable | None, eos_ids: tuple[int, ...], pad_id: int,
            precision: Precision = Precision()):
    """One policy update. `rl_state` carries the moving-average baseline; returns the new one too.

    With a mixed `precision`, `trainable` holds fp32 masters; rollout and loss run on their compute copy.
    """
    if cfg.algorithm == "ppo":
        return ppo_step(trainable, opt_state, frozen, rl_state, batch, rng, graphdef=graphdef, tx=tx, cfg=cfg,
                        reward_fn=reward_fn, eos_ids=eos_ids, pad_id=pad_id, precision=precision)
    estimator = cfg.estimator  # rl.ADVANTAGES[cfg.algorithm]
    m: RLModules = nnx.merge(graphdef, precision.cast(trainable), frozen)

    # ROLLOUT: k sampled continuations per prompt, plus one greedy per prompt for ReMax, in one call; rewards.
    ro = rollout(m, batch["prompt_BxT"], batch["prompt_mask_BxT"], rng, cfg.sampling, reward_fn=reward_fn,
                 eos_ids=eos_ids, pad_id=pad_id, samples_per_prompt=cfg.samples_per_prompt,
                 greedy=estimator.greedy)

    # KL TO THE ANCHOR (the backbone with adapters off), every row in one forward
    ro = with_anchor(m, ro)
    sampled, greedy = ro.split()

    # ADVANTAGE
    scores = rl.Scores(sampled_S=_score_B(sampled, cfg), greedy_P=None if greedy is None else _score_B(greedy, cfg),
                       samples_per_prompt=cfg.samples_per_prompt)
    adv_S, baseline_reward, new_baseline = estimator.estimate(scores, cfg, rl_state["baseline"])
    adv_S = jax.lax.stop_gradient(adv_S)

    # UPDATE: on the sampled rows
    pg_loss = (rl.sequence_policy_gradient_loss if cfg.loss_normalization == "sequence"
               else rl.token_mean_policy_gradient_loss)

    def loss_fn(trainable):
        m = nnx.merge(graphdef, precision.cast(trainable), frozen)
        with m.as_policy() as policy:
            logp_SxN, entropy_SxN = sampled.logprobs_under(policy)
        loss = pg_loss(adv_S, logp_SxN, sampled.mask_BxN)
        kl_loss = rl.token_mean_kl(logp_SxN, sampled.ref_logprobs_BxN, sampled.mask_BxN)
        if not cfg.kl_in_reward:
            loss = loss + cfg.kl_beta * kl_loss
        return loss, {"entropy": rl.masked_mean(entropy_SxN, sampled.mask_BxN), "kl_k3": kl_loss}

    (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(trainable)
    trainable, opt_state = guarded_update(tx, grads, opt_state, trainable, loss)

    bad = jnp.any(rl.nonfinite_rows(ro.rewards_B))  # greedy rows too: a bad baseline spoils the advantages
    metrics = {
        "loss": loss,
        "reward_mean": sampled.rewards_B.mean(),
        "reward_std": sampled.rewards_B.std(),
        "baseline_reward": baseline_reward,
        "advantage_mean": adv_S.mean(),
        "advantage_std": adv_S.std(),
        "kl": sampled.kl_B.mean(),
        "kl_k3": aux["kl_k3"],
        "entropy": aux["entropy"],
        "response_length": sampled.mask_BxN.sum(axis=1).mean(),
        "eos_fraction": sampled.ended_with_eos_B.mean(),
        "grad_norm": optax.global_norm(grads),
        "nonfinite_reward": bad.astype(jnp.float32),
    }
    new_state = {"baseline": jnp.where(bad, rl_state["baseline"], new_baseline)}
    return trainable, opt_state, new_state, metrics


def skipped_steps(opt_state) -> int:
    """How many updates `guard_nonfinite` has skipped so far."""
    return nonfinite_updates(opt_state)[1]


# RLConfig, RLModules, ALGORITHMS and response_logprobs live in rollout.py, shared with ppo.py; named here too
# for the callers that import them from this module.
__all__ = ["ALGORITHMS", "RLConfig", "RLModules", "guard_nonfinite", "ppo_step", "response_logprobs", "rl_step",
           "skipped_steps"]
