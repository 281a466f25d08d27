"""Will it fit? Compile a step for a Cloud TPU slice on a machine without TPUs.

`jax.experimental.topologies.get_topology_desc` gives compile-only devices for a
named slice ('v5e:2x2', 'v4:2x2x1', ...); a step lowered over a mesh of those
devices compiles with the real TPU compiler (the `libtpu` wheel, installed by
`pip install "jax[tpu]==<jax version>"`, i.e. `pip install -e ".[tpu]"`), and
`compiled.memory_analysis()` gives its per-device peak without any TPU.

HBM per chip, from the Cloud TPU system-architecture pages:
  v4  32 GiB  https://cloud.google.com/tpu/docs/v4   ("HBM2 capacity 32 GiB")
  v5e 16 GiB  https://cloud.google.com/tpu/docs/v6e  (v5e column: "HBM capacity per chip 16 GB")
  v5p 95 GiB  https://cloud.google.com/tpu/docs/v5p  ("HBM2e capacity 95GB")
  v6e 32 GiB  https://cloud.google.com/tpu/docs/v6e  ("HBM capacity per chip 32 GB")
v4 and v5p are compiled as megacore (one JAX device per chip, as on a TPU VM),
so a device has the whole chip's HBM. The TPU compiler keeps a little HBM for
itself (15.75 of 16 GiB on v5e) and refuses a program that does not fit: that
case comes back as a report with `fits == False` and the compiler's message.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import math
import os
import re
from collections.abc import Callable, Sequence
from typing import Any

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from pe_rlhf.sharding.distributed import quiet_tpu_probe
from pe_rlhf.sharding.memory import MemoryReport, compiled_memory, format_bytes
from pe_rlhf.sharding.mesh import MeshConfig, make_mesh

GIB = 1 << 30


@dataclasses.dataclass(frozen=True)
class TpuGeneration:
    """One Cloud TPU generation as libtpu names it, and its HBM per chip."""

    libtpu_name: str
    hbm_bytes_per_chip: int
    topology_dims: int  # 2 for the 2D-torus chips (v5e, v6e), 3 for v4 / v5p
    chip_config: str | None  # "megacore": one device per chip


GENERATIONS: dict[str, TpuGeneration] = {
    "v4": TpuGeneration("TPU v4", 32 * GIB, 3, "megacore"),
    "v5e": TpuGeneration("TPU v5 lite", 16 * GIB, 2, None),
    "v5p": TpuGeneration("TPU v5", 95 * GIB, 3, "megacore"),
    "v6e": TpuGeneration("TPU v6 lite", 32 * GIB, 2, None),
}
_EXAMPLES = "v5e:2x2, v6e:2x4, v4:2x2x1, v5p:2x2x2"


class TopologyError(ValueError):
    """A TPU topology name this planner cannot compile for."""


@dataclasses.dataclass(frozen=True)
class TpuTopology:
    """Compile-only devices of a named slice and the HBM each device has."""

    name: str
    generation: str
    chips: tuple[int, ...]
    devices: tuple[jax.Device, ...]
    hbm_bytes_per_device: int


def parse_topology(name: str) -> tuple[str, tuple[int, ...]]:
    """('v5e', (2, 2)) from 'v5e:2x2'; a TopologyError listing what is supported otherwise."""
    match = re.fullmatch(r"(v\w+):(\d+(?:x\d+)*)", name.strip())
    supported = f"supported generations: {', '.join(GENERATIONS)} (e.g. {_EXAMPLES})"
    if match is None or match.group(1) not in GENERATIONS:
        raise TopologyError(f"unknown TPU topology {name!r}; expected '<generation>:<AxB[xC]>', {supported}")
    gen = GENERATIONS[match.group(1)]
    chips = tuple(int(n) for n in match.group(2).split("x"))
    if len(chips) != gen.topology_dims or min(chips) < 1:
        raise TopologyError(
            f"TPU topology {name!r}: {match.group(1)} slices have {gen.topology_dims} positive dimensions "
            f"(e.g. {_EXAMPLES}); {supported}"
        )
    return match.group(1), chips


@functools.cache
def topology(name: str) -> TpuTopology:
    """Compile-only devices for `name` (needs the libtpu wheel, not a TPU)."""
    generation, chips = parse_topology(name)
    if importlib.util.find_spec("libtpu") is None:
        raise RuntimeError(
            f"compiling for TPU topology {name!r} needs the libtpu wheel, which is not installed: "
            f'pip install "jax[tpu]=={jax.__version__}" (or pip install -e ".[tpu]")'
        )
    # Compile-only use: do not take libtpu's one-process-per-TPU lock (/tmp/libtpu_lockfile),
    # which any other JAX process on the machine may hold once libtpu is installed.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    quiet_tpu_probe()  # no libtpu errors on loading it where there is no TPU (the compiler needs none)
    from jax.experimental import topologies

    gen = GENERATIONS[generation]
    kwargs = {"chip_config_name": gen.chip_config} if gen.chip_config else {}
    libtpu_name = f"{gen.libtpu_name}:{'x'.join(map(str, chips))}"
    devices = tuple(topologies.get_topology_desc(libtpu_name, platform="tpu", **kwargs).devices)
    per_chip = len(devices) // math.prod(chips)
    return TpuTopology(name=name, generation=generation, chips=chips, devices=devices,
                       hbm_bytes_per_device=gen.hbm_bytes_per_chip // max(per_chip, 1))


def topology_devices(name: str) -> list[jax.Device]:
    """The compile-only devices of slice `name`, e.g. 4 for 'v5e:2x2'."""
    return list(topology(name).devices)


def hbm_bytes_per_device(name: str) -> int:
    """HBM of one device of slice `name`: the chip's, as v4 / v5p compile as megacore (no libtpu needed)."""
    generation, _ = parse_topology(name)
    return GENERATIONS[generation].hbm_bytes_per_chip


