"""Two JAX processes on localhost: `distributed.initialize`, one 8-device mesh, sharded SGD, Orbax.

The test spawns this file twice as a script (`python test_multiprocess.py --worker ...`), each
process with 4 simulated CPU devices. Cross-process collectives on CPU use gloo, the default
`jax_cpu_collectives_implementation` in jax 0.10.2, so nothing beyond `initialize` is configured.

The trained problem is `_linear_regression`; to run the reward step instead, write a function
with the same result (state, batch, loss_fn) and call it in `_worker`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import re
import socket
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from pe_rlhf.sharding import distributed

NUM_PROCESSES = 2
DEVICES_PER_PROCESS = 4
STEPS = 5
LEARNING_RATE = 0.1


def _regression_data():
    """x_BxD, y_B for y = x @ [1, -2, 0.5] + 0.25 (noise-free); identical in every process."""
    rng = np.random.default_rng(0)
    x_BxD = rng.normal(size=(16, 3)).astype(np.float32)
    y_B = (x_BxD @ np.array([1.0, -2.0, 0.5], np.float32) + 0.25).astype(np.float32)
    return x_BxD, y_B


def _reference_run() -> tuple[list[float], np.ndarray, float]:
    """Full-batch gradient descent on the mean squared error in float64 NumPy: (losses, w_D, b)."""
    x_BxD, y_B = (a.astype(np.float64) for a in _regression_data())
    w_D, b = np.zeros(3), 0.0
    losses = []
    for _ in range(STEPS):
        err_B = x_BxD @ w_D + b - y_B
        losses.append(float(np.mean(err_B**2)))
        w_D = w_D - LEARNING_RATE * 2 * x_BxD.T @ err_B / len(y_B)
        b = b - LEARNING_RATE * 2 * np.mean(err_B)
    return losses, w_D, b


# ---------------------------------------------------------------------------- pure parsing (no processes)

_SRUN_2_NODES = {  # what srun sets in task 1 of `sbatch --nodes=2 --ntasks-per-node=1`
    "SLURM_JOB_ID": "4242",
    "SLURM_JOB_NODELIST": "gpu[07-08]",
    "SLURM_STEP_NODELIST": "gpu[07-08]",
    "SLURM_NTASKS": "2",
    "SLURM_STEP_NUM_TASKS": "2",
    "SLURM_PROCID": "1",
    "SLURM_LOCALID": "0",
    "SLURM_NODEID": "1",
    "SLURM_STEP_TASKS_PER_NODE": "1(x2)",
}
_PORT_4242 = 4242 % 4096 + 61440  # = 61586: JAX's choice, ephemeral range [61440, 65535]


@pytest.mark.parametrize(
    "nodelist, first",
    [
        ("node001", "node001"),
        ("node001,host2", "node001"),
        ("node[001-015],host2", "node001"),
        ("node[007,001-003]", "node007"),
        ("rack[1-2]-n[07-08],x9", "rack1-n07"),
        (" gpu-a100-[3-4] ", "gpu-a100-3"),
    ],
)
def test_first_slurm_host(nodelist, first):
    assert distributed.first_slurm_host(nodelist) == first


@pytest.mark.parametrize("bad", ["", "node[01-04", ",node1"])
def test_first_slurm_host_rejects_malformed(bad):
    with pytest.raises(ValueError, match="cannot parse SLURM node list"):
        distributed.first_slurm_host(bad)


def test_slurm_tasks_per_node():
    assert distributed.slurm_tasks_per_node("2(x3),1") == [2, 2, 2, 1]
    assert distributed.slurm_tasks_per_node("8") == [8]
    with pytest.raises(ValueError, match="tasks-per-node 'two'"):
        distributed.slurm_tasks_per_node("two")


def test_slurm_one_task_per_node_sees_all_local_devices():
    spec = distributed.slurm_spec(_SRUN_2_NODES)
    assert spec == distributed.ClusterSpec("slurm", f"gpu07:{_PORT_4242}", 2, 1, None)
    assert _PORT_4242 == 61586


def test_slurm_one_task_per_gpu_pins_the_local_gpu():
    env = dict(_SRUN_2_NODES, SLURM_STEP_NUM_TASKS="8", SLURM_NTASKS="8", SLURM_PROCID="6",
               SLURM_LOCALID="2", SLURM_STEP_TASKS_PER_NODE="4(x2)")
    assert distributed.slurm_spec(env) == distributed.ClusterSpec("slurm", f"gpu07:{_PORT_4242}", 8, 6, (2,))


def test_slurm_job_variables_and_port_override():
    env = {"SLURM_JOB_ID": "7", "SLURM_JOB_NODELIST": "a[3-4],b1", "SLURM_NTASKS": "3", "SLURM_PROCID": "2",
           "JAX_COORDINATOR_PORT": "12355"}
    assert distributed.slurm_spec(env) == distributed.ClusterSpec("slurm", "a3:12355", 3, 2, None)


def test_slurm_outside_a_task_or_single_task():
    assert distributed.slurm_spec({}) is None
    assert distributed.slurm_spec({k: v for k, v in _SRUN_2_NODES.items() if k != "SLURM_PROCID"}) is None
    one = dict(_SRUN_2_NODES, SLURM_STEP_NUM_TASKS="1", SLURM_PROCID="0")
    assert distributed.slurm_spec(one) == distributed.ClusterSpec("single")


def test_slurm_errors_name_the_variable():
    with pytest.raises(ValueError, match="SLURM_PROCID='x' is not an integer"):
        distributed.slurm_spec(dict(_SRUN_2_NODES, SLURM_PROCID="x"))
    no_job = {k: v for k, v in _SRUN_2_NODES.items() if k != "SLURM_JOB_ID"}
    with pytest.raises(ValueError, match="set JAX_COORDINATOR_PORT"):
        distributed.slurm_spec(no_job)


def test_cluster_spec_order():
    explicit = distributed.cluster_spec("10.0.0.1:1234", 4, 3, [1], env=_SRUN_2_NODES, on_cloud_tpu=True)
    assert explicit == distributed.ClusterSpec("explicit", "10.0.0.1:1234", 4, 3, (1,))
    jax_env = dict(_SRUN_2_NODES, JAX_COORDINATOR_ADDRESS="h:9", JAX_NUM_PROCESSES="2", JAX_PROCESS_ID="0")
    assert distributed.cluster_spec(env=jax_env) == distributed.ClusterSpec("env", "h:9", 2, 0, None)
    assert distributed.cluster_spec(env=_SRUN_2_NODES, on_cloud_tpu=True).source == "slurm"
    assert distributed.cluster_spec(env={}, on_cloud_tpu=True) == distributed.ClusterSpec("tpu")
    assert distributed.cluster_spec(env={}) == distributed.ClusterSpec("single")


@pytest.mark.parametrize(
    "args, env, message",
    [
        (("10.0.0.1:1234", None, 0), {}, "num_processes missing; give all three arguments"),
        ((None, None, None), {"JAX_COORDINATOR_ADDRESS": "h:1"},
         "num_processes, process_id missing; give all three environment variables JAX_COORDINATOR_ADDRESS"),
        (("10.0.0.1", 2, 0), {}, "'10.0.0.1' needs a port"),
        (("h:1", 2, 2), {}, r"process_id=2 must be in \[0, num_processes=2\)"),
    ],
)
def test_cluster_spec_user_errors(args, env, message):
    with pytest.raises(ValueError, match=message):
        distributed.cluster_spec(*args, env=env)


def test_initialize_passes_the_resolved_spec_to_jax(monkeypatch):
    calls = []
    monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: calls.append(kw))
    monkeypatch.setattr(jax.distributed, "is_initialized", lambda: False)
    assert distributed.initialize(env={}) == distributed.ClusterSpec("single") and calls == []
    spec = distributed.initialize(env=_SRUN_2_NODES, initialization_timeout=30)
    assert spec.source == "slurm"
    assert calls == [dict(coordinator_address=f"gpu07:{_PORT_4242}", num_processes=2, process_id=1,
                          local_device_ids=None, cluster_detection_method="deactivate", initialization_timeout=30)]
    monkeypatch.setattr(distributed, "_on_cloud_tpu_vm", lambda: True)
    assert distributed.initialize(env={}).source == "tpu"
    assert calls[1:] == [dict(local_device_ids=None, initialization_timeout=300)]


@pytest.mark.parametrize("process_index, logged", [(0, True), (1, False)])
def test_log_once_and_main_process_only(monkeypatch, caplog, process_index, logged):
    monkeypatch.setattr(jax, "process_index", lambda: process_index)
    with caplog.at_level(logging.INFO, logger="pe_rlhf.sharding.distributed"):
        distributed.log_once("reward/accuracy %.3f", 0.75)
    assert [r.getMessage() for r in caplog.records] == (["reward/accuracy 0.750"] if logged else [])
    assert distributed.main_process_only(lambda x: x + 1)(41) == (42 if logged else None)
    assert distributed.is_main_process() == logged


# ---------------------------------------------------------------------------- worker process


def _linear_regression(mesh):
    """(state, batch, loss_fn): replicated parameters, batch split over the 'data' mesh axis."""
    x_BxD, y_B = _regression_data()
    batch_sharding = NamedSharding(mesh, P("data"))
    # Each device receives its own rows; a data loader would read only this process's rows.
    batch = {
        "x_BxD": jax.make_array_from_callback(x_BxD.shape, batch_sharding, lambda idx: x_BxD[idx]),
        "y_B": jax.make_array_from_callback(y_B.shape, batch_sharding, lambda idx: y_B[idx]),
    }
    replicated = NamedSharding(mesh, P())
    state = {
        "w_D": jax.device_put(jnp.zeros(3, jnp.float32), replicated),
        "b": jax.device_put(jnp.zeros((), jnp.float32), replicated),
    }

    def loss_fn(state, batch):
        pred_B = batch["x_BxD"] @ state["w_D"] + state["b"]
        return jnp.mean((pred_B - batch["y_B"]) ** 2)

    return state, batch, loss_fn


def _worker(process_id: int, port: int, ckpt_dir: str, out_path: str) -> None:
    jax.config.update("jax_default_matmul_precision", "highest")
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr, force=True)
    spec = distributed.initialize(
        f"127.0.0.1:{port}", NUM_PROCESSES, process_id, initialization_timeout=60
    )
    mesh = jax.make_mesh((NUM_PROCESSES * DEVICES_PER_PROCESS,), ("data",))
    state, batch, loss_fn = _linear_regression(mesh)

    def sgd_step(state, batch):
        loss, grads = jax.value_and_grad(loss_fn)(state, batch)
        state = jax.tree.map(lambda p, g: p - LEARNING_RATE * g, state, grads)
        return state, loss

    state_shardings = jax.tree.map(lambda a: a.sharding, state)
    step = jax.jit(
        sgd_step,
        in_shardings=(state_shardings, jax.tree.map(lambda a: a.sharding, batch)),
        out_shardings=(state_shardings, NamedSharding(mesh, P())),
        donate_argnums=0,
    )
    losses = []
    for i in range(STEPS):
        state, loss = step(state, batch)
        losses.append(float(loss))
        distributed.log_once("step %d loss %.6f", i, losses[-1])

    # Both processes write: the replicated parameters and the data-sharded batch (each process its shards).
    saved = {"state": state, "batch": batch}
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(os.path.join(ckpt_dir, "step_5"), saved)
    checkpointer.wait_until_finished()
    abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding), saved)
    restored = checkpointer.restore(os.path.join(ckpt_dir, "step_5"), abstract)

    def same_local_shards(a, b):
        return a.sharding == b.sharding and all(
            sa.index == sb.index and np.array_equal(np.asarray(sa.data), np.asarray(sb.data))
            for sa, sb in zip(a.addressable_shards, b.addressable_shards)
        )

    result = {
        "spec": dataclasses.asdict(spec),
        "process_index": jax.process_index(),
        "process_count": jax.process_count(),
        "device_count": jax.device_count(),
        "local_device_count": jax.local_device_count(),
        "is_main": distributed.is_main_process(),
        "main_only": distributed.main_process_only(lambda: "ran")(),
        "losses": losses,
        "restored_equal": jax.tree.leaves(jax.tree.map(same_local_shards, restored, saved)),
        "num_local_batch_shards": len(restored["batch"]["x_BxD"].addressable_shards),
        "w_D": np.asarray(restored["state"]["w_D"]).tolist(),
        "b": float(restored["state"]["b"]),
    }
    with open(out_path, "w") as f:
        json.dump(result, f)


# ---------------------------------------------------------------------------- test (parent process)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker_env() -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("SLURM_", "JAX_COORDINATOR", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"))
    }
    env.update(
        XLA_FLAGS=f"--xla_force_host_platform_device_count={DEVICES_PER_PROCESS}",
        JAX_PLATFORMS="cpu",
        TF_CPP_MIN_LOG_LEVEL="2",
    )
    return env


@pytest.mark.slow
def test_two_processes_train_and_checkpoint(tmp_path):
    port = _free_port()
    outs = [tmp_path / f"result_{i}.json" for i in range(NUM_PROCESSES)]
    procs = [
        subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), "--worker", f"--process_id={i}", f"--port={port}",
             f"--ckpt_dir={tmp_path / 'ckpt'}", f"--out={outs[i]}"],
            env=_worker_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(NUM_PROCESSES)
    ]
    logs = []
    deadline = time.monotonic() + 120
    try:
        for p in procs:
            logs.append(p.communicate(timeout=max(1.0, deadline - time.monotonic()))[0])
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        logs = [p.communicate()[0] for p in procs]
        raise AssertionError("workers timed out after 120 s; output:\n" + "\n-----\n".join(logs))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for i, (p, log) in enumerate(zip(procs, logs)):
        assert p.returncode == 0, f"worker {i} exited with {p.returncode}:\n{log}"

    results = [json.loads(o.read_text()) for o in outs]
    reference, ref_w_D, ref_b = _reference_run()
    for i, r in enumerate(results):
        assert r["spec"] == {
            "source": "explicit",
            "coordinator_address": f"127.0.0.1:{port}",
            "num_processes": 2,
            "process_id": i,
            "local_device_ids": None,
        }
        assert (r["process_index"], r["process_count"]) == (i, 2)
        assert (r["device_count"], r["local_device_count"]) == (8, 4)
        assert r["is_main"] == (i == 0)
        assert r["main_only"] == ("ran" if i == 0 else None)
        np.testing.assert_allclose(r["losses"], reference, rtol=1e-5)
        np.testing.assert_allclose(r["w_D"], ref_w_D, rtol=1e-5)
        np.testing.assert_allclose(r["b"], ref_b, rtol=1e-5)
        assert all(r["restored_equal"]) and len(r["restored_equal"]) == 4
        assert r["num_local_batch_shards"] == 4
    # Both processes computed the same global loss and restored the same parameters.
    assert results[0]["losses"] == results[1]["losses"]
    assert (results[0]["w_D"], results[0]["b"]) == (results[1]["w_D"], results[1]["b"])
    assert reference[0] > reference[-1] * 2  # training moved: 5 steps at lr 0.1 more than halve the loss
    # One checkpoint, with the OCDBT shard files of both processes merged under it.
    ckpt = tmp_path / "ckpt" / "step_5"
    assert sorted(d.name for d in ckpt.glob("ocdbt.process_*")) == ["ocdbt.process_0", "ocdbt.process_1"]
    assert sorted(d.name for d in (ckpt / "array_metadatas").iterdir()) == ["process_0", "process_1"]
    # Metrics are logged by process 0 only.
    logged = re.findall(r"^step (\d+) loss (\S+)$", logs[0], flags=re.M)
    assert logged == [(str(k), f"{loss:.6f}") for k, loss in enumerate(results[0]["losses"])]
    assert re.findall(r"^step \d+ loss", logs[1], flags=re.M) == []


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--worker", action="store_true", required=True)
    parser.add_argument("--process_id", type=int, required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--ckpt_dir", required=True)
    parser.add_argument("--out", required=True)
    a = parser.parse_args()
    _worker(a.process_id, a.port, a.ckpt_dir, a.out)
