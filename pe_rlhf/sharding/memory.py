"""Per-device memory of a compiled program, read before it runs (training prints it; profiling plans with it).

`compiled.memory_analysis()` gives XLA's buffer assignment for one device:
arguments, outputs, temporaries, and the bytes that outputs alias from donated
arguments. The per-device peak is

    peak_bytes = argument + output + temp - alias

(a donated argument's buffer is reused by the output, so it is counted once).
Generated-code bytes are reported apart: they live in program memory, not in
the buffers above. Where the backend also gives XLA's own peak over its buffer
assignment (`peak_memory_in_bytes`), it is kept as `xla_peak_bytes` for reference
only: on TPU it exceeds the sum above by about the size of the arguments that the
program prefetches into on-chip memory (seen with libtpu 0.0.42), so "fits" does
not use it.
"""

from __future__ import annotations

import dataclasses

import jax

_GIB = 1 << 30


@dataclasses.dataclass(frozen=True)
class MemoryReport:
    """Per-device bytes of one compiled program (from `compiled.memory_analysis()`)."""

    argument_bytes: int
    output_bytes: int
    temp_bytes: int
    alias_bytes: int
    generated_code_bytes: int
    xla_peak_bytes: int | None = None

    @property
    def peak_bytes(self) -> int:
        return self.argument_bytes + self.output_bytes + self.temp_bytes - self.alias_bytes

    def as_dict(self) -> dict[str, int]:
        return {**dataclasses.asdict(self), "peak_bytes": self.peak_bytes}

    def __str__(self) -> str:
        return (f"peak {format_bytes(self.peak_bytes)} per device = arguments {format_bytes(self.argument_bytes)} "
                f"+ outputs {format_bytes(self.output_bytes)} + temporaries {format_bytes(self.temp_bytes)} "
                f"- aliased {format_bytes(self.alias_bytes)} "
                f"(generated code {format_bytes(self.generated_code_bytes)})")


def format_bytes(n: int) -> str:
    """'1.50 GiB', '12.0 MiB', '512 B'."""
    if abs(n) >= _GIB:
        return f"{n / _GIB:.2f} GiB"
    if abs(n) >= 1 << 20:
        return f"{n / (1 << 20):.1f} MiB"
    if abs(n) >= 1 << 10:
        return f"{n / (1 << 10):.1f} KiB"
    return f"{n} B"


def compiled_memory(compiled: jax.stages.Compiled) -> MemoryReport:
    """The MemoryReport of a compiled program; a clear error where the backend gives no analysis."""
    stats = compiled.memory_analysis()
    if stats is None:
        raise RuntimeError(
            f"compiled.memory_analysis() returned None on backend {jax.default_backend()!r}: "
            "this backend does not report compiled memory"
        )
    xla_peak = getattr(stats, "peak_memory_in_bytes", None)
    return MemoryReport(
        argument_bytes=int(stats.argument_size_in_bytes),
        output_bytes=int(stats.output_size_in_bytes),
        temp_bytes=int(stats.temp_size_in_bytes),
        alias_bytes=int(stats.alias_size_in_bytes),
        generated_code_bytes=int(stats.generated_code_size_in_bytes),
        xla_peak_bytes=None if xla_peak is None else int(xla_peak),
    )
