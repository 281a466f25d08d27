"""The advantage estimators the RL step chooses by name: each against hand-computed numbers."""

import math

import jax.numpy as jnp
import numpy as np
import pytest

from pe_rlhf import rl


class Options:  # the fields of RLConfig an estimator may read
    baseline_decay = None


def estimate(name, sampled_S, greedy_P=None, k=1, baseline=0.0, **options):
    cfg = Options()
    cfg.__dict__.update(options)
    scores = rl.Scores(sampled_S=jnp.asarray(sampled_S, jnp.float32),
                       greedy_P=None if greedy_P is None else jnp.asarray(greedy_P, jnp.float32), samples_per_prompt=k)
    adv, logged, new = rl.ADVANTAGES[name].estimate(scores, cfg, jnp.asarray(baseline, jnp.float32))
    return np.asarray(adv), float(logged), float(new)


def test_the_registry_names_the_sequence_level_estimators():
    assert list(rl.ADVANTAGES) == ["remax", "reinforce", "rloo", "grpo"]
    assert [name for name, e in rl.ADVANTAGES.items() if e.greedy] == ["remax"]
    assert {name: e.min_samples for name, e in rl.ADVANTAGES.items()} == {"remax": 1, "reinforce": 1, "rloo": 2,
                                                                          "grpo": 2}


def test_remax_subtracts_each_prompts_greedy_score_from_its_samples():
    # prompt 0: samples 1, 2, greedy 0.5; prompt 1: samples 3, 4, greedy 3
    adv, logged, new = estimate("remax", [1, 2, 3, 4], greedy_P=[0.5, 3], k=2, baseline=7.0)
    np.testing.assert_allclose(adv, [0.5, 1.5, 0.0, 1.0])
    assert logged == 1.75 and new == 7.0  # the mean greedy score; the carried baseline untouched


def test_reinforce_without_and_with_a_moving_average_baseline():
    adv, logged, new = estimate("reinforce", [1, 3], baseline=5.0)
    np.testing.assert_allclose(adv, [1, 3])
    assert logged == 0.0 and new == 5.0
    adv, logged, new = estimate("reinforce", [1, 3], baseline=1.0, baseline_decay=0.9)
    np.testing.assert_allclose(adv, [0, 2])  # minus the baseline from before this batch
    assert logged == 1.0 and new == pytest.approx(0.9 * 1.0 + 0.1 * 2.0)


def test_rloo_and_grpo_work_within_each_prompts_samples():
    adv, logged, new = estimate("rloo", [1, 3, 2, 2], k=2, baseline=4.0)
    np.testing.assert_allclose(adv, [-2, 2, 0, 0])  # minus the other sample of the same prompt
    assert logged == 2.0 and new == 4.0
    adv, logged, _ = estimate("grpo", [1, 3, 2, 2], k=2)
    s = math.sqrt(2.0)  # sample std (ddof 1) of (1, 3)
    np.testing.assert_allclose(adv, [-1 / (s + 1e-6), 1 / (s + 1e-6), 0, 0], rtol=1e-6)
    assert logged == 2.0


def test_scores_by_prompt_are_prompt_major():
    scores = rl.Scores(sampled_S=jnp.arange(6.0), samples_per_prompt=3)
    np.testing.assert_array_equal(np.asarray(scores.by_prompt()), [[0, 1, 2], [3, 4, 5]])