@dataclasses.dataclass(frozen=True)
class AotReport:
    """Per-device memory of a step compiled for a TPU slice, and whether it fits in HBM."""

    topology: str
    mesh_shape: dict[str, int]
    hbm_bytes_per_device: int
    memory: MemoryReport | None  # None when the compiler refused the program
    compiler_error: str | None = None

    @property
    def peak_bytes(self) -> int | None:
        return None if self.memory is None else self.memory.peak_bytes

    @property
    def fits(self) -> bool:
        return self.memory is not None and self.memory.peak_bytes <= self.hbm_bytes_per_device

    def __str__(self) -> str:
        head = f"{self.topology} mesh {self.mesh_shape}, HBM {format_bytes(self.hbm_bytes_per_device)} per device: "
        if self.memory is None:
            return head + f"does not fit ({self.compiler_error})"
        return head + ("fits; " if self.fits else "does not fit; ") + str(self.memory)


def compile_for_topology(fn: Callable, abstract_args: Sequence, topology_name: str, *,
                         mesh_config: MeshConfig = MeshConfig(),
                         in_shardings: Callable[[Mesh], Any] | None = None,
                         out_shardings: Callable[[Mesh], Any] | None = None,
                         **jit_kwargs) -> tuple[jax.stages.Compiled, Mesh]:
    """Compile `fn(*abstract_args)` for slice `topology_name`; returns (compiled, mesh).

    `in_shardings(mesh)` / `out_shardings(mesh)` build the shardings once the mesh over
    the slice exists (e.g. `lambda mesh: (state_shardings(abs_state, mesh), batch_shardings(batch, mesh))`);
    without `in_shardings` every argument is replicated. Other keywords go to jax.jit.
    """
    parse_topology(topology_name)  # a bad name fails here, before anything compiles
    mesh = make_mesh(mesh_config, topology_devices(topology_name))
    kwargs = dict(jit_kwargs)
    kwargs["in_shardings"] = in_shardings(mesh) if in_shardings else NamedSharding(mesh, PartitionSpec())
    if out_shardings is not None:
        kwargs["out_shardings"] = out_shardings(mesh)
    # the slice's first chip as default device too: kernels that pick their implementation by the default
    # device (tokamax's ops) then lower for the TPU, not for this host
    with jax.set_mesh(mesh), jax.default_device(mesh.devices.flat[0]):
        compiled = jax.jit(fn, **kwargs).lower(*abstract_args).compile()
    return compiled, mesh


def aot_memory_report(fn: Callable, abstract_args: Sequence, topology_name: str, *,
                      mesh_config: MeshConfig = MeshConfig(),
                      in_shardings: Callable[[Mesh], Any] | None = None,
                      out_shardings: Callable[[Mesh], Any] | None = None,
                      **jit_kwargs) -> AotReport:
    """Per-device peak of `fn` compiled for slice `topology_name`, and whether it fits in HBM."""
    parse_topology(topology_name)
    hbm = topology(topology_name).hbm_bytes_per_device
    try:
        compiled, mesh = compile_for_topology(fn, abstract_args, topology_name, mesh_config=mesh_config,
                                              in_shardings=in_shardings, out_shardings=out_shardings, **jit_kwargs)
    except jax.errors.JaxRuntimeError as e:
        if "RESOURCE_EXHAUSTED" not in str(e):
            raise
        shape = dict(zip(("data", "fsdp", "tensor"), mesh_config.shape(len(topology_devices(topology_name)))))
        return AotReport(topology_name, shape, hbm, None, str(e).splitlines()[0])
    return AotReport(topology_name, dict(mesh.shape), hbm, compiled_memory(compiled))
