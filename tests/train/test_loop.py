"""The training loop on a one-parameter job: it does not wait on the device between log steps, and a run
whose updates were mostly skipped stops even when no `max_nonfinite_updates` of them came in a row."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from pe_rlhf.data import BatchIterator
from pe_rlhf.train.config import LoopConfig
from pe_rlhf.train.loop import Job, NonFiniteError, train_loop
from pe_rlhf.train.optim import guard_nonfinite, guarded_update


def job(bad_steps, num_steps):
    """Fit w to 1 by SGD; the update of each step in `bad_steps` (1-based) has a NaN loss and is skipped."""
    tx = guard_nonfinite(optax.sgd(0.1))
    w = jnp.zeros(())

    @jax.jit
    def step(state, batch):
        loss_fn = lambda w: jnp.where(batch["bad"], jnp.nan, (w - 1.0) ** 2)  # noqa: E731
        loss, grad = jax.value_and_grad(loss_fn)(state["trainable"])
        w, opt_state = guarded_update(tx, grad, state["opt_state"], state["trainable"], loss)
        return {"trainable": w, "opt_state": opt_state}, {"loss": loss}

    flags = [step in bad_steps for step in range(1, num_steps + 1)]
    batches = BatchIterator(flags, 1, lambda items: {"bad": np.asarray(items[0])}, shuffle=False)
    return Job(state={"trainable": w, "opt_state": tx.init(w)}, step=step, batches=batches,
               evaluate=lambda state, step: {}, place=lambda state: state,
               info={"stage": "test", "identity": {"stage": "test"}}, examples=lambda batch: 1)


def loop(num_steps, **kw):
    return LoopConfig(**{"num_steps": num_steps, "eval_every": 0, "log_every": 1, "checkpoint_every": num_steps,
                         "progress_bar": False, "max_nonfinite_updates": 3, **kw})


def test_the_loop_reads_the_device_only_at_log_and_checkpoint_steps(tmp_path, monkeypatch):
    # Its reads are explicit (jax.device_get), counted here by the step they follow; an implicit read
    # (int() of an array, as a per-step check of the skipped count did) raises under the transfer guard.
    steps, reads = [], []
    device_get = jax.device_get
    monkeypatch.setattr(jax, "device_get", lambda x: (reads.append(len(steps)), device_get(x))[1])
    j = job(bad_steps={3}, num_steps=12)
    inner = j.step
    j.step = lambda state, batch: (steps.append(len(steps) + 1), inner(state, batch))[1]
    with jax.transfer_guard_device_to_host("disallow"):
        state, summary = train_loop(str(tmp_path), loop(12, log_every=6, checkpoint_every=6), j)
    assert len(steps) == 12 and set(reads) == {1, 6, 12}  # a fresh run also saves its first step
    assert summary["skipped_steps"] == 1
    rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert [(r["step"], r["train/skipped_steps"]) for r in rows if "train/loss" in r] == [(6, 1), (12, 1)]
    assert float(state["trainable"]) == pytest.approx(1 - 0.8 ** 11)  # 11 of the 12 updates applied


def test_most_updates_skipped_stops_the_run_at_its_last_step(tmp_path):
    # 7 of 10 skipped, never 3 in a row: the run does not end with exit 0 as if it had trained
    bad = {1, 2, 4, 5, 7, 8, 10}
    with pytest.raises(NonFiniteError, match=r"7 of the 10 updates through step 10 .* skipped, more than half"):
        train_loop(str(tmp_path), loop(10, log_every=5, checkpoint_every=5, max_nonfinite_updates=10), job(bad, 10))
    assert not (tmp_path / "summary.json").exists()
    # the last checkpoint is step 5's: the step-10 one was not saved
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()) == ["1", "5"]


def test_most_updates_skipped_stops_the_run_once_max_nonfinite_updates_were(tmp_path):
    # 3 (= max_nonfinite_updates) skipped by step 5, more than half: stop there, found at the step-8 log
    with pytest.raises(NonFiniteError, match=r"3 of the 5 updates through step 5 "):
        train_loop(str(tmp_path), loop(20, log_every=8, checkpoint_every=20), job({1, 3, 5}, 20))
    rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert rows == []  # stopped before the step-8 log was written


def test_a_few_skipped_updates_are_fine_and_a_resumed_run_ends_as_the_whole_one(tmp_path):
    bad = {2, 6, 7}  # 3 of 10 skipped, 2 in a row at most, never more than half
    _, whole = train_loop(str(tmp_path / "whole"), loop(10), job(bad, 10))
    assert whole["skipped_steps"] == 3
    train_loop(str(tmp_path / "resumed"), loop(5, checkpoint_every=5), job(bad, 10))
    state, resumed = train_loop(str(tmp_path / "resumed"), loop(10, checkpoint_every=5), job(bad, 10))
    assert resumed["skipped_steps"] == 3 and float(state["trainable"]) == pytest.approx(1 - 0.8 ** 7)
