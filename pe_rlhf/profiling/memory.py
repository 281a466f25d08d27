"""Compiling without running, and memory at run time: `lower_and_compile`, runtime peaks, traces, profiles.

The per-device memory of a compiled program (`MemoryReport`, `compiled_memory`) is
`pe_rlhf.sharding.memory`'s: training prints it too.
"""

from __future__ import annotations

import contextlib
import os

import jax


def lower_and_compile(fn, *abstract_args, **jit_kwargs) -> jax.stages.Compiled:
    """Compile `fn` for `abstract_args` (arrays or jax.ShapeDtypeStruct) without running it.

    `fn` may already be jitted; otherwise it is wrapped in `jax.jit(fn, **jit_kwargs)`
    (in_shardings, out_shardings, donate_argnums, static_argnums...).
    """
    if hasattr(fn, "lower"):
        if jit_kwargs:
            raise TypeError(f"{fn} is already jitted; pass {sorted(jit_kwargs)} to jax.jit instead")
        jitted = fn
    else:
        jitted = jax.jit(fn, **jit_kwargs)
    return jitted.lower(*abstract_args).compile()


def runtime_peak_bytes(device: jax.Device | None = None) -> int | None:
    """Peak bytes in use so far on `device` (default: the largest over local devices).

    From `device.memory_stats()['peak_bytes_in_use']`; None where the backend does
    not report it (CPU).
    """
    devices = [device] if device is not None else jax.local_devices()
    peaks = []
    for d in devices:
        stats = d.memory_stats()
        if not stats or "peak_bytes_in_use" not in stats:
            return None
        peaks.append(int(stats["peak_bytes_in_use"]))
    return max(peaks)


@contextlib.contextmanager
def trace(log_dir: str, *, create_perfetto_trace: bool = False):
    """`with trace(dir): ...` records a jax.profiler trace (TensorBoard / XProf format) under `log_dir`."""
    os.makedirs(log_dir, exist_ok=True)
    jax.profiler.start_trace(log_dir, create_perfetto_trace=create_perfetto_trace)
    try:
        yield log_dir
    finally:
        jax.profiler.stop_trace()


def save_memory_profile(directory: str, name: str = "memory.prof", backend: str | None = None) -> str:
    """Write the live device buffers as a gzipped pprof profile; returns its path.

    Read it with `pprof --web <path>` (see the JAX device memory profiling guide).
    """
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, name)
    jax.profiler.save_device_memory_profile(path, backend=backend)
    return path
