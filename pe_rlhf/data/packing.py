"""Reward-model batches packed to their real length: a pair's prompt computed once.

A padded pair batch holds `prompt + chosen` and `prompt + rejected` in two rows of
`seq_len` slots each, so the prompt goes through the model twice and short pairs
carry padding. A packed batch lays each item out once as `[prompt | response 1 |
response 2 ...]` and places items one after another in `rows` rows of `length`
slots (first fit). `Transformer.hidden(..., packing=Packing(...))` keeps the
items apart and lets each response see only the prompt and itself, with
positions that restart after the prompt, so every score equals the padded one.
On Anthropic HH (Gemma tokenizer, 192 + 64 tokens) a pair averages 167 packed
tokens instead of 512 padded slots.

With `PackOptions.share_prompt=False` each response is laid out as its own
sequence `[prompt | response k]`, the prompt repeated: more tokens per pair, but
every segment is plain causal attention, which the fused kernels (splash, cuDNN:
`ModelConfig.attention_impl`) take through segment ids; a shared prompt needs the
XLA path (two continuations of one prompt must not see each other). Such a batch
has no `branch_RxN`, and that is how the model tells the layouts apart.

Keys (R rows, N = length, P = items per row, K responses per item):
- `tokens_RxN`, `positions_RxN`, `segment_RxN` (the item's slot in its row, or with
  an unshared prompt the sequence's; -1 on padding), `branch_RxN` (0 prompt, k for
  response k; only when the prompt is shared);
- `read_RxPxK`: the column of each response's last token (where its score is read);
- `valid_RxP`: 1 where a slot holds an item; `margin_RxP` (pairs) or `label_RxP`.
How many items a batch takes depends on their lengths (`fits` tells the iterator).
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from pe_rlhf.data.tokenize import TokenizedLabeled, TokenizedPair

CHUNK = 64  # Packing.chunk: rows are a multiple of it


@dataclasses.dataclass(frozen=True)
class PackOptions:
    """`rows` rows of `length` tokens per batch, at most `items_per_row` items in a row; `share_prompt`:
    each item's prompt once, its responses branching from it (False: the prompt repeated per response)."""

    rows: int
    length: int
    items_per_row: int
    share_prompt: bool = True

    def __post_init__(self):
        if self.rows < 1 or self.items_per_row < 1:
            raise ValueError(f"PackOptions: rows and items_per_row must be >= 1, got {self}")
        if self.length < CHUNK or self.length % CHUNK:
            raise ValueError(f"PackOptions.length={self.length} must be a positive multiple of {CHUNK} "
                             "(the attention chunk of packed rows)")


def pieces(item) -> tuple[Sequence[int], tuple[Sequence[int], ...]]:
    """(prompt, responses) of a tokenised pair or labelled example."""
    if isinstance(item, TokenizedPair):
        return item.prompt, (item.chosen, item.rejected)
    if isinstance(item, TokenizedLabeled):
        return item.prompt, (item.response,)
    raise TypeError(f"cannot pack a {type(item).__name__}; packing takes TokenizedPair or TokenizedLabeled")


def packed_length(item, share_prompt: bool = True) -> int:
    prompt, responses = pieces(item)
    return longest(len(prompt), 0, len(responses), share_prompt) + sum(len(r) for r in responses)


def first_fit(lengths: Sequence[int], options: PackOptions) -> list[int] | None:
    """The row of each item, in order, each in the first row with room; None if they do not all fit."""
    used, counts, rows = [0] * options.rows, [0] * options.rows, []
    for n in lengths:
        for r in range(options.rows):
            if used[r] + n <= options.length and counts[r] < options.items_per_row:
                used[r] += n
                counts[r] += 1
                rows.append(r)
                break
        else:
            return None
    return rows


def fits(items: Sequence, options: PackOptions) -> bool:
    return first_fit([packed_length(i, options.share_prompt) for i in items], options) is not None


def pack(items: Sequence, options: PackOptions, *, pad_id: int = 0) -> dict[str, np.ndarray]:
    """Items (all pairs or all labelled examples) -> one packed batch (see the module docstring)."""
    if not items:
        raise ValueError("cannot pack zero items")
    lengths = [packed_length(i, options.share_prompt) for i in items]
    rows_of = first_fit(lengths, options)
    if rows_of is None:
        longest = max(lengths)
        raise ValueError(f"{len(items)} items of {sum(lengths)} tokens (longest {longest}) do not fit in "
                         f"{options.rows} rows of {options.length} tokens, {options.items_per_row} items a row; "
                         "PackOptions.length must be at least the longest item (prompt + responses; with share_prompt=False, "
                         "the prompt once per response)")
    R, N, P = options.rows, options.length, options.items_per_row
    K = len(pieces(items[0])[1])
    tokens = np.full((R, N), pad_id, np.int32)
    positions = np.zeros((R, N), np.int32)
    segment = np.full((R, N), -1, np.int32)
    branch = np.zeros((R, N), np.int32)
    read = np.zeros((R, P, K), np.int32)
    valid = np.zeros((R, P), np.float32)
    value = np.zeros((R, P), np.float32)
    fill, count, sequences = [0] * R, [0] * R, [0] * R
    for item, r in zip(items, rows_of):
        prompt, responses = pieces(item)
        if len(responses) != K:
            raise ValueError("a packed batch mixes items with different numbers of responses")
        p, start = count[r], fill[r]
        valid[r, p] = 1.0
        value[r, p] = item.margin if isinstance(item, TokenizedPair) else item.label
        count[r] = p + 1
        if not options.share_prompt:  # [prompt | response k] per response, each its own segment
            for k, response in enumerate(responses):
                seq = list(prompt) + list(response)
                end = start + len(seq)
                tokens[r, start:end] = seq
                positions[r, start:end] = np.arange(len(seq))
                segment[r, start:end] = sequences[r]
                read[r, p, k] = end - 1
                sequences[r] += 1
                start = end
            fill[r] = start
            continue
        tokens[r, start:start + len(prompt)] = prompt
        positions[r, start:start + len(prompt)] = np.arange(len(prompt))
        segment[r, start:start + len(prompt)] = p
        col = start + len(prompt)
        for k, response in enumerate(responses):
            n = len(response)
            tokens[r, col:col + n] = response
            positions[r, col:col + n] = len(prompt) + np.arange(n)
            segment[r, col:col + n] = p
            branch[r, col:col + n] = k + 1
            read[r, p, k] = col + n - 1 if n else start + len(prompt) - 1  # an empty response reads the prompt
            col += n
        fill[r] = col
    batch = {"tokens_RxN": tokens, "positions_RxN": positions, "segment_RxN": segment,
             "read_RxPxK": read, "valid_RxP": valid}
    if options.share_prompt:
        batch["branch_RxN"] = branch
    batch["margin_RxP" if K == 2 else "label_RxP"] = value
    return batch


def longest(max_prompt_len: int, max_response_len: int, responses: int, share_prompt: bool = True) -> int:
    """The most tokens one item of a config takes in a packed row (`packed_length` at the config's limits)."""
    return max_prompt_len * (1 if share_prompt else responses) + responses * max_response_len


def span(max_prompt_len: int, max_response_len: int, responses: int, share_prompt: bool = True) -> int:
    """The longest packed segment a config allows (an item, or with an unshared prompt one sequence): the
    attention window of its packed rows."""
    return max_prompt_len + (responses if share_prompt else 1) * max_response_len
