"""Multi-host start-up: one `initialize()` for a laptop, a SLURM job, or a Cloud TPU pod.

Call `initialize()` first thing in the entry point, before anything touches a JAX device
(`jax.devices()`, `jnp.zeros`, ...). Where the run is configured from, first match wins:

1. explicit arguments (`coordinator_address`, `num_processes`, `process_id`);
2. `JAX_COORDINATOR_ADDRESS` + `JAX_NUM_PROCESSES` + `JAX_PROCESS_ID` in the environment;
3. SLURM (`SLURM_PROCID`, `SLURM_STEP_NUM_TASKS`/`SLURM_NTASKS`, first host of
   `SLURM_STEP_NODELIST`/`SLURM_JOB_NODELIST`; port `JAX_COORDINATOR_PORT` or derived from
   `SLURM_JOB_ID`, as JAX does);
4. a Cloud TPU VM: `jax.distributed.initialize()` with no arguments (JAX reads the TPU metadata);
5. otherwise a single process: nothing to initialise.

Parsing is pure (`cluster_spec(env=...)`), so every branch is tested with fake environments.

On CPU, cross-process collectives use gloo, JAX's default `jax_cpu_collectives_implementation`
since 0.4.3x (checked with jax 0.10.2); nothing needs setting.
"""

from __future__ import annotations

import dataclasses
import functools
import glob
import logging
import os
import re
from collections.abc import Callable, Mapping, MutableMapping, Sequence
from typing import Any, TypeVar

import jax

_LOG = logging.getLogger(__name__)
_F = TypeVar("_F", bound=Callable[..., Any])


@dataclasses.dataclass(frozen=True)
class ClusterSpec:
    """How this process joins the run. `source` says where the values came from.

    source: 'explicit' | 'env' | 'slurm' (values filled in) | 'tpu' (JAX fills them in) |
    'single' (no distributed system).
    """

    source: str
    coordinator_address: str | None = None
    num_processes: int = 1
    process_id: int = 0
    local_device_ids: tuple[int, ...] | None = None


# ---------------------------------------------------------------------------- SLURM parsing


def first_slurm_host(nodelist: str) -> str:
    """First host of a SLURM hostlist: 'gpu[003-005,9],cpu1' -> 'gpu003', 'r[1-2]-n[07-08]' -> 'r1-n07'."""
    nodelist = nodelist.strip()
    depth, end = 0, len(nodelist)
    for i, ch in enumerate(nodelist):
        depth += (ch == "[") - (ch == "]")
        if ch == "," and depth == 0:
            end = i
            break
    first = nodelist[:end]
    if not first or first.count("[") != first.count("]"):
        raise ValueError(f"cannot parse SLURM node list {nodelist!r}: expected e.g. 'node[01-04],gpu7'")
    # Each bracket group contributes its first value, zero padding kept ('[007-009]' -> '007').
    return re.sub(r"\[([^\],\-]+)[^\]]*\]", r"\1", first)


def slurm_tasks_per_node(spec: str) -> list[int]:
    """Expand SLURM_TASKS_PER_NODE: '2(x3),1' -> [2, 2, 2, 1] (one entry per node)."""
    counts = []
    for part in spec.split(","):
        m = re.fullmatch(r"\s*(\d+)(?:\(x(\d+)\))?\s*", part)
        if m is None:
            raise ValueError(f"cannot parse SLURM tasks-per-node {spec!r}: expected e.g. '2(x3),1'")
        counts += [int(m.group(1))] * int(m.group(2) or 1)
    return counts


def _env_int(env: Mapping[str, str], name: str) -> int:
    value = env[name]
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} is not an integer") from None


def _first_set(env: Mapping[str, str], *names: str) -> str | None:
    return next((n for n in names if env.get(n)), None)


