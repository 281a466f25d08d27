"""The policy-optimisation step: rollout -> rewards -> anchor log-probs -> advantages -> adapter update.

One pure function, jit-compiled end to end. In parameter-efficient mode one
backbone serves three roles:

- the policy: the backbone with the `policy` LoRA adapter on;
- the KL anchor: the same backbone with every adapter off (no second copy);
- the reward model: the same backbone with the `reward` adapter and a scalar head
  (when policy and RM share a base checkpoint), or a separate frozen RewardModel,
  or a programmatic reward function of the tokens.

Algorithms (REINFORCE with an optional moving-average baseline, ReMax, RLOO, GRPO)
differ only in which rollouts they make and in the advantage function from
`pe_rlhf.rl`. ReMax's sampled and greedy rollouts go through one sampler call.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from pe_rlhf import rl
from pe_rlhf.config_checks import boolean, check_fields, choice, integer, number, optional
from pe_rlhf.models.heads import RewardModel
from pe_rlhf.models.lora import use_adapters
from pe_rlhf.models.transformer import Transformer
from pe_rlhf.sampling.sampler import SamplingConfig, sample_traced
from pe_rlhf.train.optim import guard_nonfinite, nonfinite_updates  # noqa: F401 (guard_nonfinite re-exported)

ALGORITHMS = ("remax", "reinforce", "rloo", "grpo", "ppo")


@dataclasses.dataclass(frozen=True)
class RLConfig:
    """Options of the RL step.

    kl_beta = 0.05 with the KL folded into the reward follows ReMax's released
    training script (liziniu/ReMax, `--kl_ctl 0.05`); `kl_in_reward=False` uses a
    k3 loss term instead. `samples_per_prompt` is k for RLOO/GRPO (>= 2) and may
    also be > 1 for ReMax/REINFORCE (each sample gets the same greedy baseline).
    """

    algorithm: str = "remax"
    samples_per_prompt: int = 1
    baseline_decay: float | None = None  # REINFORCE moving-average baseline; None: no baseline
    kl_beta: float = 0.05
    kl_in_reward: bool = True
    max_new_tokens: int = 32
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    loss_normalization: str = "sequence"  # sequence: sum over tokens, mean over sequences | token: token mean
    # PPO (the baseline ReMax is compared against): defaults of openai/lm-human-preferences' PpoHParams
    ppo_epochs: int = 4
    value_coef: float = 0.1
    clip_epsilon: float = rl.PPOOptions.clip_epsilon
    value_clip_epsilon: float = rl.PPOOptions.value_clip_epsilon
    gamma: float = rl.PPOOptions.gamma
    lam: float = rl.PPOOptions.lam

    def __post_init__(self):
        check_fields(self, algorithm=choice(*ALGORITHMS), samples_per_prompt=integer(ge=1),
                     baseline_decay=optional(number(ge=0, le=1)), kl_beta=number(ge=0), kl_in_reward=boolean(),
                     max_new_tokens=integer(ge=1), temperature=number(ge=0), top_k=optional(integer(ge=1)),
                     top_p=optional(number(gt=0, le=1)), loss_normalization=choice("sequence", "token"),
                     ppo_epochs=integer(ge=1), value_coef=number(ge=0), clip_epsilon=number(gt=0),
                     value_clip_epsilon=number(gt=0), gamma=number(ge=0, le=1), lam=number(ge=0, le=1))
        if self.algorithm in ("rloo", "grpo") and self.samples_per_prompt < 2:
            raise ValueError(f"RLConfig.algorithm={self.algorithm!r} needs samples_per_prompt >= 2, "
                             f"got {self.samples_per_prompt}")

    @property
    def greedy_baseline(self) -> bool:
        return self.algorithm == "remax"


class RLModules(nnx.Module):
    """What the RL step needs, in one graph so shared weights are stored once.

    `policy_adapters` names the adapters that make the policy (('policy',) with
    LoRA; () when the policy is fully tuned). `anchor` is None when the anchor is
    the policy backbone with its adapters off. `reward` is None for programmatic
    rewards.
    """

    def __init__(self, policy: Transformer, *, policy_adapters: tuple[str, ...] = ("policy",),
                 anchor: Transformer | None = None, reward: RewardModel | None = None,
                 value: RewardModel | None = None):
        self.policy = policy
        self.policy_adapters = tuple(policy_adapters)
        self.anchor = anchor
        self.reward = reward
        self.value = value

    @contextlib.contextmanager
    def as_policy(self):
        with use_adapters(self.policy, *self.policy_adapters):
            yield self.policy

    @contextlib.contextmanager
    def as_anchor(self):
        if self.anchor is not None:
            yield self.anchor
        else:
            with use_adapters(self.policy):
                yield self.policy


def response_logprobs(model: Transformer, seq_BxL, seq_mask_BxL, prompt_len: int, tokens_BxN, *,
                      chunk: int = 16):
    """(log p(token), entropy) of each response token, [B, N] each, without a [B, N, V] buffer.

    The vocabulary projection, log-sum-exp and gather run over `chunk` response positions at a
    time under `jax.checkpoint`, so forward and backward hold one [B, chunk, V] block instead of
    the whole [B, N, V] (on a 262k vocabulary, the largest buffers of an RL step). Equal to
    `token_logprobs` and `token_entropy` of the full logits up to float rounding.
    """
    h_BxLxD, _ = model.hidden(seq_BxL, input_mask_BxT=seq_mask_BxL)
    h_BxNxD = h_BxLxD[:, prompt_len - 1:-1]
    b, n, d = h_BxNxD.shape
    c = min(chunk, n)
    pad = (-n) % c
    h_BxNxD = jnp.pad(h_BxNxD, ((0, 0), (0, pad), (0, 0)))
    tok_BxN = jnp.pad(tokens_BxN, ((0, 0), (0, pad)))

    @jax.checkpoint
    def one(h_BxCxD, tok_BxC):
        logits_BxCxV = model.logits(h_BxCxD)
        lse_BxC = jax.nn.logsumexp(logits_BxCxV, axis=-1)
        picked_BxC = jnp.take_along_axis(logits_BxCxV, tok_BxC[..., None], axis=-1)[..., 0]
        probs_BxCxV = jnp.exp(logits_BxCxV - lse_BxC[..., None])
        entropy_BxC = lse_BxC - jnp.sum(probs_BxCxV * logits_BxCxV, axis=-1)
        return picked_BxC - lse_BxC, entropy_BxC

    chunks = (h_BxNxD.reshape(b, -1, c, d).swapaxes(0, 1), tok_BxN.reshape(b, -1, c).swapaxes(0, 1))
    logp, entropy = jax.lax.map(lambda x: one(*x), chunks)  # [n/c, B, c]
    unchunk = lambda x: x.swapaxes(0, 1).reshape(b, -1)[:, :n]
    return unchunk(logp), unchunk(entropy)


def _advantages(cfg: RLConfig, score_R, num_sampled: int, baseline):
    """(advantages of the sampled rows, baseline reward for metrics, new moving-average baseline)."""
    score_S = score_R[:num_sampled]
    if cfg.algorithm == "remax":
        greedy_P = score_R[num_sampled:]
        greedy_S = jnp.repeat(greedy_P, cfg.samples_per_prompt)  # prompt-major rows
        return rl.remax_advantages(score_S, greedy_S), greedy_P.mean(), baseline
    if cfg.algorithm == "reinforce":
        if cfg.baseline_decay is None:
            return rl.reinforce_advantages(score_S), jnp.zeros(()), baseline
        adv, new = rl.moving_average_baseline_advantages(score_S, baseline, decay=cfg.baseline_decay)
        return adv, baseline, new
    score_PxK = score_S.reshape(-1, cfg.samples_per_prompt)
    fn = rl.rloo_advantages if cfg.algorithm == "rloo" else rl.grpo_advantages
    return fn(score_PxK).reshape(-1), score_PxK.mean(), baseline


def rl_step(trainable, opt_state, frozen, rl_state, batch, rng, *, graphdef, tx: optax.GradientTransformation,
            cfg: RLConfig, reward_fn: Callable | None, eos_ids: tuple[int, ...], pad_id: int):
    """One policy update. `rl_state` carries the moving-average baseline; returns the new one too."""
    if cfg.algorithm == "ppo":
        return ppo_step(trainable, opt_state, frozen, rl_state, batch, rng, graphdef=graphdef, tx=tx, cfg=cfg,
                        reward_fn=reward_fn, eos_ids=eos_ids, pad_id=pad_id)
    m: RLModules = nnx.merge(graphdef, trainable, frozen)
    prompt_PxT, prompt_mask_PxT = batch["prompt_BxT"], batch["prompt_mask_BxT"].astype(bool)
    p, t = prompt_PxT.shape
    k = cfg.samples_per_prompt
    s = p * k  # sampled rows, prompt-major

    # ROLLOUT: k sampled continuations per prompt, plus one greedy per prompt for ReMax, in one call.
    rows_RxT = jnp.repeat(prompt_PxT, k, axis=0)
    rows_mask_RxT = jnp.repeat(prompt_mask_PxT, k, axis=0)
    greedy_R = jnp.zeros((s,), bool)
    if cfg.greedy_baseline:
        rows_RxT = jnp.concatenate([rows_RxT, prompt_PxT])
        rows_mask_RxT = jnp.concatenate([rows_mask_RxT, prompt_mask_PxT])
        greedy_R = jnp.concatenate([greedy_R, jnp.ones((p,), bool)])
    scfg = SamplingConfig(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_k=cfg.top_k,
                          top_p=cfg.top_p)
    with m.as_policy() as policy:
        out = sample_traced(policy, rows_RxT, rows_mask_RxT, greedy_R, rng, eos_ids, pad_id, scfg)
    resp_mask_RxN = out.mask_BxN
    seq_RxL = jnp.concatenate([rows_RxT, out.tokens_BxN], axis=1)
    seq_mask_RxL = jnp.concatenate([rows_mask_RxT, resp_mask_RxN], axis=1)

    # REWARD
    if m.reward is not None:
        reward_R = m.reward(seq_RxL, seq_mask_RxL)
    else:
        reward_R = reward_fn(rows_RxT, rows_mask_RxT, out.tokens_BxN, resp_mask_RxN)
    reward_R = jax.lax.stop_gradient(reward_R.astype(jnp.float32))

    # KL TO THE ANCHOR (the backbone with adapters off)
    with m.as_anchor() as anchor:
        ref_logp_RxN, _ = response_logprobs(anchor, seq_RxL, seq_mask_RxL, t, out.tokens_BxN)
    ref_logp_RxN = jax.lax.stop_gradient(ref_logp_RxN)
    kl_R = rl.sequence_kl(out.logprobs_BxN, ref_logp_RxN, resp_mask_RxN)

    # ADVANTAGE
    score_R = reward_R - cfg.kl_beta * kl_R if cfg.kl_in_reward else reward_R
    adv_S, baseline_reward, new_baseline = _advantages(cfg, score_R, s, rl_state["baseline"])
    adv_S = jax.lax.stop_gradient(adv_S)

    # UPDATE
    seq_SxL, seq_mask_SxL, tok_SxN, mask_SxN = (seq_RxL[:s], seq_mask_RxL[:s], out.tokens_BxN[:s],
                                                resp_mask_RxN[:s])
    pg_loss = (rl.sequence_policy_gradient_loss if cfg.loss_normalization == "sequence"
               else rl.token_mean_policy_gradient_loss)

    def loss_fn(trainable):
        m = nnx.merge(graphdef, trainable, frozen)
        with m.as_policy() as policy:
            logp_SxN, entropy_SxN = response_logprobs(policy, seq_SxL, seq_mask_SxL, t, tok_SxN)
        loss = pg_loss(adv_S, logp_SxN, mask_SxN)
        kl_loss = rl.token_mean_kl(logp_SxN, ref_logp_RxN[:s], mask_SxN)
        if not cfg.kl_in_reward:
            loss = loss + cfg.kl_beta * kl_loss
        return loss, {"entropy": rl.masked_mean(entropy_SxN, mask_SxN), "kl_k3": kl_loss}

    (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(trainable)
    updates, opt_state = tx.update(grads, opt_state, trainable)
    trainable = optax.apply_updates(trainable, updates)

    lengths_S = mask_SxN.sum(axis=1)
    bad = jnp.any(rl.nonfinite_rows(reward_R))
    metrics = {
        "loss": loss,
        "reward_mean": reward_R[:s].mean(),
        "reward_std": reward_R[:s].std(),
        "baseline_reward": baseline_reward,
        "advantage_mean": adv_S.mean(),
        "advantage_std": adv_S.std(),
        "kl": kl_R[:s].mean(),
        "kl_k3": aux["kl_k3"],
        "entropy": aux["entropy"],
        "response_length": lengths_S.mean(),
        "eos_fraction": out.ended_with_eos_B[:s].mean(),
        "grad_norm": optax.global_norm(grads),
        "nonfinite_reward": bad.astype(jnp.float32),
    }
    new_state = {"baseline": jnp.where(bad, rl_state["baseline"], new_baseline)}
    return trainable, opt_state, new_state, metrics


def ppo_step(trainable, opt_state, frozen, rl_state, batch, rng, *, graphdef, tx: optax.GradientTransformation,
             cfg: RLConfig, reward_fn: Callable | None, eos_ids: tuple[int, ...], pad_id: int):
    """PPO with a value model (a `value` adapter + per-token head on the same backbone in LoRA mode).

    Per-token rewards are -beta * KL to the anchor with the sequence reward added at the last real
    token; advantages by GAE over the value model's estimates, whitened; `ppo_epochs` full-batch
    epochs of the clipped policy loss + value_coef * the clipped value loss.
    """
    m: RLModules = nnx.merge(graphdef, trainable, frozen)
    prompt_PxT, prompt_mask_PxT = batch["prompt_BxT"], batch["prompt_mask_BxT"].astype(bool)
    p, t = prompt_PxT.shape
    rows_SxT = jnp.repeat(prompt_PxT, cfg.samples_per_prompt, axis=0)
    rows_mask_SxT = jnp.repeat(prompt_mask_PxT, cfg.samples_per_prompt, axis=0)
    s = rows_SxT.shape[0]

    # ROLLOUT
    scfg = SamplingConfig(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_k=cfg.top_k,
                          top_p=cfg.top_p)
    with m.as_policy() as policy:
        out = sample_traced(policy, rows_SxT, rows_mask_SxT, jnp.zeros((s,), bool), rng, eos_ids, pad_id, scfg)
    mask_SxN, tok_SxN, old_logp_SxN = out.mask_BxN, out.tokens_BxN, out.logprobs_BxN
    seq_SxL = jnp.concatenate([rows_SxT, tok_SxN], axis=1)
    seq_mask_SxL = jnp.concatenate([rows_mask_SxT, mask_SxN], axis=1)

    # REWARD, KL, VALUES
    reward_S = m.reward(seq_SxL, seq_mask_SxL) if m.reward is not None else reward_fn(
        rows_SxT, rows_mask_SxT, tok_SxN, mask_SxN)
    reward_S = jax.lax.stop_gradient(reward_S.astype(jnp.float32))
    with m.as_anchor() as anchor:
        ref_logp_SxN = jax.lax.stop_gradient(response_logprobs(anchor, seq_SxL, seq_mask_SxL, t, tok_SxN)[0])
    kl_S = rl.sequence_kl(old_logp_SxN, ref_logp_SxN, mask_SxN)
    old_values_SxN = jax.lax.stop_gradient(m.value.token_values(seq_SxL, seq_mask_SxL, t))

    # ADVANTAGE (GAE)
    token_rewards_SxN = rl.kl_penalized_token_rewards(reward_S, old_logp_SxN, ref_logp_SxN, mask_SxN,
                                                      beta=cfg.kl_beta)
    adv_SxN, returns_SxN = rl.gae_advantages(token_rewards_SxN, old_values_SxN, mask_SxN, gamma=cfg.gamma,
                                             lam=cfg.lam)
    adv_SxN = jax.lax.stop_gradient(rl.masked_whiten(adv_SxN, mask_SxN))
    returns_SxN = jax.lax.stop_gradient(returns_SxN)

    # UPDATE: ppo_epochs passes over the rollout
    def loss_fn(trainable):
        m = nnx.merge(graphdef, trainable, frozen)
        with m.as_policy() as policy:
            logp_SxN, entropy_SxN = response_logprobs(policy, seq_SxL, seq_mask_SxL, t, tok_SxN)
        values_SxN = m.value.token_values(seq_SxL, seq_mask_SxL, t)
        pg = rl.ppo_clipped_policy_loss(adv_SxN, logp_SxN, old_logp_SxN, mask_SxN, clip_epsilon=cfg.clip_epsilon)
        vf = rl.ppo_clipped_value_loss(values_SxN, old_values_SxN, returns_SxN, mask_SxN,
                                       clip_epsilon=cfg.value_clip_epsilon)
        aux = {"policy_loss": pg, "value_loss": vf, "entropy": rl.masked_mean(entropy_SxN, mask_SxN),
               "clip_fraction": rl.ppo_clip_fraction(adv_SxN, logp_SxN, old_logp_SxN, mask_SxN,
                                                     clip_epsilon=cfg.clip_epsilon)}
        return pg + cfg.value_coef * vf, aux

    def epoch(carry, _):
        trainable, opt_state = carry
        (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(trainable)
        updates, opt_state = tx.update(grads, opt_state, trainable)
        return (optax.apply_updates(trainable, updates), opt_state), dict(aux, loss=loss,
                                                                          grad_norm=optax.global_norm(grads))

    (trainable, opt_state), per_epoch = jax.lax.scan(epoch, (trainable, opt_state), None, length=cfg.ppo_epochs)
    first = jax.tree.map(lambda x: x[0], per_epoch)  # metrics of the first epoch (on-policy)
    metrics = {
        "loss": first["loss"], "policy_loss": first["policy_loss"], "value_loss": first["value_loss"],
        "clip_fraction": jax.tree.map(lambda x: x[-1], per_epoch)["clip_fraction"],
        "reward_mean": reward_S.mean(), "reward_std": reward_S.std(),
        "baseline_reward": rl.masked_mean(old_values_SxN, mask_SxN),
        "advantage_mean": rl.masked_mean(adv_SxN, mask_SxN), "advantage_std": jnp.sqrt(rl.masked_var(adv_SxN, mask_SxN)),
        "kl": kl_S.mean(), "kl_k3": rl.token_mean_kl(old_logp_SxN, ref_logp_SxN, mask_SxN),
        "entropy": first["entropy"], "response_length": mask_SxN.sum(axis=1).mean(),
        "eos_fraction": out.ended_with_eos_B.mean(), "grad_norm": first["grad_norm"],
        "nonfinite_reward": jnp.any(rl.nonfinite_rows(reward_S)).astype(jnp.float32),
    }
    return trainable, opt_state, rl_state, metrics


def skipped_steps(opt_state) -> int:
    """How many updates `guard_nonfinite` has skipped so far."""
    return nonfinite_updates(opt_state)[1]
