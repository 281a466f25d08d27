"""The RL stage end to end: PPO and ReMax loops, exact resume, reward-model checks, the quickstart."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pe_rlhf.checkpoints.load import load_backbone
from pe_rlhf.data import read_prompts_jsonl, toy
from pe_rlhf.models import lora
from pe_rlhf.train.optim import OptimizerConfig
from pe_rlhf.train.policy import RLConfig
from pe_rlhf.train.rl_loop import RewardModelMismatch, attach_reward_model, train_policy
from pe_rlhf.train.supervised import DataConfig, LoopConfig, TuningConfig

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def refusal_reward():
    _, tok = load_backbone("tiny")
    target = jnp.asarray(tok(toy.REFUSAL, add_special_tokens=False).input_ids)

    def reward(prompt, prompt_mask, resp, resp_mask):  # fraction of the refusal's characters in place
        n = min(resp.shape[1], target.shape[0])
        return ((resp[:, :n] == target[:n]) & resp_mask[:, :n]).mean(axis=1)

    return reward


def run_policy(workdir, steps, algorithm="remax", **kw):
    return train_policy(
        workdir=str(workdir), prompts=toy.prompts(64), model="tiny", reward_fn=refusal_reward(),
        tuning=TuningConfig(mode="lora", lora=lora.LoRAConfig(rank=4, alpha=8.0)),
        rl=RLConfig(algorithm=algorithm, max_new_tokens=8, ppo_epochs=2),
        optimizer=OptimizerConfig(learning_rate=3e-3, schedule="constant"),
        loop=LoopConfig(num_steps=steps, batch_size=4, eval_every=0, log_every=1, checkpoint_every=2,
                        progress_bar=False),
        data=DataConfig(max_prompt_len=48, eval_size=8), **kw)


def _checkpoint_leaves(workdir):
    from pe_rlhf.checkpoints.orbax_io import RunCheckpointer

    c = RunCheckpointer(os.path.join(workdir, "checkpoints"))
    restored = c.manager.restore(c.latest_step())
    c.close()
    return [np.asarray(x) for x in jax.tree.leaves(restored["state"])], restored["meta"]


@pytest.mark.slow
def test_remax_loop_resumes_exactly(tmp_path):
    straight = run_policy(tmp_path / "straight", 4)
    assert straight["step"] == 4 and straight["eval_prompts"] == 8
    run_policy(tmp_path / "resumed", 2)
    resumed = run_policy(tmp_path / "resumed", 4)  # same workdir: continues from step 2
    (a, meta_a), (b, meta_b) = _checkpoint_leaves(tmp_path / "straight"), _checkpoint_leaves(tmp_path / "resumed")
    assert len(a) == len(b) > 0
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)  # adapters, Adam moments, baseline and the RNG key
    assert meta_a["data"] == meta_b["data"]
    assert straight["eval/reward"] == resumed["eval/reward"]
    rows = [json.loads(line) for line in open(tmp_path / "straight" / "metrics.jsonl")]
    assert {"train/reward_mean", "train/kl", "train/entropy", "train/response_length", "train/eos_fraction",
            "train/baseline_reward", "train/advantage_mean", "train/examples_per_s"} <= set(rows[0])
    samples = [json.loads(line) for line in open(tmp_path / "straight" / "samples_4.jsonl")]
    assert len(samples) == 8 and {"prompt", "response", "reward"} == set(samples[0])
    # the held-out prompts, for a judged comparison: the ones the eval samples were answered on
    held_out = read_prompts_jsonl(str(tmp_path / "straight" / "eval_prompts.jsonl")).examples
    assert [e.prompt for e in held_out] == [s["prompt"] for s in samples]


@pytest.mark.slow
def test_ppo_loop_trains_a_value_adapter(tmp_path):
    summary = run_policy(tmp_path, 2, algorithm="ppo")
    assert summary["step"] == 2 and summary["algorithm"] == "ppo"
    rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    train_rows = [r for r in rows if "train/loss" in r]
    assert len(train_rows) == 2 and all(np.isfinite(r["train/value_loss"]) for r in train_rows)
    # the value adapter's B matrices start at zero (LoRA): the checkpointed ones have moved
    from pe_rlhf.checkpoints.orbax_io import RunCheckpointer

    c = RunCheckpointer(os.path.join(tmp_path, "checkpoints"))
    trainable = c.manager.restore(c.latest_step())["state"]["trainable"]
    c.close()
    paths = {jax.tree_util.keystr(p): np.asarray(x) for p, x in jax.tree_util.tree_leaves_with_path(trainable)}
    value_b = [x for p, x in paths.items() if "['lora']['value']['b']" in p]
    assert value_b and all(np.any(x != 0) for x in value_b), sorted(p for p in paths if "['layers']['0']" in p)


def test_reward_model_with_another_tokenizer_is_a_clear_error(tmp_path):
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    from pe_rlhf.checkpoints.export import export_merged
    from pe_rlhf.models.tiny import tiny_model

    other, _ = tiny_model("llama", vocab_size=64)
    words = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({f"w{i}": i for i in range(64)},
                                                                                unk_token="w0")))
    export_merged(other, str(tmp_path / "other_model"), tokenizer=words)
    rm_dir = tmp_path / "rm"
    rm_dir.mkdir()
    (rm_dir / "run_info.json").write_text(json.dumps({"stage": "reward_model", "model": str(tmp_path / "other_model"),
                                                      "tuning": "full", "adapter": "reward", "lora": None}))
    backbone, tok = load_backbone("tiny")
    with pytest.raises(RewardModelMismatch, match="tokenizer .* differs"):
        attach_reward_model(backbone, tok, str(rm_dir), policy_model="tiny", dtype="float32")


def test_reward_model_workdir_must_exist(tmp_path):
    backbone, tok = load_backbone("tiny")
    with pytest.raises(FileNotFoundError, match="run_info.json"):
        attach_reward_model(backbone, tok, str(tmp_path), policy_model="tiny", dtype="float32")


def test_a_training_fraction_is_refused_before_anything_is_written(tmp_path):
    with pytest.raises(ValueError, match="DataConfig.train_fraction=0.5"):
        train_policy(workdir=str(tmp_path / "rl"), prompts=toy.prompts(8), reward_fn=refusal_reward(),
                     data=DataConfig(train_fraction=0.5))
    assert not (tmp_path / "rl").exists()


@pytest.mark.slow
def test_quickstart_pipeline_smoke(tmp_path):
    """The README's first command, shortened: every stage runs and the table's numbers are sane."""
    short = ["sft/LoopConfig.num_steps=120", "rm/LoopConfig.num_steps=60", "rl/LoopConfig.num_steps=4",
             "sft/LoopConfig.progress_bar=False", "rm/LoopConfig.progress_bar=False",
             "rl/LoopConfig.progress_bar=False", "rl/LoopConfig.checkpoint_every=2"]
    cmd = [sys.executable, os.path.join(REPO, "experiments", "run.py"), "--gin_file",
           os.path.join(REPO, "experiments", "configs", "quickstart.gin"), "--workdir", str(tmp_path)]
    for p in short:
        cmd += ["--gin_param", p]
    r = subprocess.run(cmd, env=dict(os.environ, JAX_PLATFORMS="cpu"), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-4000:]
    assert "| evaluation | gold rule satisfied: RL policy |" in r.stdout
    summary = json.load(open(tmp_path / "summary.json"))
    assert summary["sft_perplexity"] < 1.5  # the format is learnt
    assert summary["rm_pairwise_accuracy"] > 0.9  # the rule is learnt by the reward model
    assert 0.0 <= summary["gold_sft"] <= 1.0 and 0.0 <= summary["gold_rl"] <= 1.0
    for stage in ("sft", "reward_model", "rl"):
        assert os.path.exists(tmp_path / stage / "summary.json")
    assert os.path.exists(tmp_path / "sft" / "export" / "model.safetensors")
