"""Reward-model training end to end: learning a rule, exact resume after a kill, the gin command line."""

import json
import os
import random
import signal
import subprocess
import sys

import numpy as np
import pytest

from pe_rlhf import data as D
from pe_rlhf.models import lora
from pe_rlhf.train.optim import OptimizerConfig
from pe_rlhf.train.supervised import DataConfig, LoopConfig, TuningConfig, train_reward_model

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
RUN = os.path.join(REPO, "experiments", "run.py")


def synthetic_pairs(n, seed=0):
    """Rule: a response ending in '!' is preferred to one ending in '.'; the rest is noise."""
    rng = random.Random(seed)

    def text(end):
        return "".join(rng.choice("abcdefgh ") for _ in range(rng.randint(3, 9))) + end

    return D.Loaded(examples=tuple(D.PreferenceExample("Q: say it", text("!"), text(".")) for _ in range(n)),
                    source="synthetic")


@pytest.mark.slow
def test_lora_reward_model_learns_a_preference_rule(tmp_path):
    summary = train_reward_model(
        workdir=str(tmp_path), dataset=synthetic_pairs(400), model="tiny",
        tuning=TuningConfig(mode="lora", lora=lora.LoRAConfig(rank=4, alpha=8.0)),
        optimizer=OptimizerConfig(learning_rate=3e-3, schedule="constant"),
        loop=LoopConfig(num_steps=200, batch_size=8, eval_every=0, log_every=50, checkpoint_every=1000,
                        progress_bar=False),
        data=DataConfig(max_prompt_len=12, max_response_len=12, eval_size=100))
    assert summary["eval/pairwise_accuracy"] > 0.95, summary
    assert summary["eval/num_pairs"] == 100
    rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert [r["step"] for r in rows if "train/loss" in r] == [50, 100, 150, 200]
    assert rows[-1]["eval/pairwise_accuracy"] == summary["eval/pairwise_accuracy"]
    assert os.listdir(tmp_path / "tensorboard")


RESUME_ARGS = [
    "--gin_file", os.path.join(REPO, "experiments", "configs", "tiny_rm.gin"),
    "--gin_param", "LoopConfig.checkpoint_every=5", "--gin_param", "LoopConfig.num_steps=10",
    "--gin_param", "LoopConfig.eval_every=0",
]

# Runs run.py, but SIGKILLs itself right after the step-5 checkpoint is on disk.
KILL_AT_5 = """
import os, signal, sys, runpy
from pe_rlhf.checkpoints import orbax_io
save = orbax_io.RunCheckpointer.save
def save_then_die(self, step, *a, **k):
    out = save(self, step, *a, **k)
    if step == 5:
        self.wait()
        os.kill(os.getpid(), signal.SIGKILL)
    return out
orbax_io.RunCheckpointer.save = save_then_die
sys.argv = [sys.argv[1]] + sys.argv[2:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def _adapters(workdir):
    from pe_rlhf.checkpoints.orbax_io import RunCheckpointer

    c = RunCheckpointer(os.path.join(workdir, "checkpoints"))
    step = c.latest_step()
    restored = c.manager.restore(step)
    c.close()
    return step, restored


def _run(args, env_extra=None, script=None):
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO)
    cmd = [sys.executable] + (["-c", script, RUN] if script else [RUN]) + args
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_resume_after_kill_is_bitwise_exact(tmp_path):
    straight, interrupted = str(tmp_path / "straight"), str(tmp_path / "interrupted")
    r = _run(RESUME_ARGS + ["--workdir", straight])
    assert r.returncode == 0, r.stderr[-3000:]
    r = _run(RESUME_ARGS + ["--workdir", interrupted], script=KILL_AT_5)
    assert r.returncode == -signal.SIGKILL, (r.returncode, r.stderr[-3000:])
    assert sorted(os.listdir(os.path.join(interrupted, "checkpoints")), key=int)[-1] == "5"
    r = _run(RESUME_ARGS + ["--workdir", interrupted])
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resumed from" in r.stdout and "at step 5" in r.stdout

    (s1, a), (s2, b) = _adapters(straight), _adapters(interrupted)
    assert s1 == s2 == 10
    leaves_a = [np.asarray(x) for x in __import__("jax").tree.leaves(a["state"])]
    leaves_b = [np.asarray(x) for x in __import__("jax").tree.leaves(b["state"])]
    assert len(leaves_a) == len(leaves_b) > 0
    for x, y in zip(leaves_a, leaves_b):
        np.testing.assert_array_equal(x, y)  # bitwise: adapters, head and Adam moments
    assert a["meta"]["data"] == b["meta"]["data"]


@pytest.mark.slow
def test_gin_typo_fails_before_writing_anything(tmp_path):
    workdir = tmp_path / "wd"
    r = _run(RESUME_ARGS + ["--gin_param", "LoopConfig.num_stpes=3", "--workdir", str(workdir)])
    assert r.returncode != 0
    assert "num_stpes" in r.stderr and "LoopConfig" in r.stderr
    assert not workdir.exists()


def test_empty_dataset_is_a_clear_error(tmp_path):
    with pytest.raises(D.DataError, match="empty"):
        train_reward_model(workdir=str(tmp_path), dataset=D.Loaded(examples=(), source="nothing.jsonl"))


