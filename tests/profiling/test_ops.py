"""The operation-time summary of a profiler trace, on hand-made events and on a real CPU trace."""

import pytest

from pe_rlhf.profiling.ops import format_summary, summarize_ops


def test_summary_adds_kinds_and_measures_overlap():
    events = [  # microseconds; two threads: dots overlap by 20, a copy runs alone, bookkeeping ignored
        {"name": "ynn_fusion.1", "ts": 0, "dur": 50},
        {"name": "ynn_fusion.2", "ts": 30, "dur": 40},
        {"name": "copy_fusion.7", "ts": 100, "dur": 10},
        {"name": "ThunkExecutor::Execute", "ts": 0, "dur": 200},
        {"name": "$api.py:2479 block_until_ready", "ts": 0, "dur": 200},
    ]
    s = summarize_ops(events, steps=2)
    assert s["op_s"] == pytest.approx(100e-6 / 2)
    assert s["busy_s"] == pytest.approx((70 + 10) * 1e-6 / 2)  # [0, 70) and [100, 110)
    assert s["concurrency"] == pytest.approx(100 / 80)
    assert [(k["kind"], k["count"]) for k in s["kinds"]] == [("ynn_fusion", 1), ("copy_fusion", 0.5)]
    assert s["kinds"][0]["s"] == pytest.approx(45e-6) and s["kinds"][0]["share"] == pytest.approx(0.9)
    assert "| ynn_fusion | 0.000 | 90.0% | 1 |" in format_summary(s)


def test_summary_refuses_a_trace_without_operations(tmp_path):
    with pytest.raises(ValueError, match="no XLA operations"):
        summarize_ops([{"name": "ThunkExecutor::Execute", "ts": 0, "dur": 5}])
    from pe_rlhf.profiling.ops import op_time_summary

    with pytest.raises(FileNotFoundError, match="no \\*.xplane.pb trace"):
        op_time_summary(str(tmp_path))
