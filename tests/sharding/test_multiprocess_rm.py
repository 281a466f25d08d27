"""Two processes run reward-model steps on one global mesh through run.py, checkpoint with Orbax, resume.

Each process has 4 simulated CPU devices; `distributed.initialize` (called by run.py) joins them from
JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID into one 8-device data-parallel mesh.
Each host reads its own half of every global batch. The result must equal one process driving all 8
devices on the same global batches (rows in another order, so equal to float rounding).
"""

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

pytestmark = pytest.mark.slow  # two processes train a reward model

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cmd(workdir, steps, per_host_batch):
    return [sys.executable, os.path.join(REPO, "experiments", "run.py"), "--gin_file",
            os.path.join(REPO, "experiments", "configs", "tiny_rm.gin"), "--workdir", str(workdir),
            "--gin_param", "LoopConfig.mesh=@MeshConfig()", "--gin_param", "MeshConfig.data=-1",
            "--gin_param", f"LoopConfig.batch_size={per_host_batch}", "--gin_param", f"LoopConfig.num_steps={steps}",
            "--gin_param", "LoopConfig.checkpoint_every=3", "--gin_param", "LoopConfig.eval_every=0",
            # one schedule for the run resumed from 6 steps to 9 and the straight 9 (unset, each would decay
            # over its own num_steps)
            "--gin_param", "OptimizerConfig.total_steps=10"]


def _two_processes(workdir, steps):
    port = _free_port()
    procs = []
    for i in range(2):
        env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=4",
                   JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=str(i))
        procs.append(subprocess.Popen(_cmd(workdir, steps, 4), env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    outs = []
    try:
        for p in procs:
            out, err = p.communicate(timeout=300)
            assert p.returncode == 0, err[-3000:]
            outs.append(out)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    return outs


def _losses(workdir):
    rows = [json.loads(line) for line in open(workdir / "metrics.jsonl")]
    return [r["step"] for r in rows if "train/loss" in r], np.array([r["train/loss"] for r in rows if "train/loss" in r])


def test_two_processes_train_checkpoint_and_resume_reward_model(tmp_path):
    two = tmp_path / "two"
    first = _two_processes(two, 6)
    assert all("mesh data=8 fsdp=1 tensor=1, 4 local devices" in out for out in first[:1])
    assert {"3", "6"} <= set(os.listdir(two / "checkpoints")) and max(map(int, os.listdir(two / "checkpoints"))) == 6
    second = _two_processes(two, 9)  # both processes restore step 6 from the shared checkpoint
    assert all("resumed from" in out and "at step 6" in out for out in second)
    steps, losses_two = _losses(two)
    assert steps == list(range(1, 10))  # logged once, by process 0, across the restart

    one = tmp_path / "one"  # one process, 8 devices, the same global batches of 8
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=8")
    r = subprocess.run(_cmd(one, 9, 8), env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    _, losses_one = _losses(one)
    np.testing.assert_allclose(losses_two, losses_one, rtol=1e-4)  # the whole trajectory, resume included
    assert losses_two[-1] < losses_two[0]
    a, b = (json.load(open(d / "summary.json")) for d in (two, one))
    for key in ("eval/pairwise_accuracy", "eval/margin_mean", "eval/margin_std"):
        np.testing.assert_allclose(a[key], b[key], rtol=1e-3, atol=1e-6)  # functions of the final adapters
