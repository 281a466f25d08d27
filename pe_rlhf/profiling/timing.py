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
