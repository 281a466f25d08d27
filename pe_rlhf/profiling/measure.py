"""Compile a step from `step_builders` and measure it: per-device peak memory, its argument breakdown, FLOPs, time.

`compile_step(spec, mesh=..., topology=...)` compiles a `StepSpec` for local devices or,
ahead of time, for a TPU slice, its arguments placed as training places them
(`train.sharded.step_shardings`); `measure_step` returns a `StepReport` (per-device
peak = argument + output + temp - alias from XLA's memory analysis, the argument
breakdown, and the median step time when run locally on random arrays).
"""

from __future__ import annotations

import dataclasses
import re
import time

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from pe_rlhf.profiling.aot import compile_for_topology
from pe_rlhf.profiling.aot import topology as aot_topology
from pe_rlhf.profiling.memory import lower_and_compile
from pe_rlhf.profiling.step_builders import StepSpec
from pe_rlhf.profiling.timing import time_step
from pe_rlhf.sharding.memory import MemoryReport, compiled_memory, format_bytes
from pe_rlhf.sharding.mesh import MeshConfig
from pe_rlhf.sharding.rules import path_str
from pe_rlhf.train.sharded import step_shardings


# -- shardings and compilation ------------------------------------------------------------------
def arg_shardings(spec: StepSpec, mesh: Mesh) -> tuple:
    """Shardings of `spec.args` over `mesh`, as training places them (`train.sharded.step_shardings`):
    parameters by their logical axes, optimizer moments like their parameters, the batch over data axes,
    the rest (step counts, the baseline, the PRNG key) replicated. A parameter no rule places is an error."""
    trainable, opt_state, frozen, *rest = spec.args
    s = step_shardings(mesh, trainable=trainable, opt_state=opt_state, frozen=frozen, rest=rest,
                       placement=spec.placement)
    return (s.trainable, s.opt_state, s.frozen, *s.rest)


def compile_step(spec: StepSpec, mesh: Mesh | None = None, topology: str | None = None, *,
                 mesh_config: MeshConfig = MeshConfig(data=1, fsdp=-1)) -> jax.stages.Compiled:
    """Compile `spec` without running it: for a TPU slice (`topology`, e.g. 'v5e:2x2', ahead of time),
    over a local `mesh`, or (neither) on the default device. Trainable and optimizer state are donated.

    The default mesh for a topology is FSDP over every chip (parameters and moments split along `embed`).
    """
    if topology is not None and mesh is not None:
        raise ValueError("compile_step: give a local mesh or a TPU topology, not both")
    if topology is not None:
        compiled, _ = compile_for_topology(spec.fn, spec.args, topology, mesh_config=mesh_config,
                                           in_shardings=lambda m: arg_shardings(spec, m),
                                           donate_argnums=spec.donate_argnums)
        return compiled
    if mesh is not None:
        with jax.set_mesh(mesh):
            return jax.jit(spec.fn, in_shardings=arg_shardings(spec, mesh),
                           donate_argnums=spec.donate_argnums).lower(*spec.args).compile()
    return lower_and_compile(spec.fn, *spec.args, donate_argnums=spec.donate_argnums)


def concrete_args(spec: StepSpec, seed: int = 0) -> tuple:
    """Random arrays shaped like `spec.args`: weights N(0, 0.02^2), optimizer state zeros, masks ones,
    tokens uniform over the vocabulary, a fresh PRNG key."""
    key = jax.random.key(seed)

    def make(arg_name):
        def leaf(path, x):
            nonlocal key
            key, sub = jax.random.split(key)
            if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
                return jax.random.key(seed)
            if arg_name == "opt_state" or not x.shape and arg_name != "batch":
                return jnp.zeros(x.shape, x.dtype)
            if jnp.issubdtype(x.dtype, jnp.floating):
                return (0.02 * jax.random.normal(sub, x.shape, jnp.float32)).astype(x.dtype)
            if "mask" in path_str(path):
                return jnp.ones(x.shape, x.dtype)
            return jax.random.randint(sub, x.shape, 3, spec.vocab_size, jnp.int32).astype(x.dtype)
        return leaf

    return tuple(jax.tree_util.tree_map_with_path(make(name), arg) for name, arg in zip(spec.arg_names, spec.args))


