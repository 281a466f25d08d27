"""Host-side reward-model metrics over whole evaluation sets (NumPy)."""

from __future__ import annotations

import numpy as np


def pairwise_metrics(r_chosen: np.ndarray, r_rejected: np.ndarray) -> dict[str, float]:
    """Pairwise accuracy (ties count as wrong) and the distribution of r_chosen - r_rejected."""
    margin = np.asarray(r_chosen, np.float64) - np.asarray(r_rejected, np.float64)
    q = np.quantile(margin, [0.1, 0.25, 0.5, 0.75, 0.9])
    return {
        "pairwise_accuracy": float(np.mean(margin > 0)),
        "margin_mean": float(margin.mean()),
        "margin_std": float(margin.std()),
        "margin_p10": float(q[0]), "margin_p25": float(q[1]), "margin_p50": float(q[2]),
        "margin_p75": float(q[3]), "margin_p90": float(q[4]),
        "num_pairs": int(margin.size),
    }


def roc_auc(scores: np.ndarray, labels: np.ndarray) -> float | None:
    """Area under the ROC curve: P(score of a positive > score of a negative), ties counting 1/2.

    None (undefined) without both a positive and a negative: NaN is kept for scores that are not finite.
    """
    scores, labels = np.asarray(scores, np.float64), np.asarray(labels) > 0.5
    pos, neg = scores[labels], scores[~labels]
    if pos.size == 0 or neg.size == 0:
        return None
    order = np.argsort(np.concatenate([pos, neg]), kind="mergesort")
    ranks = np.empty(order.size, np.float64)
    sorted_scores = np.concatenate([pos, neg])[order]
    # average ranks over ties
    _, first, counts = np.unique(sorted_scores, return_index=True, return_counts=True)
    avg = first + (counts - 1) / 2.0 + 1.0
    ranks[order] = np.repeat(avg, counts)
    return float((ranks[:pos.size].sum() - pos.size * (pos.size + 1) / 2) / (pos.size * neg.size))


def classification_metrics(logits: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Accuracy, balanced accuracy (mean of per-class recall) and ROC AUC at threshold 0.

    A class absent from `labels` leaves its recall and the ROC AUC None (undefined), not NaN, so that a
    NaN always means scores that are not finite (`loop.nonfinite_metrics`).
    """
    logits, labels = np.asarray(logits, np.float64), np.asarray(labels) > 0.5
    pred = logits > 0
    recall_pos = float(np.mean(pred[labels])) if labels.any() else None
    recall_neg = float(np.mean(~pred[~labels])) if (~labels).any() else None
    return {
        "accuracy": float(np.mean(pred == labels)),
        "balanced_accuracy": float(np.mean([r for r in (recall_pos, recall_neg) if r is not None])),
        "recall_positive": recall_pos,
        "recall_negative": recall_neg,
        "roc_auc": roc_auc(logits, labels),
        "positive_fraction": float(np.mean(labels)),
        "num_examples": int(labels.size),
    }


def reward_metrics(pairwise: bool, a: np.ndarray, b: np.ndarray) -> dict[str, float]:
    """`pairwise_metrics(chosen, rejected)` or `classification_metrics(scores, labels)`."""
    return pairwise_metrics(a, b) if pairwise else classification_metrics(a, b)
