"""Batches: exact arrays for right and left padding; both paddings give the model the same logits."""

import numpy as np
import pytest

from pe_rlhf.data.batching import batch_labeled, batch_preferences, batch_prompts, batch_sft
from pe_rlhf.data.tokenize import TokenizedLabeled, TokenizedPair, TokenizedSFT

PAIRS = (TokenizedPair((2, 6, 7, 8), (9, 1), (10, 11, 12), 0.5), TokenizedPair((2, 4), (5, 6, 1), (5, 6, 7)))


def test_preference_batch_right_padded():
    b = batch_preferences(PAIRS, seq_len=7, pad_id=0)
    assert sorted(b) == sorted(["chosen_tokens_BxT", "chosen_mask_BxT", "chosen_response_mask_BxT",
                                "rejected_tokens_BxT", "rejected_mask_BxT", "rejected_response_mask_BxT", "margin_B"])
    np.testing.assert_array_equal(b["chosen_tokens_BxT"], [[2, 6, 7, 8, 9, 1, 0], [2, 4, 5, 6, 1, 0, 0]])
    np.testing.assert_array_equal(b["chosen_mask_BxT"], [[1, 1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 0, 0]])
    np.testing.assert_array_equal(b["chosen_response_mask_BxT"], [[0, 0, 0, 0, 1, 1, 0], [0, 0, 1, 1, 1, 0, 0]])
    np.testing.assert_array_equal(b["rejected_tokens_BxT"], [[2, 6, 7, 8, 10, 11, 12], [2, 4, 5, 6, 7, 0, 0]])
    np.testing.assert_array_equal(b["rejected_mask_BxT"], [[1, 1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 0, 0]])
    np.testing.assert_array_equal(b["rejected_response_mask_BxT"], [[0, 0, 0, 0, 1, 1, 1], [0, 0, 1, 1, 1, 0, 0]])
    np.testing.assert_array_equal(b["margin_B"], [0.5, 0.0])
    assert b["chosen_tokens_BxT"].dtype == np.int32 and b["margin_B"].dtype == np.float32


def test_preference_batch_left_padded_with_pad_id():
    b = batch_preferences(PAIRS, seq_len=7, pad_id=3, padding="left")
    np.testing.assert_array_equal(b["chosen_tokens_BxT"], [[3, 2, 6, 7, 8, 9, 1], [3, 3, 2, 4, 5, 6, 1]])
    np.testing.assert_array_equal(b["chosen_mask_BxT"], [[0, 1, 1, 1, 1, 1, 1], [0, 0, 1, 1, 1, 1, 1]])
    np.testing.assert_array_equal(b["chosen_response_mask_BxT"], [[0, 0, 0, 0, 0, 1, 1], [0, 0, 0, 0, 1, 1, 1]])
    np.testing.assert_array_equal(b["rejected_tokens_BxT"], [[2, 6, 7, 8, 10, 11, 12], [3, 3, 2, 4, 5, 6, 7]])
    np.testing.assert_array_equal(b["rejected_response_mask_BxT"], [[0, 0, 0, 0, 1, 1, 1], [0, 0, 0, 0, 1, 1, 1]])


def test_labeled_sft_and_prompt_batches():
    rows = (TokenizedLabeled((2, 4), (5, 1), 1.0), TokenizedLabeled((2,), (6, 7, 1), 0.0))
    b = batch_labeled(rows, seq_len=5, padding="left")
    np.testing.assert_array_equal(b["tokens_BxT"], [[0, 2, 4, 5, 1], [0, 2, 6, 7, 1]])
    np.testing.assert_array_equal(b["mask_BxT"], [[0, 1, 1, 1, 1], [0, 1, 1, 1, 1]])
    np.testing.assert_array_equal(b["response_mask_BxT"], [[0, 0, 0, 1, 1], [0, 0, 1, 1, 1]])
    np.testing.assert_array_equal(b["label_B"], [1.0, 0.0])
    s = batch_sft([TokenizedSFT(r.prompt, r.response) for r in rows], seq_len=5)
    assert sorted(s) == ["mask_BxT", "response_mask_BxT", "tokens_BxT"]
    np.testing.assert_array_equal(s["tokens_BxT"], [[2, 4, 5, 1, 0], [2, 6, 7, 1, 0]])
    np.testing.assert_array_equal(s["response_mask_BxT"], [[0, 0, 1, 1, 0], [0, 1, 1, 1, 0]])
    p = batch_prompts([(2, 7, 8), (2, 4)], prompt_len=4, pad_id=0)
    np.testing.assert_array_equal(p["prompt_BxT"], [[0, 2, 7, 8], [0, 0, 2, 4]])
    np.testing.assert_array_equal(p["prompt_mask_BxT"], [[0, 1, 1, 1], [0, 0, 1, 1]])


def test_bad_lengths_and_sides():
    with pytest.raises(ValueError, match="row 0 has 6 tokens \\(4 prompt \\+ 2 response\\) > seq_len 5"):
        batch_preferences(PAIRS, seq_len=5)
    with pytest.raises(ValueError, match="padding must be one of \\('right', 'left'\\), got 'middle'"):
        batch_sft([TokenizedSFT((2,), (4,))], seq_len=4, padding="middle")
    with pytest.raises(ValueError, match="cannot batch zero examples"):
        batch_sft([], seq_len=4)


def test_left_and_right_padding_give_the_model_the_same_logits():
    from flax import nnx

    from pe_rlhf.models.config import ModelConfig
    from pe_rlhf.models.transformer import Transformer

    model = Transformer(ModelConfig(vocab_size=16, hidden_size=32, intermediate_size=64, num_layers=1,
                                    num_heads=2, num_kv_heads=1, head_dim=16))
    forward = nnx.jit(lambda m, tokens_BxT, mask_BxT: m(tokens_BxT, input_mask_BxT=mask_BxT))
    right = batch_preferences(PAIRS, seq_len=8, padding="right")
    left = batch_preferences(PAIRS, seq_len=8, padding="left")
    for side in ("chosen", "rejected"):
        r, l = right[f"{side}_mask_BxT"].astype(bool), left[f"{side}_mask_BxT"].astype(bool)
        logits_r = np.asarray(forward(model, right[f"{side}_tokens_BxT"], right[f"{side}_mask_BxT"]))
        logits_l = np.asarray(forward(model, left[f"{side}_tokens_BxT"], left[f"{side}_mask_BxT"]))
        np.testing.assert_allclose(logits_r[r], logits_l[l], rtol=1e-5, atol=1e-5)
        # the response tokens line up too (same count, same ids)
        np.testing.assert_array_equal(right[f"{side}_tokens_BxT"][right[f"{side}_response_mask_BxT"] == 1],
                                      left[f"{side}_tokens_BxT"][left[f"{side}_response_mask_BxT"] == 1])
