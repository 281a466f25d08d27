"""What every RL step shares: its options, its models, and the rollout they make, as one named record.

`rollout(m, prompts, ...)` samples responses (ReMax's greedy rows in the same sampler
call) and scores them with the reward model or reward function; it is the first
section of `policy.rl_step` (ReMax, REINFORCE, RLOO, GRPO), of `ppo.ppo_step`, and
the RL loop's evaluation. The steps hand the `Rollout` record on to their loss:

    ro = with_anchor(m, rollout(m, prompt_PxT, prompt_mask_PxT, rng, cfg.sampling, ...))
    sampled, greedy = ro.split()                # the sampled rows; ReMax's greedy rows (else None)
    logp_SxN, entropy_SxN = sampled.logprobs_under(policy)

Rows are prompt-major: the K samples of prompt 0, then of prompt 1, ...; then, with
`greedy=True`, one greedy row per prompt.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
from flax import nnx, struct

from pe_rlhf import rl
from pe_rlhf.config_checks import boolean, check_fields, choice, integer, number, optional
from pe_rlhf.models.heads import RewardModel
from pe_rlhf.models.lora import use_adapters
from pe_rlhf.models.transformer import Transformer
from pe_rlhf.sampling.sampler import SamplingConfig, sample_traced

ALGORITHMS = (*rl.ADVANTAGES, "ppo")  # the estimators `rl.ADVANTAGES` ships with, and PPO (`ppo.py`)


@dataclasses.dataclass(frozen=True)
class RLConfig:
    """Options of the RL step.

    kl_beta = 0.05 with the KL folded into the reward follows ReMax's released
    training script (liziniu/ReMax, `--kl_ctl 0.05`); `kl_in_reward=False` uses a
    k3 loss term instead. `samples_per_prompt` is k for RLOO/GRPO (>= 2) and may
    also be > 1 for ReMax/REINFORCE (each sample gets the same greedy baseline).
    `algorithm` names an estimator of `rl.ADVANTAGES`, or "ppo".
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
        check_fields(self, algorithm=choice(*rl.ADVANTAGES, "ppo"), samples_per_prompt=integer(ge=1),
                     baseline_decay=optional(number(ge=0, le=1)), kl_beta=number(ge=0), kl_in_reward=boolean(),
                     max_new_tokens=integer(ge=1), temperature=number(ge=0), top_k=optional(integer(ge=1)),
                     top_p=optional(number(gt=0, le=1)), loss_normalization=choice("sequence", "token"),
                     ppo_epochs=integer(ge=1), value_coef=number(ge=0), clip_epsilon=number(gt=0),
                     value_clip_epsilon=number(gt=0), gamma=number(ge=0, le=1), lam=number(ge=0, le=1))
        need = self.estimator.min_samples if self.estimator is not None else 1
        if self.samples_per_prompt < need:
            raise ValueError(f"RLConfig.algorithm={self.algorithm!r} needs samples_per_prompt >= {need}, "
                             f"got {self.samples_per_prompt}")

    @property
    def estimator(self) -> rl.Estimator | None:
        """The advantage estimator `algorithm` names (None for PPO, whose advantages are GAE's)."""
        return rl.ADVANTAGES.get(self.algorithm)

    @property
    def greedy_baseline(self) -> bool:
        return self.estimator is not None and self.estimator.greedy

    @property
    def sampling(self) -> SamplingConfig:
        return SamplingConfig(max_new_tokens=self.max_new_tokens, temperature=self.temperature, top_k=self.top_k,
                              top_p=self.top_p)


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


