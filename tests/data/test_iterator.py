"""Order: seeded epoch-aware shuffling, host shards disjoint and covering, exact resume, train/eval split."""

import json

import numpy as np
import pytest

from pe_rlhf.data.iterator import BatchIterator, epoch_order, train_eval_split


def collate(rows):
    return {"x_B": np.asarray(rows)}


def take(it, n):
    return [next(it)["x_B"].tolist() for _ in range(n)]


def test_epoch_order_is_a_seeded_permutation_that_changes_each_epoch():
    a = epoch_order(50, 0, seed=7)
    assert sorted(a.tolist()) == list(range(50))
    np.testing.assert_array_equal(a, epoch_order(50, 0, seed=7))
    assert a.tolist() != epoch_order(50, 1, seed=7).tolist()
    assert a.tolist() != epoch_order(50, 0, seed=8).tolist()
    np.testing.assert_array_equal(epoch_order(50, 3, seed=7, shuffle=False), np.arange(50))


def test_unshuffled_shards_by_hand():
    shards = [epoch_order(10, 0, seed=0, shuffle=False, process_index=h, process_count=3).tolist() for h in range(3)]
    assert shards == [[0, 3, 6], [1, 4, 7], [2, 5, 8]]


@pytest.mark.parametrize("n,hosts", [(12, 4), (10, 3), (7, 7)])
def test_shards_are_disjoint_equal_and_cover_the_epoch(n, hosts):
    for epoch in range(3):
        shards = [set(epoch_order(n, epoch, seed=1, process_index=h, process_count=hosts).tolist())
                  for h in range(hosts)]
        assert [len(s) for s in shards] == [n // hosts] * hosts
        union = set().union(*shards)
        assert len(union) == hosts * (n // hosts)  # pairwise disjoint
        full = epoch_order(n, epoch, seed=1)
        assert union == set(full[:hosts * (n // hosts)].tolist())  # exactly the epoch's leading entries
    with pytest.raises(ValueError, match="process_index 3 is not in \\[0, process_count=3\\)"):
        epoch_order(10, 0, seed=0, process_index=3, process_count=3)


def test_batches_follow_the_epoch_orders():
    it = BatchIterator(list(range(10)), 3, collate, seed=5)
    assert it.steps_per_epoch == 3
    batches = take(it, 6)
    for epoch in range(2):
        expected = epoch_order(10, epoch, seed=5)[:9].reshape(3, 3).tolist()
        assert batches[3 * epoch:3 * epoch + 3] == expected
    items = [f"ex{i}" for i in range(10)]  # any items: strings here
    first = next(BatchIterator(items, 3, collate, seed=5))
    assert first["x_B"].tolist() == [f"ex{i}" for i in epoch_order(10, 0, seed=5)[:3]]
    np.testing.assert_array_equal(first["valid_B"], [1.0, 1.0, 1.0])


def test_resume_continues_exactly():
    it = BatchIterator(list(range(10)), 3, collate, seed=3)
    take(it, 3)
    assert it.state() == {"epoch": 0, "position": 9, "seed": 3, "num_examples": 10}
    take(it, 1)
    state = json.loads(json.dumps(it.state()))  # what a checkpoint stores
    assert state == {"epoch": 1, "position": 3, "seed": 3, "num_examples": 10}
    expected = take(it, 7)  # crosses into epochs 2 and 3
    resumed = BatchIterator(list(range(10)), 3, collate, seed=3)
    resumed.restore(state)
    assert take(resumed, 7) == expected


def test_hosts_resume_from_one_shared_state():
    items = list(range(20))
    hosts = [BatchIterator(items, 2, collate, seed=0, process_index=h, process_count=2) for h in range(2)]
    for it in hosts:
        take(it, 3)
    assert hosts[0].state() == hosts[1].state() == {"epoch": 0, "position": 6, "seed": 0, "num_examples": 20}
    later = [take(it, 6) for it in hosts]
    rest = [sum(b[:2], []) for b in later]  # the last 2 batches of epoch 0 (5 per host per epoch)
    assert set(rest[0]).isdisjoint(rest[1])
    for h in range(2):
        again = BatchIterator(items, 2, collate, seed=0, process_index=h, process_count=2)
        again.restore({"epoch": 0, "position": 6, "seed": 0, "num_examples": 20})
        assert take(again, 6) == later[h]


def test_last_partial_batch_is_filled_and_marked_and_epochs_end():
    it = BatchIterator(list(range(5)), 2, collate, shuffle=False, num_epochs=1, drop_remainder=False)
    assert it.steps_per_epoch == 3
    out = list(it)
    assert [b["x_B"].tolist() for b in out] == [[0, 1], [2, 3], [4, 4]]
    assert [b["valid_B"].tolist() for b in out] == [[1.0, 1.0], [1.0, 1.0], [1.0, 0.0]]
    with pytest.raises(StopIteration):
        next(it)
    two = BatchIterator(list(range(5)), 2, collate, shuffle=False, num_epochs=2)
    assert [b["x_B"].tolist() for b in two] == [[0, 1], [2, 3], [0, 1], [2, 3]]


def test_bad_states_and_sizes():
    it = BatchIterator(list(range(10)), 3, collate, seed=3)
    with pytest.raises(ValueError, match="saved with seed=4 but this iterator has seed=3"):
        it.restore({"epoch": 0, "position": 0, "seed": 4, "num_examples": 10})
    with pytest.raises(ValueError, match="saved with num_examples=11 but this iterator has num_examples=10"):
        it.restore({"epoch": 0, "position": 0, "seed": 3, "num_examples": 11})
    with pytest.raises(ValueError, match="iterator state is missing \\['position'\\]"):
        it.restore({"epoch": 0, "seed": 3, "num_examples": 10})
    with pytest.raises(ValueError, match="10 items over 4 hosts leaves 2 per host, fewer than one batch of 3"):
        BatchIterator(list(range(10)), 3, collate, process_count=4)
    with pytest.raises(ValueError, match="BatchIterator got no items"):
        BatchIterator([], 3, collate)


def test_train_eval_split_is_seeded_and_keeps_groups_together():
    items = list(range(10))
    train, evals = train_eval_split(items, eval_size=3, seed=0)
    assert len(train) == 7 and len(evals) == 3 and sorted(train + evals) == items
    assert train == sorted(train) and evals == sorted(evals)  # original order kept
    assert train_eval_split(items, eval_size=3, seed=0) == (train, evals)
    held = set(np.random.default_rng(0).permutation(10)[7:].tolist())  # the documented rule, by hand
    assert set(evals) == held
    assert len(train_eval_split(items, eval_size=0.3, seed=0)[1]) == 3
    train, evals = train_eval_split(items, eval_size=2, seed=1, group=lambda i: i // 2)  # groups {0,1},{2,3},...
    assert len(evals) == 4 and {i // 2 for i in train}.isdisjoint({i // 2 for i in evals})
    with pytest.raises(ValueError, match="eval_size=10 holds out 10 of 10 groups"):
        train_eval_split(items, eval_size=10)
