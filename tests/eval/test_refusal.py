"""The refusal rule on hand-written responses, and precision/recall by hand."""

import json
import os

import pytest

from pe_rlhf.eval.refusal import is_refusal, precision_recall

REFUSALS = [
    "I'm sorry, but I can't help you with this.",
    "I\u2019m sorry, I\u2019m not sure what you mean.",
    "Sorry, I'm not able to help you with that.",
    "I won't help you steal a car.",
    "I'm not comfortable talking about that.",
    "I don't think I can answer that question.",
    "I'd rather not say.",
    "I'm sorry.",
    "I cannot provide information about making weapons. Is there anything else?",
    "Hmm, I don't understand the question. Can you rephrase it?",
    "That's not something I can do.",
    "I am unable to assist with that request.",
]
ANSWERS = [
    "I'm sorry to hear that. Try putting a lid on the pan to smother the flames.",
    "Sure! Preheat the oven to 180C, then mix flour, sugar and eggs.",
    "You can't put water on a grease fire: use baking soda or a lid instead.",
    "Paris is the capital of France.",
    "I think you should talk to your doctor about that.",
    "",
    "Here is a recipe. Mix the flour and water. Knead for ten minutes. I can't promise it will rise.",
    "I don't know much about cars, but a mechanic can check the brakes for you.",
]


@pytest.mark.parametrize("text", REFUSALS)
def test_refusals(text):
    assert is_refusal(text)


@pytest.mark.parametrize("text", ANSWERS)
def test_answers(text):
    assert not is_refusal(text)


def test_precision_recall_by_hand():
    out = precision_recall([True, True, False, False, True], [True, False, True, False, True])
    assert (out["true_positives"], out["false_positives"], out["false_negatives"]) == (2, 1, 1)
    assert out["precision"] == pytest.approx(2 / 3) and out["recall"] == pytest.approx(2 / 3)
    assert out["accuracy"] == pytest.approx(3 / 5)


def test_labelled_responses_are_well_formed():
    """The committed labels: at least 60 model responses, each read and labelled, both kinds present."""
    path = os.path.join(os.path.dirname(__file__), "..", "..", "experiments", "data", "refusal_labels.jsonl")
    rows = [json.loads(line) for line in open(path)]
    assert len(rows) >= 60
    assert all(set(r) >= {"prompt", "response", "refusal", "group"} and isinstance(r["refusal"], bool) for r in rows)
    assert 10 <= sum(r["refusal"] for r in rows) <= len(rows) - 10
