"""Tokenisation: exact ids under left/right truncation, BOS once, EOS on responses, counted drops.

Tiny tokenizer (tests/data/tiny.py): <pad>=0 <eos>=1 <bos>=2, "a"=4 "b"=5 ... "j"=13.
"""

import pytest

from pe_rlhf.data import LabeledExample, PreferenceExample, PromptResponse, TokenizeOptions, TokenStats
from pe_rlhf.data.tokenize import (TokenizedLabeled, TokenizedPair, TokenizedSFT, tokenize_labeled,
                                   tokenize_preferences, tokenize_prompts, tokenize_sft)
from tests.data.tiny import make_tokenizer

OPTS = TokenizeOptions(max_prompt_len=4, max_response_len=3)
PAIRS = [
    PreferenceExample("a b c d e", "f", "g h i j", margin=0.5),  # prompt cut on the left, rejected on the right
    PreferenceExample("a", "b c", "b c d"),  # rejected loses its EOS
    PreferenceExample("a", "a b c d", "a b c e"),  # same 3 tokens after truncation: dropped
    PreferenceExample("a", "b", "c"),  # fits
]


def test_preference_truncation_exact_ids(tokenizer):
    pairs, stats = tokenize_preferences(PAIRS, tokenizer, OPTS)
    assert pairs == (
        TokenizedPair(prompt=(2, 6, 7, 8), chosen=(9, 1), rejected=(10, 11, 12), margin=0.5),
        TokenizedPair(prompt=(2, 4), chosen=(5, 6, 1), rejected=(5, 6, 7), margin=0.0),
        TokenizedPair(prompt=(2, 4), chosen=(5, 1), rejected=(6, 1), margin=0.0),
    )
    assert stats == TokenStats(examples=4, kept=3, prompts_truncated=1, responses_truncated=2,
                               dropped_overlong=0, dropped_empty=0, dropped_identical=1)


def test_drop_overlong_instead_of_truncating(tokenizer):
    import dataclasses

    pairs, stats = tokenize_preferences(PAIRS, tokenizer, dataclasses.replace(OPTS, drop_overlong=True))
    assert pairs == (TokenizedPair((2, 4), (5, 1), (6, 1)),)
    assert stats == TokenStats(examples=4, kept=1, dropped_overlong=3)


def test_bos_added_once_when_the_tokenizer_adds_it_itself():
    tok = make_tokenizer(template_bos=True)
    assert tok("a b")["input_ids"] == [2, 4, 5]  # this tokenizer prepends BOS on its own
    pairs, _ = tokenize_preferences([PreferenceExample("a b", "c", "d")], tok, OPTS)
    assert pairs[0] == TokenizedPair((2, 4, 5), (6, 1), (7, 1))


def test_no_bos_when_the_tokenizer_has_none_or_add_bos_is_off(tokenizer):
    nobos = make_tokenizer(bos=False)
    assert tokenize_preferences(PAIRS[:1], nobos, OPTS)[0][0].prompt == (5, 6, 7, 8)
    off = TokenizeOptions(max_prompt_len=4, max_response_len=3, add_bos=False)
    assert tokenize_preferences(PAIRS[:1], tokenizer, off)[0][0].prompt == (5, 6, 7, 8)


def test_eos_override_and_missing_eos(tokenizer):
    opts = TokenizeOptions(max_prompt_len=4, max_response_len=3, eos_id=13)
    assert tokenize_sft([PromptResponse("a", "b")], tokenizer, opts)[0] == (TokenizedSFT((2, 4), (5, 13)),)
    with pytest.raises(ValueError, match="has no eos_token_id; set TokenizeOptions.eos_id or add_eos=False"):
        tokenize_sft([PromptResponse("a", "b")], make_tokenizer(eos=False), OPTS)


def test_labeled_and_sft_with_empty_responses(tokenizer):
    examples = [LabeledExample("a b c d e f", "b c d e", 1.0), LabeledExample("a", "", 0.0),
                LabeledExample("b", "c", 0.0)]
    rows, stats = tokenize_labeled(examples, tokenizer, OPTS)
    assert rows == (TokenizedLabeled((2, 7, 8, 9), (5, 6, 7), 1.0), TokenizedLabeled((2, 4), (1,), 0.0),
                    TokenizedLabeled((2, 5), (6, 1), 0.0))
    assert stats == TokenStats(examples=3, kept=3, prompts_truncated=1, responses_truncated=1)
    no_eos = TokenizeOptions(max_prompt_len=4, max_response_len=3, add_eos=False)
    rows, stats = tokenize_sft([PromptResponse(e.prompt, e.response) for e in examples], tokenizer, no_eos)
    assert rows == (TokenizedSFT((2, 7, 8, 9), (5, 6, 7)), TokenizedSFT((2, 5), (6,)))
    assert stats == TokenStats(examples=3, kept=2, prompts_truncated=1, responses_truncated=1, dropped_empty=1)


def test_rl_prompts_cut_from_the_left(tokenizer):
    opts = TokenizeOptions(max_prompt_len=3, max_response_len=1)
    prompts, stats = tokenize_prompts(["a b c d e", "a", ""], tokenizer, opts)
    assert prompts == ((2, 7, 8), (2, 4), (2,))
    assert stats == TokenStats(examples=3, kept=3, prompts_truncated=1)
    prompts, stats = tokenize_prompts(["a b c d e", "a", ""], make_tokenizer(bos=False), opts)
    assert prompts == ((6, 7, 8), (4,))
    assert stats == TokenStats(examples=3, kept=2, prompts_truncated=1, dropped_empty=1)


def test_options_are_checked():
    with pytest.raises(ValueError, match="TokenizeOptions.max_response_len must be at least 1, got 0"):
        TokenizeOptions(max_prompt_len=4, max_response_len=0)
