"""Where a compiled step's time goes: a jax.profiler trace summarised by XLA operation.

    with profiling.trace(log_dir):
        run_the_step_twice()
    summary = op_time_summary(log_dir, steps=2)

Reads the trace with XProf (`pip install xprof`, not a dependency of the library) and adds up the
durations of the XLA operations (thunks on the CPU, kernels elsewhere) by kind: the name without
its numeric suffix (`ynn_fusion.322` -> `ynn_fusion`). On the CPU independent operations run on
different threads at once, so the summed operation time can exceed the wall time; `busy_s` is the
time during which at least one operation ran, and `concurrency` their ratio. Each kind's share of
the busy time (`wall_s`) says what the wall clock is spent on.
"""

from __future__ import annotations

import collections
import glob
import json
import os
import re

# profiler bookkeeping around the operations, not operations themselves
_NOT_OPS = ("ThreadpoolListener", "ThunkExecutor", "$", "SlinkyThreadPool", "PjitFunction", "ParseArguments",
            "CommonPjRtLoadedExecutable", "Wait for donation holds")


def _trace_events(log_dir: str) -> list[dict]:
    paths = sorted(glob.glob(os.path.join(log_dir, "**", "*.xplane.pb"), recursive=True))
    if not paths:
        raise FileNotFoundError(f"{log_dir}: no *.xplane.pb trace; record one with pe_rlhf.profiling.trace(log_dir)")
    try:
        from xprof.convert import raw_to_tool_data
    except ImportError as e:
        raise ImportError("op_time_summary reads traces with XProf: pip install xprof") from e
    data, _ = raw_to_tool_data.xspace_to_tool_data([paths[-1]], "trace_viewer", {})
    return [e for e in json.loads(data)["traceEvents"] if e.get("ph") == "X"]


def summarize_ops(events: list[dict], steps: int = 1, top: int = 15) -> dict:
    """Per-step seconds by operation kind, the busy time and the mean concurrency of complete events
    (`name`, `ts` and `dur` in microseconds, as in the trace-viewer format).

    Each kind also gets `wall_s`, its share of the busy time (every instant split equally among the
    operations running then; the kinds' shares add up to `busy_s`), and `alone_s`, the time it ran
    with no other operation beside it (the other thread idle, unless the operation itself is
    multi-threaded, as XLA:CPU's large dots are).
    """
    ops = [e for e in events if not e["name"].startswith(_NOT_OPS)]
    if not ops:
        raise ValueError("the trace holds no XLA operations (was the step run inside the trace?)")
    kinds = [re.sub(r"\.\d+$", "", e["name"]) for e in ops]
    op_time, wall, alone = (collections.defaultdict(float) for _ in range(3))
    count = collections.Counter(kinds)
    for kind, e in zip(kinds, ops):
        op_time[kind] += e["dur"]
    # sweep the start and end points in time order; at equal times ends (-1) come before starts (+1)
    timed = [(i, e) for i, e in enumerate(ops) if e["dur"] > 0]
    if not timed:
        raise ValueError(f"the trace's {len(ops)} XLA operations all last 0 us: nothing to summarise")
    points = sorted([(e["ts"], 1, i) for i, e in timed] + [(e["ts"] + e["dur"], -1, i) for i, e in timed])
    running, last, busy = set(), points[0][0], 0.0
    for t, change, i in points:
        if running:
            busy += t - last
            for j in running:
                wall[kinds[j]] += (t - last) / len(running)
            if len(running) == 1:
                alone[kinds[next(iter(running))]] += t - last
        if change > 0:
            running.add(i)
        else:
            running.discard(i)
        last = t
    total = sum(op_time.values())
    top_kinds = sorted(op_time.items(), key=lambda kv: -kv[1])[:top]
    per_step = lambda us: us / 1e6 / steps
    return {
        "op_s": per_step(total),
        "busy_s": per_step(busy),
        "concurrency": total / busy,
        "kinds": [{"kind": k, "s": per_step(v), "share": v / total, "wall_s": per_step(wall[k]),
                   "alone_s": per_step(alone[k]), "count": count[k] / steps} for k, v in top_kinds],
    }


def op_time_summary(log_dir: str, steps: int = 1, top: int = 15) -> dict:
    """`summarize_ops` of the latest trace under `log_dir` (see the module docstring)."""
    return summarize_ops(_trace_events(log_dir), steps=steps, top=top)


def format_summary(summary: dict) -> str:
    lines = [f"operations {summary['op_s']:.2f} s per step, busy {summary['busy_s']:.2f} s "
             f"(concurrency {summary['concurrency']:.2f})",
             "| kind | s per step | share | wall share (s) | alone (s) | per step |", "|---|---:|---:|---:|---:|---:|"]
    lines += [f"| {k['kind']} | {k['s']:.3f} | {k['share']:.1%} | {k['wall_s']:.3f} | {k['alone_s']:.3f} | "
              f"{k['count']:g} |" for k in summary["kinds"]]
    return "\n".join(lines)
