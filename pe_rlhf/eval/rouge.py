"""ROUGE-L of generated summaries against human references (Lin, 2004, "ROUGE: A Package for Automatic
Evaluation of Summaries"), computed by Google's `rouge-score` package, a re-implementation of ROUGE-1.5.5.

ROUGE-L is the F-measure of the longest common subsequence of words: with L the LCS length of a summary of
m words and a reference of n, precision L/m, recall L/n, F1 = 2PR / (P + R). Words are the package's: lower
case, runs of letters and digits (everything else separates them), Porter-stemmed when longer than three
letters (`use_stemmer=True`, as summarisation papers report it; "sitting" and "sits" both become "sit").
The summaries here are one line each, so ROUGE-L and its sentence-split variant (ROUGE-Lsum) agree.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
from rouge_score import rouge_scorer

from pe_rlhf.eval.judge import mean_with_ci


def rouge_l_f1(summaries: Sequence[str], references: Sequence[str], use_stemmer: bool = True) -> np.ndarray:
    """Each summary's ROUGE-L F1 against its reference, in [0, 1] (0 when either has no words)."""
    summaries, references = list(summaries), list(references)
    if len(summaries) != len(references):
        raise ValueError(f"rouge_l_f1: {len(summaries)} summaries but {len(references)} references; give one "
                         "reference per summary")
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=use_stemmer)
    # rouge-score's argument order is (target, prediction)
    return np.array([scorer.score(r, s)["rougeL"].fmeasure for s, r in zip(summaries, references)], np.float64)


def rouge_l(summaries: Sequence[str], references: Sequence[str], use_stemmer: bool = True) -> dict:
    """Mean ROUGE-L F1 over summaries with its normal 95% interval over them, and the per-summary scores."""
    f1 = rouge_l_f1(summaries, references, use_stemmer)
    return {**mean_with_ci(f1), "per_summary": f1.tolist(), "stemmed": use_stemmer}
