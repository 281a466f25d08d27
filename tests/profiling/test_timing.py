"""time_step: blocks on results, reports every timed call, keeps warm-up (compilation) out."""

import statistics
import time

import jax
import jax.numpy as jnp
import pytest

from pe_rlhf.profiling import time_step


def test_jitted_step_has_positive_median():
    f = jax.jit(lambda x: jnp.tanh(x @ x.T).sum())
    report = time_step(f, (jnp.ones((64, 64)),), warmup=1, iters=5)
    assert len(report.all_s) == 5
    assert report.median_s > 0 and all(t > 0 for t in report.all_s)
    assert report.median_s == statistics.median(report.all_s)


def test_warmup_is_not_timed():
    calls = []

    def step(x):
        calls.append(len(calls))
        if len(calls) == 1:
            time.sleep(0.3)  # stands in for compilation on the first call
        return x + 1

    report = time_step(step, (jnp.zeros(3),), warmup=1, iters=3)
    assert len(calls) == 4  # 1 warm-up + 3 timed
    assert max(report.all_s) < 0.3


def test_bad_counts_are_errors():
    with pytest.raises(ValueError, match="warmup=0"):
        time_step(lambda: None, (), warmup=0)
    with pytest.raises(ValueError, match="iters=0"):
        time_step(lambda: None, (), iters=0)


def test_dot_rate_is_the_dots_flops_over_its_median_time(monkeypatch):
    from pe_rlhf.profiling import timing

    seen = {}

    def fake_time_step(fn, args, warmup, iters):
        seen["shapes"], seen["iters"] = [a.shape for a in args], iters
        return timing.TimingReport(median_s=0.25, all_s=(0.2, 0.25, 0.3))

    monkeypatch.setattr(timing, "time_step", fake_time_step)
    assert timing.dot_rate(8, 4, 2, iters=3) == 2 * 8 * 4 * 2 / 0.25
    assert seen == {"shapes": [(8, 4), (4, 2)], "iters": 3}
    monkeypatch.undo()
    assert timing.dot_rate(64, 32, 16) > 0  # a real measurement
