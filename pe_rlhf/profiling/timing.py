"""Wall-clock time of a step, compilation excluded.

JAX dispatches asynchronously, so each timed call blocks on every output
before the clock stops. Warm-up calls (at least one) absorb compilation and
are not timed. `fn` must not donate `args`: it is called repeatedly on them.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class TimingReport:
    """Seconds per call: the median and every timed call, in order."""

    median_s: float
    all_s: tuple[float, ...]

    def __str__(self) -> str:
        return f"median {self.median_s * 1e3:.3f} ms over {len(self.all_s)} calls"


def time_step(fn: Callable, args: Sequence, warmup: int = 1, iters: int = 5) -> TimingReport:
    """Call `fn(*args)` `warmup` times untimed, then `iters` times timed, blocking on the results."""
    if warmup < 1:
        raise ValueError(f"warmup={warmup}: at least one warm-up call is needed to keep compilation out of the timing")
    if iters < 1:
        raise ValueError(f"iters={iters}: at least one timed call is needed")
    args = tuple(args)
    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return TimingReport(median_s=statistics.median(times), all_s=tuple(times))


def dot_rate(m: int, k: int, n: int, dtype=jnp.float32, iters: int = 5) -> float:
    """FLOP/s of one lone jitted [m, k] x [k, n] dot on the default device (median of `iters` calls).

    The machine's matmul rate at a step's shapes, measured beside the step: a step's FLOP/s over it
    says how much of the machine the step uses, and it tells a slower machine from a slower step.
    """
    a = jnp.ones((m, k), dtype)
    b = jnp.ones((k, n), dtype)
    report = time_step(jax.jit(jnp.matmul), (a, b), warmup=1, iters=iters)
    return 2.0 * m * k * n / report.median_s
