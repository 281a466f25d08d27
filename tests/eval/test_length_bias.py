"""The length bias of a reward model and the length-controlled gain, against hand computation."""

import math

import numpy as np
import pytest

from pe_rlhf.eval.length_bias import length_controlled_gain, rm_length_bias

Z = 1.959963984540054


def test_rm_length_bias_by_hand():
    # pair:            0  1  2  3
    chosen_scores = [3, 0, 1, 4]
    rejected_scores = [1, 2, 1, 4]  # pairs 2 and 3 are ties in score: wrong, as in pairwise_accuracy
    chosen_lengths = [7, 3, 5, 9]
    rejected_lengths = [1, 9, 5, 1]  # chosen longer in 0 and 3, shorter in 1, equal in 2
    got = rm_length_bias(chosen_scores, rejected_scores, chosen_lengths, rejected_lengths)
    assert got["pairs"] == 4
    assert (got["pairwise_accuracy"]["count"], got["pairwise_accuracy"]["n"]) == (1, 4)
    assert (got["accuracy_chosen_shorter"]["count"], got["accuracy_chosen_shorter"]["n"]) == (0, 1)
    assert (got["accuracy_chosen_longer"]["count"], got["accuracy_chosen_longer"]["n"]) == (1, 2)
    assert got["accuracy_chosen_longer"]["rate"] == 0.5
    assert (got["chosen_longer_rate"]["count"], got["chosen_longer_rate"]["n"]) == (2, 3)
    # over the 8 responses: score mean 2, length mean 5; deviations
    #   score  [1, -2, -1, 2 | -1, 0, -1, 2]    length [2, -2, 0, 4 | -4, 4, 0, -4]
    # sum of products 14 - 4 = 10, sums of squares 16 and 72: r = 10 / sqrt(16 * 72)
    pooled = got["length_correlation"]
    r = 10 / math.sqrt(16 * 72)
    assert pooled["r"] == pytest.approx(r) and pooled["n"] == 8
    # Fisher's z interval: tanh(atanh(r) +- z / sqrt(n - 3))
    assert pooled["ci"] == pytest.approx([math.tanh(math.atanh(r) - Z / math.sqrt(5)),
                                          math.tanh(math.atanh(r) + Z / math.sqrt(5))], rel=1e-6)
    # within pairs: score differences [2, -2, 0, 0], length differences [6, -6, 0, 8] (mean 2):
    # deviations [2, -2, 0, 0] and [4, -8, -2, 6]; products 24, squares 8 and 120: r = 24 / sqrt(960) = 3 / sqrt(15)
    assert got["length_correlation_within_pair"]["r"] == pytest.approx(3 / math.sqrt(15))
    assert got["length_correlation_within_pair"]["n"] == 4


def test_rm_length_bias_edge_cases():
    same_length = rm_length_bias([1, 2, 3, 4], [0, 0, 0, 0], [5, 5, 5, 5], [5, 5, 5, 5])
    assert math.isnan(same_length["length_correlation_within_pair"]["r"])  # lengths never differ
    assert same_length["accuracy_chosen_shorter"]["n"] == 0 and math.isnan(same_length["accuracy_chosen_shorter"]["rate"])
    assert same_length["pairwise_accuracy"]["rate"] == 1.0
    with pytest.raises(ValueError, match="four equal-length 1-D arrays"):
        rm_length_bias([1, 2], [0, 0], [1, 2, 3], [1, 2])


def test_length_controlled_gain_by_hand():
    gain = [1.0, 2.0, 3.0, 6.0]
    change = [0.0, 1.0, 2.0, 3.0]
    # slope = Sxy / Sxx = 8 / 5 = 1.6 (deviations [-1.5, -0.5, 0.5, 1.5] and [-2, -1, 0, 3]);
    # intercept = 3 - 1.6 * 1.5 = 0.6; residuals [0.4, -0.2, -0.8, 0.6], SSR 1.2 over 2 degrees of freedom;
    # var(intercept) = 0.6 * (1/4 + 1.5^2 / 5) = 0.42
    got = length_controlled_gain(gain, change)
    assert got["mean"] == pytest.approx(0.6) and got["per_length"] == pytest.approx(1.6)
    assert got["ci"] == pytest.approx([0.6 - Z * math.sqrt(0.42), 0.6 + Z * math.sqrt(0.42)])
    assert got["raw_mean"] == 3.0 and got["n"] == 4
    # no change in length: the gain is the raw mean, with the plain interval of a mean
    flat = length_controlled_gain(gain, [2.0] * 4)
    half = Z * np.std(gain, ddof=1) / 2
    assert flat["mean"] == pytest.approx(3.0) and flat["per_length"] is None
    assert flat["ci"] == pytest.approx([3.0 - half, 3.0 + half])
    with pytest.raises(ValueError, match="one gain and one length change per prompt"):
        length_controlled_gain(gain, change[:3])
