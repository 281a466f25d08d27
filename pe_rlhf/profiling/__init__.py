"""Peak memory before running (ahead of time for TPU slices), runtime memory, timing, step builders and plans.

A compiled program's per-device memory (`MemoryReport`, `compiled_memory`) is `pe_rlhf.sharding.memory`'s.
"""

from pe_rlhf.profiling.aot import (
    GENERATIONS,
    AotReport,
    TopologyError,
    TpuTopology,
    aot_memory_report,
    compile_for_topology,
    hbm_bytes_per_device,
    parse_topology,
    topology,
    topology_devices,
)
from pe_rlhf.profiling.memory import lower_and_compile, runtime_peak_bytes, save_memory_profile, trace
from pe_rlhf.profiling.timing import TimingReport, dot_rate, time_step

__all__ = [
    "GENERATIONS", "AotReport", "TopologyError", "TpuTopology", "aot_memory_report", "compile_for_topology",
    "hbm_bytes_per_device", "parse_topology", "topology", "topology_devices",
    "lower_and_compile", "runtime_peak_bytes", "save_memory_profile", "trace",
    "TimingReport", "dot_rate", "time_step",
]
