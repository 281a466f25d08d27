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
    # ynn alone on [0, 30) and [50, 70), both on [30, 50): wall share 30 + 20 + 20, alone 50
    assert s["kinds"][0]["wall_s"] == pytest.approx(70e-6 / 2) and s["kinds"][0]["alone_s"] == pytest.approx(25e-6)
    assert s["kinds"][1]["wall_s"] == pytest.approx(5e-6) and s["kinds"][1]["alone_s"] == pytest.approx(5e-6)
    assert "| ynn_fusion | 0.000 | 90.0% | 0.000 | 0.000 | 1 |" in format_summary(s)


def test_wall_shares_split_each_instant_among_the_running_operations():
    events = [
        {"name": "ynn_fusion.1", "ts": 0, "dur": 50},
        {"name": "ynn_fusion.2", "ts": 30, "dur": 40},
        {"name": "add_fusion.3", "ts": 40, "dur": 20},
        {"name": "add_fusion.4", "ts": 45, "dur": 0},  # zero length: counted, takes no time
        {"name": "Wait for donation holds", "ts": 70, "dur": 30},  # bookkeeping
    ]
    s = summarize_ops(events)
    by = {k["kind"]: k for k in s["kinds"]}
    # [0,30) ynn alone; [30,40) 2 ynn; [40,50) 2 ynn + add; [50,60) ynn + add; [60,70) ynn alone
    assert by["ynn_fusion"]["wall_s"] == pytest.approx((30 + 10 + 10 * 2 / 3 + 5 + 10) * 1e-6)
    assert by["add_fusion"]["wall_s"] == pytest.approx((10 / 3 + 5) * 1e-6)
    assert by["ynn_fusion"]["alone_s"] == pytest.approx(40e-6) and by["add_fusion"]["alone_s"] == 0
    assert by["add_fusion"]["count"] == 2
    assert s["busy_s"] == pytest.approx(70e-6) == pytest.approx(sum(k["wall_s"] for k in s["kinds"]))


def test_summary_refuses_a_trace_without_operations(tmp_path):
    with pytest.raises(ValueError, match="no XLA operations"):
        summarize_ops([{"name": "ThunkExecutor::Execute", "ts": 0, "dur": 5}])
    with pytest.raises(ValueError, match="2 XLA operations all last 0 us"):
        summarize_ops([{"name": "ynn_fusion.1", "ts": 0, "dur": 0}, {"name": "copy_fusion.2", "ts": 3, "dur": 0}])
    from pe_rlhf.profiling.ops import op_time_summary

    with pytest.raises(FileNotFoundError, match="no \\*.xplane.pb trace"):
        op_time_summary(str(tmp_path))
