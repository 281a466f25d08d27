"""Tokenisation with any Hugging Face tokenizer, with truncation counted, not hidden.

Layout of every sequence: `[BOS] prompt | response [EOS]`.
- BOS (when `add_bos` and the tokenizer has one) is added once, by us: texts are
  encoded with `add_special_tokens=False`, so a tokenizer that adds BOS itself
  does not add a second one.
- Prompts keep their END: too long a prompt loses tokens from the left (BOS stays
  first), because the last turns matter most to the response.
- Responses keep their START: too long a response loses tokens from the right.
  EOS is counted in `max_response_len`, so a truncated response has no EOS (it
  did not end there).
- `drop_overlong=True` drops examples that would be truncated instead.
Examples whose response has no tokens are dropped, and so are pairs whose two
responses are the same tokens after truncation (no preference is left); every
truncation and drop is counted in `TokenStats`.

A text far longer than its budget is not tokenised whole: a window at the end it
keeps (a prompt's last characters, a response's first) is, grown until it gives
`_MARGIN` tokens more than the budget; those next to the cut, which may differ from
the whole text's, are dropped. So a 20 MB text costs about what its budget does.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

from pe_rlhf.data.examples import LabeledExample, PreferenceExample, PromptResponse

Ids = tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class TokenizeOptions:
    """Token budgets; prompt + response fit `max_prompt_len + max_response_len` (the batch length).

    The default lengths are generic budgets, not values from the papers; experiments set their own.
    """

    max_prompt_len: int = 512  # includes BOS
    max_response_len: int = 256  # includes EOS
    add_bos: bool = True  # prepend the tokenizer's BOS when it has one
    add_eos: bool = True  # append EOS to each response
    drop_overlong: bool = False  # drop instead of truncate
    drop_long_responses: bool = False  # drop examples whose response (with EOS) does not fit; prompts may be cut
    eos_id: int | None = None  # overrides tokenizer.eos_token_id (e.g. Gemma's <end_of_turn>)

    def __post_init__(self):
        for name in ("max_prompt_len", "max_response_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"TokenizeOptions.{name} must be at least 1, got {getattr(self, name)}")


@dataclasses.dataclass(frozen=True)
class TokenStats:
    """What tokenisation did. `responses_truncated` counts responses (a pair has two)."""

    examples: int = 0
    kept: int = 0
    prompts_truncated: int = 0
    responses_truncated: int = 0
    dropped_overlong: int = 0
    dropped_empty: int = 0
    dropped_identical: int = 0

    def summary(self) -> str:
        return (f"{self.kept}/{self.examples} examples kept; truncated: {self.prompts_truncated} prompts, "
                f"{self.responses_truncated} responses; dropped: {self.dropped_overlong} overlong, "
                f"{self.dropped_empty} empty responses, {self.dropped_identical} identical pairs")


@dataclasses.dataclass(frozen=True)
class TokenizedPair:
    prompt: Ids
    chosen: Ids
    rejected: Ids
    margin: float = 0.0


@dataclasses.dataclass(frozen=True)
class TokenizedLabeled:
    prompt: Ids
    response: Ids
    label: float


@dataclasses.dataclass(frozen=True)
class TokenizedSFT:
    prompt: Ids
    response: Ids


# Texts over `(limit + _MARGIN + 1) * WINDOW_CHARS_PER_TOKEN` characters are tokenised from a window of
# that many (doubled while it gives too few tokens); 16 is several times the characters of a real token.
WINDOW_CHARS_PER_TOKEN = 16
_MARGIN = 8  # tokens next to a window's cut, dropped: a cut inside a word may tokenise it differently


def _tokenize(tokenizer, texts: list[str]) -> list[list[int]]:
    return [list(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]] if texts else []


def _window(text: str, chars: int, keep: str) -> str:
    return text[-chars:] if keep == "end" else text[:chars]


def _encode(tokenizer, texts: Sequence[str], limit: int, keep: str) -> list[list[int]]:
    """The ids of each text, or, for a text far over `limit` tokens, more than `limit` of the ids at the end
    it keeps ("end": prompts, "start": responses), from a window of it (module docstring)."""
    need = limit + _MARGIN + 1
    chars = [need * WINDOW_CHARS_PER_TOKEN] * len(texts)
    out = _tokenize(tokenizer, [_window(t, c, keep) for t, c in zip(texts, chars)])
    for i, text in enumerate(texts):
        while len(text) > chars[i] and len(out[i]) < need:  # too few tokens in the window: widen it
            chars[i] *= 2
            out[i] = _tokenize(tokenizer, [_window(text, chars[i], keep)])[0]
        if len(text) > chars[i]:  # windowed: drop the tokens next to the cut
            out[i] = out[i][_MARGIN:] if keep == "end" else out[i][:-_MARGIN]
    return out


def _special_ids(tokenizer, options: TokenizeOptions) -> tuple[int | None, int | None]:
    bos = tokenizer.bos_token_id if options.add_bos else None
    eos = None
    if options.add_eos:
        eos = options.eos_id if options.eos_id is not None else tokenizer.eos_token_id
        if eos is None:
            raise ValueError(
                f"{type(tokenizer).__name__} has no eos_token_id; set TokenizeOptions.eos_id or add_eos=False"
            )
    return bos, eos


def _prompt(ids: list[int], bos: int | None, limit: int) -> tuple[Ids, bool]:
    """[BOS] + ids, cut from the left (after BOS) to `limit` tokens."""
    head = [bos] if bos is not None else []
    keep = limit - len(head)
    truncated = len(ids) > keep
    if truncated:
        ids = ids[len(ids) - keep:] if keep > 0 else []
    return tuple(head + ids), truncated


def _response(ids: list[int], eos: int | None, limit: int) -> tuple[Ids, bool]:
    """ids + [EOS], cut from the right to `limit` tokens."""
    full = ids + ([eos] if eos is not None else [])
    return tuple(full[:limit]), len(full) > limit


class _Counter:
    """Mutable tallies while tokenising; frozen into `TokenStats` at the end."""

    def __init__(self, n: int):
        self.counts = {f.name: 0 for f in dataclasses.fields(TokenStats)}
        self.counts["examples"] = n

    def keep(self, responses: Sequence[tuple[Ids, bool]], prompt_cut: bool, options: TokenizeOptions) -> bool:
        """Whether an example with these (response, truncated) pieces survives; counts why not."""
        c = self.counts
        if any(not ids for ids, _ in responses):
            c["dropped_empty"] += 1
            return False
        n_cut = sum(cut for _, cut in responses)
        if (options.drop_overlong and (prompt_cut or n_cut)) or (options.drop_long_responses and n_cut):
            c["dropped_overlong"] += 1
            return False
        if len(responses) == 2 and responses[0][0] == responses[1][0]:
            c["dropped_identical"] += 1
            return False
        c["prompts_truncated"] += prompt_cut
        c["responses_truncated"] += n_cut
        c["kept"] += 1
        return True

    def stats(self) -> TokenStats:
        return TokenStats(**self.counts)


def tokenize_preferences(examples: Sequence[PreferenceExample], tokenizer,
                         options: TokenizeOptions = TokenizeOptions()) -> tuple[tuple[TokenizedPair, ...], TokenStats]:
    """Preference pairs -> token ids of the prompt and both responses, and what was cut or dropped."""
    bos, eos = _special_ids(tokenizer, options)
    prompts = _encode(tokenizer, [e.prompt for e in examples], options.max_prompt_len, "end")
    chosen = _encode(tokenizer, [e.chosen for e in examples], options.max_response_len, "start")
    rejected = _encode(tokenizer, [e.rejected for e in examples], options.max_response_len, "start")
    counter, out = _Counter(len(examples)), []
    for e, p, c, r in zip(examples, prompts, chosen, rejected):
        prompt, prompt_cut = _prompt(p, bos, options.max_prompt_len)
        responses = [_response(c, eos, options.max_response_len), _response(r, eos, options.max_response_len)]
        if counter.keep(responses, prompt_cut, options):
            out.append(TokenizedPair(prompt, responses[0][0], responses[1][0], float(e.margin)))
    return tuple(out), counter.stats()


def _prompt_response(examples, tokenizer, options) -> tuple[list, TokenStats]:
    """[(example, prompt_ids, response_ids)] of the kept examples, and the stats."""
    bos, eos = _special_ids(tokenizer, options)
    prompts = _encode(tokenizer, [e.prompt for e in examples], options.max_prompt_len, "end")
    responses = _encode(tokenizer, [e.response for e in examples], options.max_response_len, "start")
    counter, rows = _Counter(len(examples)), []
    for e, p, r in zip(examples, prompts, responses):
        prompt, prompt_cut = _prompt(p, bos, options.max_prompt_len)
        response = _response(r, eos, options.max_response_len)
        if counter.keep([response], prompt_cut, options):
            rows.append((e, prompt, response[0]))
    return rows, counter.stats()


def tokenize_labeled(examples: Sequence[LabeledExample], tokenizer,
                     options: TokenizeOptions = TokenizeOptions()) -> tuple[tuple[TokenizedLabeled, ...], TokenStats]:
    """Labelled prompt/response examples -> token ids and label."""
    rows, stats = _prompt_response(examples, tokenizer, options)
    return tuple(TokenizedLabeled(p, r, float(e.label)) for e, p, r in rows), stats


def tokenize_sft(examples: Sequence[PromptResponse], tokenizer,
                 options: TokenizeOptions = TokenizeOptions()) -> tuple[tuple[TokenizedSFT, ...], TokenStats]:
    """Prompt/response examples for supervised fine-tuning -> token ids."""
    rows, stats = _prompt_response(examples, tokenizer, options)
    return tuple(TokenizedSFT(p, r) for _, p, r in rows), stats


def tokenize_prompts(prompts: Sequence[str], tokenizer,
                     options: TokenizeOptions = TokenizeOptions()) -> tuple[tuple[Ids, ...], TokenStats]:
    """RL prompts -> `[BOS] prompt` ids cut from the left to `max_prompt_len` (or dropped if `drop_overlong`).

    Prompts with no tokens at all (empty text, no BOS) are dropped and counted.
    """
    bos, _ = _special_ids(tokenizer, dataclasses.replace(options, add_eos=False))
    counts = dict(examples=len(prompts), kept=0, prompts_truncated=0, dropped_overlong=0, dropped_empty=0)
    out = []
    for ids in _encode(tokenizer, list(prompts), options.max_prompt_len, "end"):
        prompt, cut = _prompt(ids, bos, options.max_prompt_len)
        if not prompt:
            counts["dropped_empty"] += 1
        elif cut and options.drop_overlong:
            counts["dropped_overlong"] += 1
        else:
            counts["prompts_truncated"] += cut
            counts["kept"] += 1
            out.append(prompt)
    return tuple(out), TokenStats(**counts)
