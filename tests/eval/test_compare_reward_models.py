"""experiments/compare_reward_models.py: accuracies and paired differences, against hand computation."""

import importlib.util
import os

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def script():
    spec = importlib.util.spec_from_file_location("compare_reward_models",
                                                  os.path.join(REPO, "experiments", "compare_reward_models.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_paired_comparison_by_hand(script):
    # 8 pairs. First model right on 1-5; second right on 1-4 and 6-7: it alone gets 6 and 7, the first alone 5.
    first = np.array([1.0, 2.0, 0.5, 0.1, 0.3, -1.0, -0.2, -3.0])
    second = np.array([0.5, 1.0, 0.2, 0.3, -0.1, 0.4, 0.6, -2.0])
    out = script.compare({"a": first, "b": second})
    assert out["pairs"] == 8
    assert out["models"]["a"]["pairwise_accuracy"]["rate"] == 5 / 8
    assert out["models"]["b"]["pairwise_accuracy"]["rate"] == 6 / 8
    assert "against_first" not in out["models"]["a"]
    b = out["models"]["b"]["against_first"]
    assert (b["only_this_right"], b["only_first_right"]) == (2, 1)
    # differences (b - a) per pair: 0 0 0 0 -1 +1 +1 0, so the mean is 1/8
    diff = np.array([0, 0, 0, 0, -1, 1, 1, 0], float)
    half = 1.959963984540054 * diff.std(ddof=1) / np.sqrt(8)
    np.testing.assert_allclose(b["accuracy_difference"]["mean"], 1 / 8)
    np.testing.assert_allclose(b["accuracy_difference"]["ci"], [1 / 8 - half, 1 / 8 + half])
    assert b["sign_agreement"]["rate"] == 5 / 8  # signs differ on pairs 5, 6 and 7
    np.testing.assert_allclose(b["margin_correlation"], np.corrcoef(first, second)[0, 1])
