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


class CountingTokenizer:
    """One token per character (id 3 + ord % 7); counts the characters it is given."""

    bos_token_id, eos_token_id = 1, 2

    def __init__(self):
        self.chars = 0

    def __call__(self, texts, add_special_tokens=False):
        self.chars += sum(len(t) for t in texts)
        return {"input_ids": [[3 + ord(c) % 7 for c in t] for t in texts]}


def test_a_huge_text_is_tokenised_only_near_the_end_it_keeps():
    """A 20 MB prompt and response cost their budgets' windows, not their length: the prompt keeps its
    last tokens, the response its first, exactly as if the whole text had been tokenised and cut."""
    from pe_rlhf.data import tokenize as T

    prompt, response = "abc" * 7_000_000 + "xyz", "uvw" + "abc" * 7_000_000
    tok = CountingTokenizer()
    opts = TokenizeOptions(max_prompt_len=256, max_response_len=128)
    rows, stats = tokenize_sft([PromptResponse(prompt, response)], tok, opts)
    assert tok.chars == (256 + 8 + 1) * T.WINDOW_CHARS_PER_TOKEN + (128 + 8 + 1) * T.WINDOW_CHARS_PER_TOKEN == 6432
    ids = lambda text: [3 + ord(c) % 7 for c in text]
    assert rows == (TokenizedSFT(prompt=(1, *ids(prompt[-255:])), response=tuple(ids(response[:128]))),)
    assert stats == TokenStats(examples=1, kept=1, prompts_truncated=1, responses_truncated=1)
    tok.chars = 0
    prompts, _ = tokenize_prompts([prompt], tok, opts)
    assert prompts == ((1, *ids(prompt[-255:])),) and tok.chars == (256 + 8 + 1) * 16


def test_a_window_with_too_few_tokens_grows_to_the_whole_text(tokenizer):
    """Three words and a million spaces: the prompt's end window holds no token, so it widens until it
    holds the whole text, which gives the same ids as tokenising it whole."""
    opts = TokenizeOptions(max_prompt_len=4, max_response_len=3)
    rows, stats = tokenize_sft([PromptResponse("b c d" + " " * 1_000_000, "e" + " " * 1_000_000 + "f g h")],
                               tokenizer, opts)
    assert rows == (TokenizedSFT((2, 5, 6, 7), (8, 9, 10)),)
    assert stats == TokenStats(examples=1, kept=1, responses_truncated=1)


def test_windows_give_the_ids_of_the_whole_text(tokenizer):
    """Long texts of words, cut inside a word by the window: the same ids as the whole text, cut."""
    import random

    from pe_rlhf.data import tokenize as T
    from tests.data.tiny import make_byte_tokenizer

    rng = random.Random(0)
    words = lambda n: " ".join(rng.choice("a b c d e f g h i j".split()) for _ in range(n))
    examples = [PromptResponse(words(n), words(m)) for n, m in [(5, 3), (3000, 2000), (10, 5000), (400, 400)]]
    examples += [PromptResponse("héllo wörld " * n, "ünïcode ✓ text " * m) for n, m in [(500, 700), (2000, 3)]]
    opts = TokenizeOptions(max_prompt_len=16, max_response_len=8)
    assert sum(len(e.prompt) > (16 + 9) * T.WINDOW_CHARS_PER_TOKEN for e in examples) == 4  # windowed prompts
    for tok in (tokenizer, make_byte_tokenizer()):
        windowed = tokenize_sft(examples, tok, opts)
        T.WINDOW_CHARS_PER_TOKEN, default = 10**12, T.WINDOW_CHARS_PER_TOKEN  # no window: every text whole
        try:
            whole = tokenize_sft(examples, tok, opts)
        finally:
            T.WINDOW_CHARS_PER_TOKEN = default
        assert windowed == whole
        assert windowed[1].responses_truncated == 5