def slurm_spec(env: Mapping[str, str]) -> ClusterSpec | None:
    """The run described by SLURM_* variables, or None outside a SLURM task.

    One task per node sees all of the node's GPUs; with several tasks on a node, task
    SLURM_LOCALID gets GPU number SLURM_LOCALID (one GPU per process).
    """
    ntasks_var = _first_set(env, "SLURM_STEP_NUM_TASKS", "SLURM_NTASKS")
    nodes_var = _first_set(env, "SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST", "SLURM_NODELIST")
    if "SLURM_PROCID" not in env or ntasks_var is None or nodes_var is None:
        return None
    num_processes = _env_int(env, ntasks_var)
    process_id = _env_int(env, "SLURM_PROCID")
    if num_processes <= 1:
        return ClusterSpec(source="single")
    if "JAX_COORDINATOR_PORT" in env:
        port = _env_int(env, "JAX_COORDINATOR_PORT")
    elif "SLURM_JOB_ID" in env:  # same ephemeral-range choice as JAX's own SLURM detection
        port = _env_int(env, "SLURM_JOB_ID") % 2**12 + (65535 - 2**12 + 1)
    else:
        raise ValueError("SLURM run without SLURM_JOB_ID: set JAX_COORDINATOR_PORT to a free port")
    local_device_ids = None
    tpn_var = _first_set(env, "SLURM_STEP_TASKS_PER_NODE", "SLURM_TASKS_PER_NODE")
    if tpn_var is not None and "SLURM_LOCALID" in env:
        per_node = slurm_tasks_per_node(env[tpn_var])
        node = _env_int(env, "SLURM_NODEID") if "SLURM_NODEID" in env else 0
        if per_node[min(node, len(per_node) - 1)] > 1:
            local_device_ids = (_env_int(env, "SLURM_LOCALID"),)
    return ClusterSpec(
        source="slurm",
        coordinator_address=f"{first_slurm_host(env[nodes_var])}:{port}",
        num_processes=num_processes,
        process_id=process_id,
        local_device_ids=local_device_ids,
    )


# ---------------------------------------------------------------------------- resolution


def cluster_spec(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    local_device_ids: Sequence[int] | None = None,
    *,
    env: Mapping[str, str],
    on_cloud_tpu: bool = False,
) -> ClusterSpec:
    """Pure: decide how this process joins the run (see the module docstring for the order)."""
    ids = None if local_device_ids is None else tuple(int(i) for i in local_device_ids)
    given = {"coordinator_address": coordinator_address, "num_processes": num_processes, "process_id": process_id}
    if any(v is not None for v in given.values()):
        source = "explicit"
    else:
        names = {
            "coordinator_address": "JAX_COORDINATOR_ADDRESS",
            "num_processes": "JAX_NUM_PROCESSES",
            "process_id": "JAX_PROCESS_ID",
        }
        given = {k: env.get(v) or None for k, v in names.items()}
        source = "env" if any(v is not None for v in given.values()) else None
    if source is not None:
        missing = [k for k, v in given.items() if v is None]
        if missing:
            how = "arguments" if source == "explicit" else "environment variables " + ", ".join(names.values())
            raise ValueError(
                f"distributed.initialize: {', '.join(missing)} missing; give all three {how} or none of them"
            )
        address = str(given["coordinator_address"])
        if ":" not in address:
            raise ValueError(f"coordinator_address {address!r} needs a port, e.g. '10.0.0.1:12355'")
        n, pid = int(given["num_processes"]), int(given["process_id"])
        if not 0 <= pid < n:
            raise ValueError(f"process_id={pid} must be in [0, num_processes={n})")
        return ClusterSpec(source, address, n, pid, ids)
    spec = slurm_spec(env)
    if spec is not None:
        return spec if ids is None else dataclasses.replace(spec, local_device_ids=ids)
    if on_cloud_tpu:
        return ClusterSpec(source="tpu", local_device_ids=ids)
    return ClusterSpec(source="single", local_device_ids=ids)


# ---------------------------------------------------------------------------- a quiet start without a TPU

