"""The sequence-level advantage estimators an RL step chooses by name: `ADVANTAGES[cfg.algorithm]`.

Every estimator has one signature,

    estimate(scores: Scores, cfg, baseline) -> (advantages_S, baseline_reward, new_baseline)

`scores` are a rollout's per-sequence scores (reward, minus beta * KL when the KL is
folded into the reward); `cfg` the step's options (`train.rollout.RLConfig`, read for
the estimator's own options such as `baseline_decay`); `baseline` the scalar carried
from step to step (REINFORCE's moving average; the others hand it back unchanged).
`baseline_reward` is what the step logs as the baseline. The math is in
`advantages.py`; here each estimator only lays out its inputs.

Adding an estimator: a function with that signature and one line in `ADVANTAGES`;
`RLConfig.algorithm` accepts every key of it (and "ppo", whose token-level GAE
step is `train.ppo`).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp

from pe_rlhf.rl.advantages import (
    grpo_advantages,
    moving_average_baseline_advantages,
    reinforce_advantages,
    remax_advantages,
    rloo_advantages,
)


@dataclasses.dataclass(frozen=True)
class Scores:
    """A rollout's per-sequence scores as an estimator sees them.

    `sampled_S` holds S = P * K scores, prompt-major (the K samples of prompt 0, then of
    prompt 1, ...); `greedy_P` the score of each prompt's greedy response, for an estimator
    registered with `greedy=True` (None otherwise).
    """

    sampled_S: jax.Array
    greedy_P: jax.Array | None = None
    samples_per_prompt: int = 1

    def by_prompt(self) -> jax.Array:
        """The sampled scores as [P, K]: row p holds prompt p's K samples."""
        return self.sampled_S.reshape(-1, self.samples_per_prompt)


Estimate = Callable[[Scores, Any, jax.Array], tuple[jax.Array, jax.Array, jax.Array]]


@dataclasses.dataclass(frozen=True)
class Estimator:
    """An advantage estimator and what its rollout must hold.

    `greedy`: one greedy response per prompt besides the samples (ReMax's baseline), decoded in
    the same sampler call. `min_samples`: the smallest `samples_per_prompt` it is defined for.
    """

    estimate: Estimate
    greedy: bool = False
    min_samples: int = 1


def remax_estimate(scores: Scores, cfg, baseline):
    """ReMax: each sample's score minus its prompt's greedy score; logs the mean greedy score."""
    greedy_S = jnp.repeat(scores.greedy_P, scores.samples_per_prompt)  # prompt-major rows
    return remax_advantages(scores.sampled_S, greedy_S), scores.greedy_P.mean(), baseline


def reinforce_estimate(scores: Scores, cfg, baseline):
    """REINFORCE: the score itself, or minus a moving average of past batches' means (`cfg.baseline_decay`)."""
    if cfg.baseline_decay is None:
        return reinforce_advantages(scores.sampled_S), jnp.zeros(()), baseline
    advantages_S, new_baseline = moving_average_baseline_advantages(scores.sampled_S, baseline,
                                                                    decay=cfg.baseline_decay)
    return advantages_S, baseline, new_baseline


def rloo_estimate(scores: Scores, cfg, baseline):
    """RLOO: each sample's score minus the mean of its prompt's other K - 1; logs the batch's mean score."""
    scores_PxK = scores.by_prompt()
    return rloo_advantages(scores_PxK).reshape(-1), scores_PxK.mean(), baseline


def grpo_estimate(scores: Scores, cfg, baseline):
    """GRPO: scores normalised within each prompt's K samples; logs the batch's mean score."""
    scores_PxK = scores.by_prompt()
    return grpo_advantages(scores_PxK).reshape(-1), scores_PxK.mean(), baseline


ADVANTAGES: dict[str, Estimator] = {
    "remax": Estimator(remax_estimate, greedy=True),
    "reinforce": Estimator(reinforce_estimate),
    "rloo": Estimator(rloo_estimate, min_samples=2),
    "grpo": Estimator(grpo_estimate, min_samples=2),
}
