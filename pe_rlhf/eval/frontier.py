"""Statistics of a LoRA-against-full comparison: per-prompt summaries of one policy, and the matched-KL
frontier across training runs.

Per prompt (one evaluation of one policy against the SFT model on the same prompts):
- `win_rate_ties_half`: a win scores 1, a tie 1/2, a loss 0; the mean and its normal interval;
- `distinct_ngrams`: distinct word n-grams over all n-grams of a set of responses (diversity);
- `net_gain`: the judge's paired gain net of changes in length and refusal: the per-prompt differences
  (policy - SFT) regressed by least squares on the differences in length and in refusal; the intercept
  is the gain at equal length and equal refusal, with its OLS interval.

Across runs (each training run is one draw; an interval over prompts says nothing about run-to-run
variation):
- `value_at_kl`: one run's judge gain at a given KL to the start, by linear interpolation along its
  evaluations in training order, starting from (0, 0); None where the run never reached that KL;
- `seed_difference`: the difference of two arms' means over seeds, with Welch's t interval;
- `margin_verdict`: whether a difference meets an equivalence margin declared in advance.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
from scipy import stats

Z95 = 1.959963984540054


def win_rate_ties_half(policy_N, baseline_N, z: float = Z95) -> dict:
    """Wins (strictly higher score), ties and losses of `policy_N` against `baseline_N`, with ties as half."""
    a, b = np.asarray(policy_N, np.float64), np.asarray(baseline_N, np.float64)
    points = np.where(a > b, 1.0, np.where(a == b, 0.5, 0.0))
    n = int(points.size)
    mean = float(points.mean())
    half = z * float(points.std(ddof=1)) / math.sqrt(n) if n > 1 else float("nan")
    return {"wins": int((a > b).sum()), "ties": int((a == b).sum()), "losses": int((a < b).sum()), "n": n,
            "win_rate": mean, "win_rate_ci": [max(0.0, mean - half), min(1.0, mean + half)]}


def distinct_ngrams(texts: Sequence[str], n: int = 2) -> float:
    """Distinct word n-grams (lower-cased, split on whitespace) over all n-grams of `texts`; nan when none."""
    grams = [tuple(words[i:i + n]) for t in texts for words in [t.lower().split()] for i in range(len(words) - n + 1)]
    return len(set(grams)) / len(grams) if grams else float("nan")


def net_gain(diff_N, covariates: dict[str, Sequence[float]], z: float = Z95) -> dict:
    """Least squares of `diff_N` on an intercept and each covariate (also a per-prompt difference).

    Returns the intercept (the gain at zero change in every covariate), its interval, each slope, and the
    covariates left out because they did not vary (a column of one value is the intercept's twin)."""
    y = np.asarray(diff_N, np.float64)
    kept = {k: np.asarray(v, np.float64) for k, v in covariates.items() if np.ptp(np.asarray(v, np.float64)) > 0}
    x = np.column_stack([np.ones_like(y), *kept.values()])
    coef, *_ = np.linalg.lstsq(x, y, rcond=None)
    dof = len(y) - x.shape[1]
    if dof < 1:
        raise ValueError(f"net_gain: {len(y)} prompts cannot fit an intercept and {len(kept)} slopes")
    sigma2 = float(((y - x @ coef) ** 2).sum()) / dof
    se = np.sqrt(np.diag(np.linalg.inv(x.T @ x)) * sigma2)
    mean = float(coef[0])
    return {"mean": mean, "ci": [mean - z * float(se[0]), mean + z * float(se[0])], "n": int(len(y)),
            "slopes": {k: float(c) for k, c in zip(kept, coef[1:])},
            "dropped": sorted(set(covariates) - set(kept))}


def value_at_kl(points: Sequence[tuple[float, float]], kl: float) -> float | None:
    """A run's value at `kl`, interpolated along its evaluations `(kl_i, value_i)` in training order.

    The run starts at (0, 0) (the SFT model: no divergence, no gain). The first segment whose KL range
    holds `kl` gives the value; None when the run never reached `kl` (no extrapolation)."""
    path = [(0.0, 0.0), *((float(k), float(v)) for k, v in points)]
    for (k0, v0), (k1, v1) in zip(path, path[1:]):
        if min(k0, k1) <= kl <= max(k0, k1):
            return v0 if k1 == k0 else v0 + (v1 - v0) * (kl - k0) / (k1 - k0)
    return None


def seed_difference(a: Sequence[float], b: Sequence[float], confidence: float = 0.95) -> dict:
    """mean(a) - mean(b) over seeds, with Welch's t interval (each value is one training run)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if len(a) < 2 or len(b) < 2:
        raise ValueError(f"seed_difference: needs at least 2 runs a side, got {len(a)} and {len(b)}")
    va, vb = a.var(ddof=1) / len(a), b.var(ddof=1) / len(b)
    diff, se = float(a.mean() - b.mean()), math.sqrt(va + vb)
    dof = (va + vb) ** 2 / (va ** 2 / (len(a) - 1) + vb ** 2 / (len(b) - 1)) if va + vb > 0 else float("inf")
    half = float(stats.t.ppf(0.5 + confidence / 2, dof)) * se if se > 0 else 0.0
    return {"mean": diff, "ci": [diff - half, diff + half], "dof": dof, "runs": [len(a), len(b)],
            "mean_a": float(a.mean()), "mean_b": float(b.mean()), "sd_a": float(a.std(ddof=1)),
            "sd_b": float(b.std(ddof=1))}


def margin_verdict(difference: dict, reference_gain: float, margin: float) -> dict:
    """Non-inferiority at a relative margin: LoRA - full is held to be within the margin when the lower end
    of its interval is at or above -margin * full's gain. "inconclusive" when the interval straddles that
    bound and its upper end is above it; "worse" when the whole interval lies below it."""
    bound = -margin * abs(reference_gain)
    lo, hi = difference["ci"]
    verdict = "within" if lo >= bound else ("worse" if hi < bound else "inconclusive")
    return {"margin": margin, "bound": bound, "verdict": verdict}
