"""ROUGE-L through rouge-score, against hand-computed longest common subsequences."""

import math

import pytest

from pe_rlhf.eval.rouge import rouge_l, rouge_l_f1

Z = 1.959963984540054


def test_rouge_l_by_hand():
    references = ["The cat sat on the mat.", "He keeps cheating on his girlfriend"]
    summaries = ["the cat was sitting on a mat", "Cheats on his girlfriend!"]
    # 1: words (lower case, punctuation dropped) [the cat sat on the mat] and [the cat was sit on a mat]
    #    ("sitting" stems to "sit", "sat" stays): LCS "the cat on mat" = 4; P = 4/7, R = 4/6, F = 8/13
    # 2: stemmed, [he keep cheat on his girlfriend] and [cheat on his girlfriend]: LCS 4, P = 1, R = 4/6, F = 0.8;
    #    unstemmed, "cheats" differs from "cheating": LCS "on his girlfriend" = 3, P = 3/4, R = 3/6, F = 0.6
    assert rouge_l_f1(summaries, references) == pytest.approx([8 / 13, 0.8])
    assert rouge_l_f1(summaries, references, use_stemmer=False) == pytest.approx([8 / 13, 0.6])
    got = rouge_l(summaries, references)
    mean, half = (8 / 13 + 0.8) / 2, Z * abs(0.8 - 8 / 13) / math.sqrt(2) / math.sqrt(2)
    assert got["mean"] == pytest.approx(mean) and got["ci"] == pytest.approx([mean - half, mean + half])
    assert got["n"] == 2 and got["per_summary"] == pytest.approx([8 / 13, 0.8]) and got["stemmed"] is True


def test_rouge_l_edges():
    assert rouge_l_f1(["", "same words"], ["a reference", "Same words."]).tolist() == [0.0, 1.0]
    with pytest.raises(ValueError, match="2 summaries but 1 references"):
        rouge_l_f1(["a", "b"], ["a"])