@struct.dataclass
class Rollout:
    """Responses to prompts, one row each, and what was measured of them (no gradient flows through any).

    Rows [0, num_sampled) were sampled (prompt-major); the rest, if any, are greedy rows, one per
    prompt (`greedy_B`). `ref_logprobs_BxN` and `kl_B` are None until `with_anchor` fills them.
    """

    prompt_BxT: jax.Array  # the row's prompt, left-padded
    prompt_mask_BxT: jax.Array  # bool
    tokens_BxN: jax.Array  # response tokens; pad_id after the end
    mask_BxN: jax.Array  # bool: real response tokens, the EOS included
    logprobs_BxN: jax.Array  # log p of each token under the policy that sampled it; 0 on padding
    ended_with_eos_B: jax.Array
    greedy_B: jax.Array  # bool: the row was decoded greedily (ReMax's baseline)
    rewards_B: jax.Array  # float32
    ref_logprobs_BxN: jax.Array | None = None  # log p of each token under the KL anchor
    kl_B: jax.Array | None = None  # sequence KL to the anchor: sum over tokens of log p - log p_anchor
    num_sampled: int = struct.field(pytree_node=False, default=0)

    @property
    def prompt_len(self) -> int:
        return self.prompt_BxT.shape[1]

    @property
    def seq_BxL(self):
        """Prompt and response, [B, T + N]."""
        return jnp.concatenate([self.prompt_BxT, self.tokens_BxN], axis=1)

    @property
    def seq_mask_BxL(self):
        return jnp.concatenate([self.prompt_mask_BxT, self.mask_BxN], axis=1)

    def logprobs_under(self, model: Transformer):
        """(log p, entropy) of each response token under `model`, [B, N] each (`response_logprobs`)."""
        return response_logprobs(model, self.seq_BxL, self.seq_mask_BxL, self.prompt_len, self.tokens_BxN)

    def split(self) -> tuple[Rollout, Rollout | None]:
        """(the sampled rows, the greedy rows or None when there are none)."""
        n = self.num_sampled
        sampled = jax.tree.map(lambda x: x[:n], self)
        if n == self.tokens_BxN.shape[0]:
            return sampled, None
        return sampled, jax.tree.map(lambda x: x[n:], self).replace(num_sampled=0)


def rollout(m: RLModules, prompt_PxT, prompt_mask_PxT, rng, sampling: SamplingConfig, *,
            reward_fn: Callable | None, eos_ids: tuple[int, ...], pad_id: int, samples_per_prompt: int = 1,
            greedy: bool = False, use_anchor: bool = False) -> Rollout:
    """`samples_per_prompt` responses to each prompt (plus one greedy each when `greedy`), in one sampler
    call, by the policy (or, `use_anchor`, the anchor), and their rewards: `m.reward` when there is a
    reward model, else `reward_fn(prompt_BxT, prompt_mask_BxT, response_BxN, response_mask_BxN)`.

    For use inside a jit-compiled step; `sampling` is static (temperature 0 decodes every row greedily).
    """
    prompt_mask_PxT = prompt_mask_PxT.astype(bool)
    p = prompt_PxT.shape[0]
    s = p * samples_per_prompt

    # SAMPLE: the sampled rows, prompt-major, then the greedy rows
    rows_RxT = jnp.repeat(prompt_PxT, samples_per_prompt, axis=0)
    rows_mask_RxT = jnp.repeat(prompt_mask_PxT, samples_per_prompt, axis=0)
    greedy_R = jnp.zeros((s,), bool)
    if greedy:
        rows_RxT = jnp.concatenate([rows_RxT, prompt_PxT])
        rows_mask_RxT = jnp.concatenate([rows_mask_RxT, prompt_mask_PxT])
        greedy_R = jnp.concatenate([greedy_R, jnp.ones((p,), bool)])
    with (m.as_anchor() if use_anchor else m.as_policy()) as model:
        out = sample_traced(model, rows_RxT, rows_mask_RxT, greedy_R, rng, eos_ids, pad_id, sampling)

    # REWARD
    if m.reward is not None:
        reward_R = m.reward(jnp.concatenate([rows_RxT, out.tokens_BxN], axis=1),
                            jnp.concatenate([rows_mask_RxT, out.mask_BxN], axis=1))
    else:
        reward_R = reward_fn(rows_RxT, rows_mask_RxT, out.tokens_BxN, out.mask_BxN)
    return Rollout(prompt_BxT=rows_RxT, prompt_mask_BxT=rows_mask_RxT, tokens_BxN=out.tokens_BxN,
                   mask_BxN=out.mask_BxN, logprobs_BxN=out.logprobs_BxN, ended_with_eos_B=out.ended_with_eos_B,
                   greedy_B=greedy_R, rewards_B=jax.lax.stop_gradient(reward_R.astype(jnp.float32)), num_sampled=s)


def with_anchor(m: RLModules, ro: Rollout) -> Rollout:
    """`ro` with `ref_logprobs_BxN`, each response token's log-prob under the KL anchor (the backbone with
    adapters off, or the frozen copy), in one forward over every row without gradient, and `kl_B`, each
    row's KL to the anchor (`rl.sequence_kl`)."""
    with m.as_anchor() as anchor:
        ref_logp_BxN, _ = ro.logprobs_under(anchor)
    ref_logp_BxN = jax.lax.stop_gradient(ref_logp_BxN)
    return ro.replace(ref_logprobs_BxN=ref_logp_BxN, kl_B=rl.sequence_kl(ro.logprobs_BxN, ref_logp_BxN, ro.mask_BxN))