# -- the report ---------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class StepReport:
    """Per-device memory of one compiled step, its argument breakdown, and (locally) its median time.

    `memory` is None when the TPU compiler refused the program; `reported_peak_bytes` then holds the
    usage its message gives (`reported_usage`; for temporaries alone it is a lower bound of the peak).
    """

    name: str
    where: str  # 'local:cpu x1' or a topology such as 'v5e:2x2'
    memory: MemoryReport | None
    arg_bytes: dict[str, int]  # global bytes of each argument group
    estimates: dict[str, int]
    compile_s: float
    hbm_bytes_per_device: int | None = None
    median_step_s: float | None = None
    compiler_error: str | None = None
    reported_peak_bytes: int | None = None
    flops: float | None = None  # XLA's cost analysis; a while loop's body (the sampler, PPO epochs) counts once

    @property
    def peak_bytes(self) -> int | None:
        return self.memory.peak_bytes if self.memory is not None else self.reported_peak_bytes

    @property
    def fits(self) -> bool | None:
        if self.hbm_bytes_per_device is None:
            return None
        return self.memory is not None and self.memory.peak_bytes <= self.hbm_bytes_per_device

    def as_dict(self) -> dict:
        return {"name": self.name, "where": self.where, "peak_bytes": self.peak_bytes, "fits": self.fits,
                "memory": None if self.memory is None else self.memory.as_dict(), "arg_bytes": self.arg_bytes,
                "estimates": self.estimates, "compile_s": self.compile_s,
                "hbm_bytes_per_device": self.hbm_bytes_per_device, "median_step_s": self.median_step_s,
                "compiler_error": self.compiler_error, "reported_peak_bytes": self.reported_peak_bytes,
                "flops": self.flops}

    def __str__(self) -> str:
        peak = "n/a" if self.peak_bytes is None else format_bytes(self.peak_bytes)
        t = "" if self.median_step_s is None else f", median step {self.median_step_s:.3f} s"
        return f"{self.name} on {self.where}: peak {peak} per device{t}"


def compiled_flops(compiled: jax.stages.Compiled) -> float | None:
    """Floating-point operations of one call from XLA's cost analysis (None where the backend gives none)."""
    try:
        cost = compiled.cost_analysis()
    except Exception:  # noqa: BLE001 - some backends raise instead of returning nothing
        return None
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else None
    return None if not cost or "flops" not in cost else float(cost["flops"])


_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def reported_usage(message: str | None) -> int | None:
    """Bytes from a TPU out-of-memory message, or None: 'Used 20.13G of 15.75G hbm' (the whole program) or
    'the total memory required for HLO temporaries (16.24G) exceeds' (temporaries only: a lower bound)."""
    for pattern in (r"Used ([\d.]+)([KMGT]?) of [\d.]+[KMGT]? hbm", r"HLO temporaries \(([\d.]+)([KMGT]?)\)"):
        match = re.search(pattern, message or "")
        if match is not None:
            return int(float(match.group(1)) * _UNITS[match.group(2)])
    return None


def measure_step(spec: StepSpec, *, topology: str | None = None, mesh: Mesh | None = None,
                 mesh_config: MeshConfig = MeshConfig(data=1, fsdp=-1), time_iters: int = 0,
                 seed: int = 0) -> StepReport:
    """Compile `spec` and read its memory; with `time_iters` > 0 (local only) also time it on random arrays,
    carrying the donated state from call to call as a training loop does."""
    start = time.perf_counter()
    if topology is not None:
        if time_iters:
            raise ValueError("measure_step: a TPU topology is compiled ahead of time and cannot be timed here")
        hbm = aot_topology(topology).hbm_bytes_per_device
        try:
            compiled = compile_step(spec, topology=topology, mesh_config=mesh_config)
        except jax.errors.JaxRuntimeError as e:  # the TPU compiler refuses a program larger than HBM
            if "RESOURCE_EXHAUSTED" not in str(e):
                raise
            error = str(e).splitlines()[0]
            return StepReport(spec.name, topology, None, spec.arg_bytes(), spec.estimates,
                              time.perf_counter() - start, hbm, None, error, reported_usage(str(e)))
        return StepReport(spec.name, topology, compiled_memory(compiled), spec.arg_bytes(), spec.estimates,
                          time.perf_counter() - start, hbm, flops=compiled_flops(compiled))
    compiled = compile_step(spec, mesh=mesh)
    compile_s = time.perf_counter() - start
    memory = compiled_memory(compiled)
    where = f"local:{jax.default_backend()} x{1 if mesh is None else mesh.size}"
    median = None
    if time_iters:
        args = list(concrete_args(spec, seed))
        if mesh is not None:
            args = list(jax.device_put(tuple(args), arg_shardings(spec, mesh)))

        def call():
            out = compiled(*args)
            for i in spec.donate_argnums:  # output i is the new value of donated argument i
                args[i] = out[i]
            return out

        median = time_step(call, (), warmup=1, iters=time_iters).median_s
    return StepReport(spec.name, where, memory, spec.arg_bytes(), spec.estimates, compile_s, None, median,
                      flops=compiled_flops(compiled))


__all__ = ["StepReport", "arg_shardings", "compile_step", "compiled_flops", "concrete_args", "measure_step",
           "reported_usage"]
