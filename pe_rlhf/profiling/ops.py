"""Where a compiled step's time goes: a jax.profiler trace summarised by XLA operation.

    with profiling.trace(log_dir):
        run_the_step_twice()
    summary = op_time_summary(log_dir, steps=2)

Reads the trace with XProf (`pip install xprof`, not a dependency of the library) and adds up the
durations of the XLA operations (thunks on the CPU, kernels elsewhere) by kind: the name without
its numeric suffix (`ynn_fusion.322` -> `ynn_fusion`). On the CPU independent operations run on
different threads at once, so the summed operation time can exceed the wall time; `busy_s` is the
time during which at least one operation ran, and `concurrency` their ratio.
"""

from __future__ import annotations

import collections
import glob
import json
import os
import re

# profiler bookkeeping around the operations, not operations themselves
_NOT_OPS = ("ThreadpoolListener", "ThunkExecutor", "$", "SlinkyThreadPool", "PjitFunction", "ParseArguments",
            "CommonPjRtLoadedExecutable")


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
    (`name`, `ts` and `dur` in microseconds, as in the trace-viewer format)."""
    ops = [e for e in events if not e["name"].startswith(_NOT_OPS)]
    if not ops:
        raise ValueError("the trace holds no XLA operations (was the step run inside the trace?)")
    by_kind, count = collections.defaultdict(float), collections.Counter()
    for e in ops:
        kind = re.sub(r"\.\d+$", "", e["name"])
        by_kind[kind] += e["dur"]
        count[kind] += 1
    intervals = sorted((e["ts"], e["ts"] + e["dur"]) for e in ops)
    busy, (start, end) = 0.0, intervals[0]
    for s, e in intervals[1:]:  # the union of the intervals: merge overlaps, add up the rest
        if s > end:
            busy += end - start
            start, end = s, e
        else:
            end = max(end, e)
    busy += end - start
    total = sum(by_kind.values())
    kinds = sorted(by_kind.items(), key=lambda kv: -kv[1])[:top]
    return {
        "op_s": total / 1e6 / steps,
        "busy_s": busy / 1e6 / steps,
        "concurrency": total / busy,
        "kinds": [{"kind": k, "s": v / 1e6 / steps, "share": v / total, "count": count[k] / steps} for k, v in kinds],
    }


def op_time_summary(log_dir: str, steps: int = 1, top: int = 15) -> dict:
    """`summarize_ops` of the latest trace under `log_dir` (see the module docstring)."""
    return summarize_ops(_trace_events(log_dir), steps=steps, top=top)


def format_summary(summary: dict) -> str:
    lines = [f"operations {summary['op_s']:.2f} s per step, busy {summary['busy_s']:.2f} s "
             f"(concurrency {summary['concurrency']:.2f})", "| kind | s per step | share | per step |",
             "|---|---:|---:|---:|"]
    lines += [f"| {k['kind']} | {k['s']:.3f} | {k['share']:.1%} | {k['count']:g} |" for k in summary["kinds"]]
    return "\n".join(lines)
