"""Packed reward-model batches: the layout by hand, and the iterator's variable number of items."""

import numpy as np
import pytest

from pe_rlhf import data as D
from pe_rlhf.data import packing as PK


def test_pack_lays_out_prompt_once_and_responses_after_it():
    pairs = [D.TokenizedPair([11, 12, 13], [21, 22], [31], margin=0.5), D.TokenizedPair([14], [23], [32, 33])]
    b = PK.pack(pairs, PK.PackOptions(rows=1, length=64, items_per_row=3), pad_id=0)
    assert b["tokens_RxN"][0, :11].tolist() == [11, 12, 13, 21, 22, 31, 14, 23, 32, 33, 0]
    assert b["positions_RxN"][0, :10].tolist() == [0, 1, 2, 3, 4, 3, 0, 1, 1, 2]  # each branch continues the prompt
    assert b["segment_RxN"][0, :11].tolist() == [0, 0, 0, 0, 0, 0, 1, 1, 1, 1, -1]
    assert b["branch_RxN"][0, :10].tolist() == [0, 0, 0, 1, 1, 2, 0, 1, 2, 2]
    assert b["read_RxPxK"][0].tolist() == [[4, 5], [7, 9], [0, 0]]  # last chosen / rejected token
    assert b["valid_RxP"].tolist() == [[1.0, 1.0, 0.0]]
    assert b["margin_RxP"].tolist() == [[0.5, 0.0, 0.0]]


def test_unshared_prompt_lays_out_each_response_as_its_own_sequence():
    pairs = [D.TokenizedPair([11, 12], [21, 22], [31], margin=0.5), D.TokenizedPair([14], [23], [32, 33])]
    options = PK.PackOptions(rows=1, length=64, items_per_row=3, share_prompt=False)
    b = PK.pack(pairs, options, pad_id=0)
    assert b["tokens_RxN"][0, :13].tolist() == [11, 12, 21, 22, 11, 12, 31, 14, 23, 14, 32, 33, 0]
    assert b["positions_RxN"][0, :12].tolist() == [0, 1, 2, 3, 0, 1, 2, 0, 1, 0, 1, 2]
    assert b["segment_RxN"][0, :13].tolist() == [0, 0, 0, 0, 1, 1, 1, 2, 2, 3, 3, 3, -1]
    assert "branch_RxN" not in b  # the model reads its absence as "no shared prompt"
    assert b["read_RxPxK"][0].tolist() == [[3, 6], [8, 11], [0, 0]]
    assert b["valid_RxP"].tolist() == [[1.0, 1.0, 0.0]]
    assert b["margin_RxP"].tolist() == [[0.5, 0.0, 0.0]]
    assert [PK.packed_length(p, False) for p in pairs] == [7, 5] and PK.packed_length(pairs[0]) == 5
    assert PK.span(30, 12, 2) == 54 and PK.span(30, 12, 2, share_prompt=False) == 42
    long = [D.TokenizedPair([1] * 30, [2] * 2, [3] * 2)]  # 34 tokens shared, 64 unshared
    assert PK.fits(long, PK.PackOptions(rows=1, length=64, items_per_row=1))
    with pytest.raises(ValueError, match=r"longest 64\) do not fit .* the prompt once per response"):
        PK.pack(long * 2, PK.PackOptions(rows=1, length=64, items_per_row=2, share_prompt=False))


def test_first_fit_uses_later_rows_and_reports_what_does_not_fit():
    opts = PK.PackOptions(rows=2, length=64, items_per_row=2)
    assert PK.first_fit([40, 30, 20, 10], opts) == [0, 1, 0, 1]
    assert PK.first_fit([40, 30, 30], opts) == [0, 1, 1]
    assert PK.first_fit([40, 40, 40], opts) is None
    assert PK.first_fit([5, 5, 5, 5, 5], opts) is None  # items_per_row caps each row at 2
    labeled = [D.TokenizedLabeled([1] * 30, [2] * 40, 1.0)]
    with pytest.raises(ValueError, match=r"longest 70\) do not fit in 2 rows of 64 tokens"):
        PK.pack(labeled, opts)
    with pytest.raises(ValueError, match="multiple of 64"):
        PK.PackOptions(rows=1, length=100, items_per_row=1)


def test_labeled_items_pack_one_response_with_their_label():
    items = [D.TokenizedLabeled([1, 2], [3], 1.0), D.TokenizedLabeled([4], [5, 6], 0.0)]
    b = PK.pack(items, PK.PackOptions(rows=1, length=64, items_per_row=2))
    assert b["read_RxPxK"].tolist() == [[[2], [5]]]
    assert b["label_RxP"].tolist() == [[1.0, 0.0]]


def test_iterator_takes_as_many_items_as_fit_and_resumes_exactly():
    # lengths 3 + 2 + 2 = 7 each; 3 fit in a 64-token row only if short enough
    items = [D.TokenizedPair([1] * n, [2, 3], [4, 5]) for n in (20, 30, 10, 40, 5, 25)]
    opts = PK.PackOptions(rows=1, length=64, items_per_row=4)
    make = lambda: D.BatchIterator(items, 4, lambda xs: PK.pack(xs, opts), shuffle=False,
                                   fits=lambda xs: PK.fits(xs, opts))
    it = make()
    counts = []
    for _ in range(4):
        b = next(it)
        counts.append(int(b["valid_RxP"].sum()))
    # 24+34 fit (58), +14 does not; 14 + 44 = 58; 9 + 29 = 38 (end of the epoch); then again 2
    assert counts == [2, 2, 2, 2]
    it2 = make()
    next(it2)
    state = it2.state()
    it3 = make()
    it3.restore(state)
    np.testing.assert_array_equal(next(it3)["tokens_RxN"], next(it2)["tokens_RxN"])
