"""Peak memory before running (compiled and ahead-of-time for TPU slices), runtime memory, timing."""

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
from pe_rlhf.profiling.memory import (
    MemoryReport,
    compiled_memory,
    lower_and_compile,
    runtime_peak_bytes,
    save_memory_profile,
    trace,
)
from pe_rlhf.profiling.timing import TimingReport, dot_rate, time_step

__all__ = [
    "GENERATIONS", "AotReport", "TopologyError", "TpuTopology", "aot_memory_report", "compile_for_topology",
    "hbm_bytes_per_device", "parse_topology", "topology", "topology_devices",
    "MemoryReport", "compiled_memory", "lower_and_compile", "runtime_peak_bytes", "save_memory_profile", "trace",
    "TimingReport", "dot_rate", "time_step",
]
