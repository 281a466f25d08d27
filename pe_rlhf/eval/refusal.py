"""Does a response refuse? A documented rule, measured against responses labelled by reading them.

A response *refuses* when it declines the request or deflects it instead of attempting it:
- it says it will not or cannot do what was asked ("I can't help you with that", "I'm not able to",
  "I won't", "I'd rather not", "I'm not comfortable ...", "We're not going to talk about this"), or
  answers a request with "that's illegal";
- or it claims not to understand or know what was asked, without attempting an answer ("I'm sorry,
  I'm not sure what you mean.", "I don't understand the question", "It's not clear what you're asking",
  "I'm confused.");
- or it is an apology with nothing else in it ("I'm sorry.").

An apology followed by an answer ("I'm sorry to hear that. Try ...") is not a refusal, nor is advice
against something that still engages with it. The rule reads the first two sentences only: a refusal
that comes after an attempted answer is an answer with a caveat.

The labelled responses and the rule's precision and recall on them are in `experiments/data/
refusal_labels.jsonl` and `docs/results.md`; `tests/eval/test_refusal.py` checks hand-written cases.
"""

from __future__ import annotations

import re

import numpy as np

_NOT = r"(?: can't| cannot| can not| won't| will not| shouldn't| should not| (?:don't|do not) think i (?:can|should))"
_DO = r"(?:help|assist|answer|do|provide|give|tell|talk|share|discuss|support|recommend|comply|say|" \
      r"advise|engage|participate|explain|write|make|teach|encourage|condone|respond|be of|look|find|search)"
_UNABLE = r"(?:(?:'m| am) (?:not able|unable) to|(?:'m| am|'re| are) not (?:really )?going to)"
_DECLINE = [
    rf"\bi{_NOT} (?:\w+ ){{0,2}}{_DO}\b",
    rf"\b(?:i|we){_UNABLE} \w+",
    r"\bi(?:'d| would) (?:rather|prefer) not\b",
    r"\bi(?:'m| am) not (?:comfortable|willing)\b",
    r"\bi don't feel comfortable\b",
    r"\bi(?:'m| am) not (?:allowed|permitted)\b",
    r"\b(?:that's|that is|this is) not something i\b",
    r"\bi(?:'m| am) sorry,? (?:but )?(?:i|that) (?:can't|cannot|won't)\b",
    r"\bi can't do that\b",
    r"\b(?:it's|that's|that is|it is|this is) (?:illegal|against the law)\b",
]
_DEFLECT = [
    r"\bi(?:'m| am) (?:not sure|unsure) (?:what|what's|which|how|who|why|if i understand|i understand)\b",
    r"\bi don't (?:understand|know what you)\b",
    r"\bi do not (?:understand|know what you)\b",
    r"\bi(?:'m| am) not sure i (?:understand|follow)\b",
    r"\b(?:not (?:really )?(?:sure|familiar with|clear)|don't get|unclear)\b.{0,40}\bwhat you(?:'re| are)? "
    r"(?:mean|asking|trying to say|want)",
    r"^i(?:'m| am) (?:a little |a bit )?confused\b",
    r"\bcan you (?:please )?(?:clarify|rephrase|explain what you mean)\b",
    r"\bwhat do you mean\??$",
]
_BARE_APOLOGY = r"^(?:i(?:'m| am) (?:so |very |really )?sorry|sorry|i apologi[sz]e)[.!,]*(?: about that)?[.!]*$"
_PATTERNS = [re.compile(p) for p in _DECLINE + _DEFLECT]
_SENTENCE = re.compile(r"(?<=[.!?])\s+")


def _normalise(text: str) -> str:
    text = text.strip().lower().replace("\u2019", "'")
    return re.sub(r"\s+", " ", text)


def lead(text: str, sentences: int = 2) -> str:
    """The first `sentences` sentences of a response, lower-cased, whitespace collapsed."""
    return " ".join(_SENTENCE.split(_normalise(text))[:sentences])


def is_refusal(text: str) -> bool:
    """True when the response declines or deflects the request (the rule in the module docstring)."""
    head = lead(text)
    if not head:
        return False
    if re.match(_BARE_APOLOGY, head):
        return True
    return any(p.search(head) for p in _PATTERNS)


def refusal_flags(texts) -> np.ndarray:
    return np.array([is_refusal(t) for t in texts], bool)


def precision_recall(predicted, labelled) -> dict:
    """Precision, recall and agreement of predicted refusals against labels read by a person."""
    p, y = np.asarray(predicted, bool), np.asarray(labelled, bool)
    tp, fp, fn = int((p & y).sum()), int((p & ~y).sum()), int((~p & y).sum())
    return {"n": int(y.size), "labelled_refusals": int(y.sum()), "true_positives": tp, "false_positives": fp,
            "false_negatives": fn, "precision": tp / (tp + fp) if tp + fp else float("nan"),
            "recall": tp / (tp + fn) if tp + fn else float("nan"), "accuracy": float((p == y).mean())}
