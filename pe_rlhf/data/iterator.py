"""Deterministic order: train/eval split, per-epoch shuffling, host sharding, resumable batches.

Order of epoch e: a permutation of all N examples drawn from `(seed, e)` (the
identity when `shuffle=False`); host h of P takes every P-th entry starting at h,
cut to N // P entries so every host makes the same number of steps (the N % P
left over differ from epoch to epoch). Each host batches only its own entries,
so hosts are disjoint and together cover the epoch.

`BatchIterator.state()` is a small dict of ints, the same on every host, that a
checkpoint can store; `restore(state)` continues with exactly the next batch.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Hashable, Sequence

import numpy as np


def train_eval_split(items: Sequence, *, eval_size: int | float, seed: int = 0,
                     group: Callable[[Any], Hashable] | None = None) -> tuple[list, list]:
    """Hold out the last `eval_size` groups of a seeded permutation (a count, or a fraction if < 1).

    `group(item)` keeps related items on one side (e.g. `lambda e: e.prompt` so
    one Taskmaster context never lands in both); default: each item is its own
    group. Both sides keep the items' original order.
    """
    keys = [group(x) for x in items] if group is not None else list(range(len(items)))
    distinct = list(dict.fromkeys(keys))
    n = len(distinct)
    n_eval = round(eval_size * n) if isinstance(eval_size, float) and eval_size < 1 else int(eval_size)
    if not 0 < n_eval < n:
        raise ValueError(f"eval_size={eval_size} holds out {n_eval} of {n} groups; it must leave both sides non-empty")
    order = np.random.default_rng(seed).permutation(n)
    held_out = {distinct[i] for i in order[n - n_eval:]}
    train = [x for x, k in zip(items, keys) if k not in held_out]
    evals = [x for x, k in zip(items, keys) if k in held_out]
    return train, evals


def epoch_order(num_examples: int, epoch: int, *, seed: int, shuffle: bool = True,
                process_index: int = 0, process_count: int = 1) -> np.ndarray:
    """Indices this host reads in `epoch`, in order (see the module docstring)."""
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} is not in [0, process_count={process_count})")
    order = np.random.default_rng([seed, epoch]).permutation(num_examples) if shuffle else np.arange(num_examples)
    return order[process_index::process_count][:num_examples // process_count]


class BatchIterator:
    """Batches of `collate(list_of_items)` in a seeded, sharded, resumable order.

    `batch_size` is per host. With `drop_remainder=False` the last batch of an
    epoch is filled up to `batch_size` with copies of its first item; every batch
    carries `valid_B` (float32, 1 on real rows, 0 on filler). `num_epochs=None`
    repeats forever.

    With `fits` (packed batches, `data.packing`), a batch is the longest run of at
    most `batch_size` next items for which `fits(items)` holds; `collate` gets only
    those (no filler, no `valid_B`: the packed batch marks its own slots), and an
    epoch ends when every item of this host has been taken.
    """

    def __init__(self, items: Sequence, batch_size: int, collate: Callable[[list], dict], *, seed: int = 0,
                 shuffle: bool = True, num_epochs: int | None = None, drop_remainder: bool = True,
                 process_index: int = 0, process_count: int = 1, fits: Callable[[list], bool] | None = None):
        if not len(items):
            raise ValueError("BatchIterator got no items")
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        per_host = len(items) // process_count
        if per_host < (batch_size if drop_remainder else 1):
            raise ValueError(
                f"{len(items)} items over {process_count} hosts leaves {per_host} per host, "
                f"fewer than one batch of {batch_size}; use a smaller batch_size or drop_remainder=False"
            )
        self.items, self.batch_size, self.collate = items, batch_size, collate
        self.seed, self.shuffle, self.num_epochs, self.drop_remainder = seed, shuffle, num_epochs, drop_remainder
        self.process_index, self.process_count = process_index, process_count
        self.fits = fits
        self.per_host = per_host
        self.epoch, self.position = 0, 0
        self._order_epoch, self._order = None, None

    @property
    def steps_per_epoch(self) -> int:
        if self.drop_remainder:
            return self.per_host // self.batch_size
        return math.ceil(self.per_host / self.batch_size)

    def _epoch_end(self) -> int:
        if self.fits is not None or not self.drop_remainder:
            return self.per_host
        return self.steps_per_epoch * self.batch_size

    def _current_order(self) -> np.ndarray:
        if self._order_epoch != self.epoch:
            self._order = epoch_order(len(self.items), self.epoch, seed=self.seed, shuffle=self.shuffle,
                                      process_index=self.process_index, process_count=self.process_count)
            self._order_epoch = self.epoch
        return self._order

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        if self.position >= self._epoch_end():
            self.epoch, self.position = self.epoch + 1, 0
        if self.num_epochs is not None and self.epoch >= self.num_epochs:
            raise StopIteration
        indices = self._current_order()[self.position:min(self.position + self.batch_size, self._epoch_end())]
        if self.fits is not None:
            return self._next_packed(indices)
        self.position += len(indices)
        rows = [self.items[i] for i in indices]
        filler = self.batch_size - len(rows)
        batch = dict(self.collate(rows + [rows[0]] * filler))
        batch["valid_B"] = np.asarray([1.0] * len(rows) + [0.0] * filler, np.float32)
        return batch

    def _next_packed(self, indices) -> dict:
        rows = [self.items[i] for i in indices]
        while rows and not self.fits(rows):
            rows.pop()
        if not rows:
            raise ValueError(f"item {int(indices[0])} alone does not fit in a packed batch; raise the packed "
                             "row length (DataConfig.pack_length) to at least its prompt + responses (with "
                             "DataConfig.pack_share_prompt=False, its prompt once per response + responses)")
        self.position += len(rows)
        return dict(self.collate(rows))

    def state(self) -> dict[str, int]:
        """Position to save in a checkpoint (identical on every host)."""
        return {"epoch": int(self.epoch), "position": int(self.position), "seed": int(self.seed),
                "num_examples": len(self.items)}

    def restore(self, state: dict) -> None:
        """Continue from `state()`; refuses a state saved for another seed or dataset size."""
        missing = {"epoch", "position", "seed", "num_examples"} - set(state)
        if missing:
            raise ValueError(f"iterator state is missing {sorted(missing)}; got keys {sorted(state)}")
        for key, mine in (("seed", self.seed), ("num_examples", len(self.items))):
            if int(state[key]) != mine:
                raise ValueError(
                    f"iterator state was saved with {key}={int(state[key])} but this iterator has {key}={mine}; "
                    "restore it on the same data and seed"
                )
        epoch, position = int(state["epoch"]), int(state["position"])
        if epoch < 0 or not 0 <= position <= self.per_host:
            raise ValueError(f"iterator state has epoch={epoch}, position={position}; "
                             f"expected epoch >= 0 and 0 <= position <= {self.per_host}")
        self.epoch, self.position = epoch, position
