"""Tokenised examples -> NumPy batches of fixed shapes (static for jit).

Every sequence is `prompt + response` placed in `seq_len` slots, padded on the
right (`padding="right"`: tokens first) or the left (`padding="left"`: tokens
last, as for generation). Keys carry their shapes (B batch, T seq_len):

- `mask_BxT`: 1 on real tokens, 0 on padding.
- `response_mask_BxT`: 1 on response tokens (EOS included). For SFT it marks the
  targets that count: the loss of predicting `tokens[:, t]` from position t-1
  is weighted by `response_mask_BxT[:, t]`, so prompt tokens are masked out.
- preference batches hold `chosen_*` and `rejected_*` versions of the three
  arrays and `margin_B`; classification batches add `label_B`.
- RL prompt batches are LEFT padded: `prompt_BxT`, `prompt_mask_BxT`.
Tokens are int32, masks int32, margins/labels float32. The model derives
positions from the mask (cumsum - 1), so left padding needs nothing more.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from pe_rlhf.data.tokenize import TokenizedLabeled, TokenizedPair, TokenizedSFT

PADDING_SIDES = ("right", "left")


def pad_sequences(pieces_B: Sequence[tuple[Sequence[int], Sequence[int]]], *, seq_len: int, pad_id: int = 0,
                  padding: str = "right") -> dict[str, np.ndarray]:
    """[(prompt_ids, response_ids)] -> tokens_BxT, mask_BxT, response_mask_BxT."""
    if padding not in PADDING_SIDES:
        raise ValueError(f"padding must be one of {PADDING_SIDES}, got {padding!r}")
    if not pieces_B:
        raise ValueError("cannot batch zero examples")
    B = len(pieces_B)
    tokens_BxT = np.full((B, seq_len), pad_id, np.int32)
    mask_BxT = np.zeros((B, seq_len), np.int32)
    response_mask_BxT = np.zeros((B, seq_len), np.int32)
    for b, (prompt, response) in enumerate(pieces_B):
        n = len(prompt) + len(response)
        if n > seq_len:
            raise ValueError(
                f"row {b} has {n} tokens ({len(prompt)} prompt + {len(response)} response) > seq_len {seq_len}; "
                "the batch length must be at least TokenizeOptions.max_prompt_len + max_response_len"
            )
        start = 0 if padding == "right" else seq_len - n
        tokens_BxT[b, start:start + n] = np.concatenate([np.asarray(prompt, np.int64),
                                                         np.asarray(response, np.int64)])
        mask_BxT[b, start:start + n] = 1
        response_mask_BxT[b, start + len(prompt):start + n] = 1
    return {"tokens_BxT": tokens_BxT, "mask_BxT": mask_BxT, "response_mask_BxT": response_mask_BxT}


def batch_preferences(pairs: Sequence[TokenizedPair], *, seq_len: int, pad_id: int = 0,
                      padding: str = "right") -> dict[str, np.ndarray]:
    """Pairs -> chosen_{tokens,mask,response_mask}_BxT, rejected_{...}_BxT, margin_B."""
    batch = {}
    for side in ("chosen", "rejected"):
        arrays = pad_sequences([(p.prompt, getattr(p, side)) for p in pairs], seq_len=seq_len, pad_id=pad_id,
                               padding=padding)
        batch.update({f"{side}_{name}": value for name, value in arrays.items()})
    batch["margin_B"] = np.asarray([p.margin for p in pairs], np.float32)
    return batch


def batch_labeled(examples: Sequence[TokenizedLabeled], *, seq_len: int, pad_id: int = 0,
                  padding: str = "right") -> dict[str, np.ndarray]:
    """Labelled examples -> tokens_BxT, mask_BxT, response_mask_BxT, label_B."""
    batch = pad_sequences([(e.prompt, e.response) for e in examples], seq_len=seq_len, pad_id=pad_id,
                          padding=padding)
    batch["label_B"] = np.asarray([e.label for e in examples], np.float32)
    return batch


def batch_sft(examples: Sequence[TokenizedSFT], *, seq_len: int, pad_id: int = 0,
              padding: str = "right") -> dict[str, np.ndarray]:
    """SFT examples -> tokens_BxT, mask_BxT, response_mask_BxT (the targets that count)."""
    return pad_sequences([(e.prompt, e.response) for e in examples], seq_len=seq_len, pad_id=pad_id,
                         padding=padding)


def batch_prompts(prompts: Sequence[Sequence[int]], *, prompt_len: int, pad_id: int = 0) -> dict[str, np.ndarray]:
    """RL prompts -> LEFT-padded prompt_BxT and prompt_mask_BxT (the sampler continues at column T)."""
    arrays = pad_sequences([(p, ()) for p in prompts], seq_len=prompt_len, pad_id=pad_id, padding="left")
    return {"prompt_BxT": arrays["tokens_BxT"], "prompt_mask_BxT": arrays["mask_BxT"]}