# What libtpu asks the TPU metadata server for at initialisation. Unset, on a machine without a TPU it
# prints "E0000 ... unexpected worker hostname" and "=== Source Location Trace: ===" while JAX probes for
# TPU devices (and when it loads libtpu to compile ahead of time for a TPU topology).
QUIET_TPU_ENV = {"TPU_WORKER_HOSTNAMES": "localhost", "TPU_HOST_BOUNDS": "1,1,1"}


def has_tpu(root: str = "/") -> bool:
    """Whether TPU chips are attached: libtpu opens them as /dev/accel<n> (v2-v4) or /dev/vfio/<n> (v5e on)."""
    dev = os.path.join(root, "dev")
    return bool(glob.glob(os.path.join(dev, "accel*")) or glob.glob(os.path.join(dev, "vfio", "[0-9]*")))


def quiet_tpu_probe(env: MutableMapping[str, str] | None = None, *, tpu_present: bool | None = None) -> bool:
    """On a machine without a TPU, give libtpu the single-host values it would look up, so JAX's probe for
    TPU devices fails silently (JAX then uses the GPU or CPU as before) and ahead-of-time TPU compilation
    stays quiet. Values already set are kept; nothing is set where a TPU is attached. Call it in an entry
    point before anything touches a device. Returns whether anything was set.
    """
    env = os.environ if env is None else env
    if (has_tpu() if tpu_present is None else tpu_present) or "JAX_FORCE_TPU_INIT" in env:
        return False
    changed = False
    for name, value in QUIET_TPU_ENV.items():
        if name not in env:
            env[name] = value
            changed = True
    return changed


def _on_cloud_tpu_vm() -> bool:
    # Set by JAX at import time when libtpu and TPU chips are present; JAX has no public accessor.
    from jax._src import cloud_tpu_init

    return bool(getattr(cloud_tpu_init, "running_in_cloud_tpu_vm", False))


def initialize(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    local_device_ids: Sequence[int] | None = None,
    *,
    initialization_timeout: int = 300,
    env: Mapping[str, str] | None = None,
) -> ClusterSpec:
    """Join the multi-process run (or do nothing for a single process); returns what was used.

    Must run before any JAX computation. `env` defaults to os.environ (tests pass fakes).
    """
    env = os.environ if env is None else env
    spec = cluster_spec(
        coordinator_address, num_processes, process_id, local_device_ids, env=env, on_cloud_tpu=_on_cloud_tpu_vm()
    )
    if spec.source == "single":
        return spec
    if jax.distributed.is_initialized():
        _LOG.warning("jax.distributed is already initialised; keeping the existing set-up")
        return spec
    ids = None if spec.local_device_ids is None else list(spec.local_device_ids)
    if spec.source == "tpu":
        jax.distributed.initialize(local_device_ids=ids, initialization_timeout=initialization_timeout)
    else:
        # Every value is resolved here; 'deactivate' stops JAX re-detecting SLURM and narrowing a
        # one-task-per-node run to GPU SLURM_LOCALID.
        jax.distributed.initialize(
            coordinator_address=spec.coordinator_address,
            num_processes=spec.num_processes,
            process_id=spec.process_id,
            local_device_ids=ids,
            cluster_detection_method="deactivate",
            initialization_timeout=initialization_timeout,
        )
    _LOG.info(
        "process %d of %d joined via %s (coordinator %s)",
        jax.process_index(), jax.process_count(), spec.source, spec.coordinator_address,
    )
    return spec


# ---------------------------------------------------------------------------- logging once


def is_main_process() -> bool:
    """True on process 0, the one that logs metrics and writes host-side files."""
    return jax.process_index() == 0


def main_process_only(fn: _F) -> _F:
    """Decorator: run `fn` on process 0 only; other processes get None."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        return fn(*args, **kwargs) if is_main_process() else None

    return wrapper  # type: ignore[return-value]


def log_once(msg: str, *args: Any, level: int = logging.INFO, logger: logging.Logger | None = None) -> None:
    """`logger.log(level, msg, *args)` on process 0 only, so each metric appears once per run."""
    if is_main_process():
        (logger or _LOG).log(level, msg, *args)
