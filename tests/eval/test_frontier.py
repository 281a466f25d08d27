"""The statistics of the LoRA-against-full sweep against hand computation."""

import math

import numpy as np
import pytest

from pe_rlhf.eval import frontier as F


def test_win_rate_counts_ties_as_half():
    out = F.win_rate_ties_half([3.0, 1.0, 2.0, 2.0], [1.0, 1.0, 3.0, 2.0])  # win, tie, loss, tie
    assert (out["wins"], out["ties"], out["losses"]) == (1, 2, 1)
    assert out["win_rate"] == pytest.approx(0.5)
    # points 1, .5, 0, .5: sd = sqrt(((.5)^2 + 0 + (.5)^2 + 0) / 3) = sqrt(1/6); half = 1.96 * sd / 2
    half = F.Z95 * math.sqrt(1 / 6) / 2
    assert out["win_rate_ci"] == pytest.approx([0.5 - half, 0.5 + half])


def test_distinct_bigrams():
    assert F.distinct_ngrams(["a b c", "A b d"]) == pytest.approx(3 / 4)  # (a b) twice, (b c), (b d)
    assert F.distinct_ngrams(["one", "two"]) != F.distinct_ngrams(["one", "two"])  # no bigram at all: nan


def test_net_gain_recovers_the_intercept_of_an_exact_linear_relation():
    d_len = np.array([0.0, 2.0, -1.0, 5.0, 3.0])
    d_ref = np.array([0.0, 1.0, 0.0, -1.0, 1.0])
    y = 0.5 + 0.1 * d_len + 1.0 * d_ref
    out = F.net_gain(y, {"length": d_len, "refusal": d_ref})
    assert out["mean"] == pytest.approx(0.5)
    assert out["ci"] == pytest.approx([0.5, 0.5], abs=1e-9)
    assert out["slopes"] == pytest.approx({"length": 0.1, "refusal": 1.0})
    # a covariate that never changes is left out (it would be the intercept's twin), and said so
    flat = F.net_gain(y - d_ref, {"length": d_len, "refusal": np.zeros(5)})
    assert flat["dropped"] == ["refusal"] and flat["mean"] == pytest.approx(0.5)
    # with noise: the intercept equals the hand-solved normal equations of y on [1, x]
    x, yy = np.array([1.0, 2.0, 3.0, 4.0]), np.array([1.0, 3.0, 2.0, 5.0])
    # slope = cov(x, y) / var(x) = (sum (x-2.5)(y-2.75)) / 5 = 5.5 / 5 = 1.1; intercept = 2.75 - 1.1 * 2.5 = 0
    noisy = F.net_gain(yy, {"x": x})
    assert noisy["mean"] == pytest.approx(0.0, abs=1e-12) and noisy["slopes"]["x"] == pytest.approx(1.1)
    # residuals 1-1.1, 3-2.2, 2-3.3, 5-4.4 = -.1, .8, -1.3, .6: SSE 2.7, sigma^2 = 1.35;
    # var(intercept) = sigma^2 * sum x^2 / (n * Sxx) = 1.35 * 30 / (4 * 5) = 2.025
    assert noisy["ci"][1] == pytest.approx(F.Z95 * math.sqrt(2.025))


def test_value_at_kl_interpolates_from_the_start_and_never_extrapolates():
    points = [(0.5, 0.2), (2.0, 0.8)]
    assert F.value_at_kl(points, 0.25) == pytest.approx(0.1)  # on the segment from SFT (0, 0)
    assert F.value_at_kl(points, 1.0) == pytest.approx(0.2 + 0.6 * 0.5 / 1.5)
    assert F.value_at_kl(points, 2.0) == pytest.approx(0.8)
    assert F.value_at_kl(points, 3.0) is None
    # a KL that went back down: the first crossing in training order counts
    assert F.value_at_kl([(2.0, 1.0), (1.0, 1.2)], 1.5) == pytest.approx(0.75)


def test_seed_difference_is_welchs_interval():
    out = F.seed_difference([1.0, 2.0, 3.0], [0.0, 0.0, 3.0])
    # means 2 and 1; variances 1 and 3; se^2 = 1/3 + 3/3 = 4/3
    # Welch dof = (4/3)^2 / ((1/3)^2 / 2 + 1^2 / 2) = (16/9) / (5/9) = 3.2; t_0.975 at 3.2 dof = 3.0728
    assert out["mean"] == pytest.approx(1.0)
    assert out["dof"] == pytest.approx(3.2)
    half = 3.0728 * math.sqrt(4 / 3)
    assert out["ci"] == pytest.approx([1.0 - half, 1.0 + half], abs=1e-3)
    with pytest.raises(ValueError, match="at least 2 runs"):
        F.seed_difference([1.0], [1.0, 2.0])


def test_margin_verdict():
    full_gain = 1.0  # the bound is -0.1
    assert F.margin_verdict({"ci": [-0.05, 0.3]}, full_gain, 0.1)["verdict"] == "within"
    assert F.margin_verdict({"ci": [-0.5, 0.3]}, full_gain, 0.1)["verdict"] == "inconclusive"
    assert F.margin_verdict({"ci": [-0.5, -0.2]}, full_gain, 0.1)["verdict"] == "worse"
    assert F.margin_verdict({"ci": [-0.5, -0.2]}, full_gain, 0.1)["bound"] == pytest.approx(-0.1)
