"""How much of a reward model's judgement, and of a policy's gain, is length.

Reward models of summaries prefer longer ones, and RL against them lengthens summaries (Stiennon et al.,
2020, "Learning to summarize from human feedback"; Singhal et al., 2023, "A Long Way to Go: Investigating
Length Correlations in RLHF"). Two measurements:

- `rm_length_bias`: on held-out pairs, the correlation of a reward model's score with the response's
  length (over every response, and within pairs: score difference against length difference), and its
  pairwise accuracy on the pairs where the chosen response is the shorter one (a model that only rewards
  length gets those wrong) and on those where it is the longer one;
- `length_controlled_gain`: a policy's per-prompt judge gain over a baseline, regressed by least squares on
  the per-prompt change in length (`frontier.net_gain`): the intercept is the gain at unchanged length.

Lengths are whatever the caller counts (tokens in the experiments); ties in score count as wrong, as in
the reward models' `pairwise_accuracy`.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
from scipy import stats

from pe_rlhf.eval.frontier import net_gain
from pe_rlhf.eval.judge import rate_with_ci


def _pearson(x, y, confidence: float = 0.95) -> dict:
    """Pearson's r with its Fisher-z interval; nan when either side does not vary."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    if len(x) < 4 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return {"r": float("nan"), "ci": [float("nan"), float("nan")], "n": int(len(x))}
    result = stats.pearsonr(x, y)
    ci = result.confidence_interval(confidence)
    return {"r": float(result.statistic), "ci": [float(ci.low), float(ci.high)], "n": int(len(x))}


def rm_length_bias(chosen_scores_N, rejected_scores_N, chosen_lengths_N, rejected_lengths_N) -> dict:
    """A reward model's length bias on N held-out pairs, from its scores and the responses' lengths.

    - `length_correlation`: Pearson's r of score with length over all 2N responses, with its interval;
    - `length_correlation_within_pair`: r of (chosen - rejected) score with (chosen - rejected) length,
      which a prompt's own offset in score does not move;
    - `pairwise_accuracy`, and `accuracy_chosen_shorter` / `accuracy_chosen_longer` on the pairs whose chosen
      response is strictly shorter / longer than the rejected one (Wilson intervals; pairs of equal length
      are in neither); `chosen_longer_rate`: how often the humans chose the longer response.
    """
    sc, sr, lc, lr = (np.asarray(a, np.float64) for a in (chosen_scores_N, rejected_scores_N, chosen_lengths_N,
                                                             rejected_lengths_N))
    if not sc.shape == sr.shape == lc.shape == lr.shape or sc.ndim != 1 or not len(sc):
        raise ValueError(f"rm_length_bias: expected four equal-length 1-D arrays of N > 0 pairs, got shapes "
                         f"{sc.shape}, {sr.shape}, {lc.shape}, {lr.shape}")
    correct = sc > sr
    shorter, longer = lc < lr, lc > lr
    out = {"pairs": int(len(sc)),
           "length_correlation": _pearson(np.concatenate([sc, sr]), np.concatenate([lc, lr])),
           "length_correlation_within_pair": _pearson(sc - sr, lc - lr),
           "pairwise_accuracy": rate_with_ci(correct)}
    out["accuracy_chosen_shorter"] = rate_with_ci(correct[shorter])
    out["accuracy_chosen_longer"] = rate_with_ci(correct[longer])
    out["chosen_longer_rate"] = rate_with_ci(longer[shorter | longer])
    return out


def length_controlled_gain(gain_N, length_change_N: Sequence[float]) -> dict:
    """The per-prompt gain at unchanged length: `gain_N` (policy - baseline judge score, per prompt) regressed
    on `length_change_N` (policy - baseline length, same prompts) with an intercept, by ordinary least
    squares. Returns the intercept as `mean` with its 95% interval, the slope (gain per unit of length) and
    the raw mean gain beside it; with no change in length the intercept is the raw mean (and the slope None)."""
    gain, change = np.asarray(gain_N, np.float64), np.asarray(length_change_N, np.float64)
    if gain.ndim != 1 or gain.shape != change.shape:
        raise ValueError(f"length_controlled_gain: expected one gain and one length change per prompt, got shapes "
                         f"{gain.shape} and {change.shape}")
    fit = net_gain(gain, {"length": change})
    return {"mean": fit["mean"], "ci": fit["ci"], "n": fit["n"], "per_length": fit["slopes"].get("length"),
            "raw_mean": float(gain.mean()), "method": "OLS of per-prompt gain on length change (intercept)"}
