"""Real HH pairs -> byte tokens -> sharded, shuffled, left-padded batches, checked against byte counts."""

import functools
import os

import numpy as np

from pe_rlhf.data import (BatchIterator, TokenizeOptions, batch_preferences, epoch_order, read_hh_harmless,
                          tokenize_preferences)
from pe_rlhf.data.sources import HH_HARMLESS
from tests.data.tiny import make_byte_tokenizer


def test_hh_to_batches(shared_data):
    examples = read_hh_harmless(os.path.join(shared_data, HH_HARMLESS)).examples
    opts = TokenizeOptions(max_prompt_len=256, max_response_len=16)
    pairs, stats = tokenize_preferences(examples, make_byte_tokenizer(), opts)

    # reference from byte counts: [BOS] + prompt bytes, response bytes + [EOS]
    def cut(text):
        return (list(text.encode("utf-8")) + [-1])[:16]

    identical = sum(cut(e.chosen) == cut(e.rejected) for e in examples)
    kept = [e for e in examples if cut(e.chosen) != cut(e.rejected)]
    assert stats.examples == 1800 and stats.kept == 1800 - identical == len(pairs)
    assert stats.dropped_identical == identical and stats.dropped_empty == stats.dropped_overlong == 0
    assert stats.prompts_truncated == sum(1 + len(e.prompt.encode()) > 256 for e in kept)
    assert stats.responses_truncated == sum((len(r.encode()) + 1 > 16) for e in kept for r in (e.chosen, e.rejected))
    assert stats.prompts_truncated > 1000 and identical > 0  # the limits bite on this data (9 pairs agree on 16 bytes)
    for e, p in zip(kept, pairs):
        assert len(p.prompt) == min(256, 1 + len(e.prompt.encode())) and p.prompt[0] == 256
        assert len(p.chosen) == min(16, len(e.chosen.encode()) + 1)
        assert (p.chosen[-1] == 257) == (len(e.chosen.encode()) + 1 <= 16)

    collate = functools.partial(batch_preferences, seq_len=272, pad_id=258, padding="left")
    it = BatchIterator(pairs, 8, collate, seed=0, process_index=1, process_count=2)
    assert it.steps_per_epoch == (len(pairs) // 2) // 8
    batch = next(it)
    rows = [pairs[i] for i in epoch_order(len(pairs), 0, seed=0, process_index=1, process_count=2)[:8]]
    assert batch["chosen_tokens_BxT"].shape == (8, 272) and batch["margin_B"].shape == (8,)
    np.testing.assert_array_equal(batch["chosen_mask_BxT"].sum(1), [len(r.prompt) + len(r.chosen) for r in rows])
    np.testing.assert_array_equal(batch["rejected_response_mask_BxT"].sum(1), [len(r.rejected) for r in rows])
    np.testing.assert_array_equal(batch["chosen_tokens_BxT"][:, -1], [r.chosen[-1] for r in rows])
    np.testing.assert_array_equal(batch["valid_B"], np.ones(8))
