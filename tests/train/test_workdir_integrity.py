"""A workdir holds one run: another run is refused by name, resumed metrics are logged once, fewer steps
than done is an error, non-finite updates are skipped then stop the run, and summaries are strict JSON."""

import json
import os
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest

from pe_rlhf import data as D
from pe_rlhf.models import lora
from pe_rlhf.models.tiny import tiny_model
from pe_rlhf.train import supervised
from pe_rlhf.train.config import DataConfig, LoopConfig, TuningConfig
from pe_rlhf.train.loop import NonFiniteError
from pe_rlhf.train.optim import OptimizerConfig
from pe_rlhf.train.records import RunIdentityError, identity_differences
from pe_rlhf.train.writer import truncate_metrics

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
RUN = os.path.join(REPO, "experiments", "run.py")


def pairs(n=64):
    rng = np.random.default_rng(0)
    text = lambda end: "".join(rng.choice(list("abcdefgh "), size=5)) + end  # noqa: E731
    return D.Loaded(examples=tuple(D.PreferenceExample("Q: say it", text("!"), text(".")) for _ in range(n)),
                    source="synthetic")


def train(workdir, *, steps=4, model="tiny", split_seed=0, checkpoint_every=2):
    return supervised.train_reward_model(
        workdir=str(workdir), dataset=pairs(), model=model,
        tuning=TuningConfig(mode="lora", lora=lora.LoRAConfig(rank=2, alpha=4.0)),
        optimizer=OptimizerConfig(learning_rate=1e-3, schedule="constant"),
        loop=LoopConfig(num_steps=steps, batch_size=4, eval_every=0, log_every=1, checkpoint_every=checkpoint_every,
                        keep_checkpoints=5, progress_bar=False),
        data=DataConfig(max_prompt_len=12, max_response_len=8, eval_size=8, split_seed=split_seed))


def test_another_run_is_refused_naming_what_differs(tmp_path):
    train(tmp_path, steps=2)
    before = open(tmp_path / "run_info.json").read()
    with pytest.raises(RunIdentityError) as e:
        train(tmp_path, steps=4, model="tiny-qwen3")
    assert "model: was 'tiny', now 'tiny-qwen3'" in str(e.value)
    with pytest.raises(RunIdentityError, match=r"data.split_seed: was 0, now 1"):
        train(tmp_path, steps=4, split_seed=1)
    assert open(tmp_path / "run_info.json").read() == before  # the first run's record is intact
    train(tmp_path, steps=4)  # more steps of the same run are fine


def test_an_identity_recorded_before_lora_options_existed_resumes_as_plain_lora(tmp_path):
    train(tmp_path, steps=2)
    info = json.load(open(tmp_path / "run_info.json"))
    for key in ("rslora", "dora"):  # as written before LoRAConfig had these options
        del info["identity"]["lora"][key]
    json.dump(info, open(tmp_path / "run_info.json", "w"))
    assert identity_differences(info["identity"], {**info["identity"], "lora": {
        **info["identity"]["lora"], "rslora": False, "dora": True}}) == [("lora.dora", False, True)]
    assert train(tmp_path, steps=4)["step"] == 4


def test_fewer_steps_than_done_is_an_error(tmp_path):
    train(tmp_path, steps=4)
    saved = sorted(os.listdir(tmp_path / "checkpoints"))
    with pytest.raises(ValueError, match="LoopConfig.num_steps=2 is below step 4"):
        train(tmp_path, steps=2)
    assert sorted(os.listdir(tmp_path / "checkpoints")) == saved  # no checkpoint relabelled


def test_resumed_metrics_log_every_step_once(tmp_path):
    train(tmp_path, steps=4)
    # as after a kill at step 4 before its checkpoint: only step 2's remains, steps 3-4 are logged
    import shutil
    shutil.rmtree(tmp_path / "checkpoints" / "4")
    os.remove(tmp_path / "summary.json")
    summary = train(tmp_path, steps=4)
    steps = [json.loads(line)["step"] for line in open(tmp_path / "metrics.jsonl")
             if "train/loss" in json.loads(line)]
    assert steps == [1, 2, 3, 4]
    assert summary["step"] == 4


def test_a_run_resumed_at_its_last_step_logs_its_final_evaluation_once(tmp_path):
    train(tmp_path, steps=4)
    first = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert train(tmp_path, steps=4)["step"] == 4  # resumed at step 4: nothing to train, evaluated again
    rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    evals = [r for r in rows if "eval/pairwise_accuracy" in r]
    assert [r["step"] for r in evals] == [4]
    assert [r for r in rows if "train/loss" in r] == [r for r in first if "train/loss" in r]


def test_truncate_metrics_drops_later_steps_and_torn_lines(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "a": 1}\n{"step": 2, "a": 2}\n{"step": 3, "a": 3}\n{"step": 4, "a"')
    assert truncate_metrics(str(path), 2) == 2
    assert path.read_text() == '{"step": 1, "a": 1}\n{"step": 2, "a": 2}\n'
    path.write_text('{"step": 1, "a": 1}\n{"step": 2, "a": 2}\n{"step": 2, "eval/x": 1, "eval/y": 2}\n')
    assert truncate_metrics(str(path), 2, drop_prefix_at="eval/") == 1  # the eval row at step 2 only
    assert path.read_text() == '{"step": 1, "a": 1}\n{"step": 2, "a": 2}\n'


def fit_tiny(workdir, loss_fn, *, evaluate=lambda *a: {}, num_steps=10):
    """`supervised.fit` of a rank-2 LoRA on a tiny model, with `loss_fn`; returns (the model before, after)."""
    model, tokenizer = tiny_model("llama")
    lora.add_lora(model, "policy", lora.LoRAConfig(rank=2, alpha=4.0))
    items, _ = D.tokenize_sft([D.PromptResponse("ab", "cd")] * 16, tokenizer,
                              D.TokenizeOptions(max_prompt_len=6, max_response_len=4))
    import functools
    collate = functools.partial(D.batch_sft, seq_len=10, pad_id=0)
    it = D.BatchIterator(list(items), 4, collate, seed=0)
    before = [np.asarray(x) for x in jax_leaves(model)]
    try:
        supervised.fit(model, filter_=lora.adapter_filter("policy"), loss_fn=loss_fn, train_iter=it,
                       evaluate=evaluate, optimizer=OptimizerConfig(), workdir=str(workdir),
                       loop=LoopConfig(num_steps=num_steps, batch_size=4, eval_every=0, log_every=1,
                                       checkpoint_every=1, progress_bar=False, max_nonfinite_updates=3),
                       run_info={"stage": "test", "identity": {"stage": "test"}})
    finally:
        fit_tiny.models = before, model


def test_nonfinite_updates_are_skipped_then_stop_the_run(tmp_path):
    def nan_loss(m, batch):
        loss = jnp.sum(m(batch["tokens_BxT"]).astype(jnp.float32)) * jnp.nan
        return loss, {"loss": loss}

    with pytest.raises(NonFiniteError, match="3 updates in a row"):
        fit_tiny(tmp_path, nan_loss)
    before, model = fit_tiny.models
    for a, b in zip(jax_leaves(model), before):  # nothing was applied
        np.testing.assert_array_equal(np.asarray(a), b)
    rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert [r["train/skipped_steps"] for r in rows] == [1, 2]
    assert rows[0]["train/loss"] is None  # strict JSON: NaN is logged as null


def test_a_nonfinite_loss_with_a_finite_gradient_is_skipped_too(tmp_path):
    def nan_term(m, batch):  # a term whose coefficient is 0 and whose value overflowed: 0 * inf = NaN
        loss = jnp.mean(m(batch["tokens_BxT"]).astype(jnp.float32)) + 0.0 * jnp.float32(jnp.inf)
        return loss, {"loss": loss}

    with pytest.raises(NonFiniteError, match="3 updates in a row .* non-finite loss or gradient"):
        fit_tiny(tmp_path, nan_term)
    before, model = fit_tiny.models
    for a, b in zip(jax_leaves(model), before):
        np.testing.assert_array_equal(np.asarray(a), b)
    rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert [r["train/skipped_steps"] for r in rows] == [1, 2]
    assert rows[0]["train/grad_norm"] is not None  # the gradient itself was finite


def test_a_nonfinite_final_evaluation_fails_the_run_without_a_summary(tmp_path):
    def loss(m, batch):
        loss = jnp.mean(m(batch["tokens_BxT"]).astype(jnp.float32))
        return loss, {"loss": loss}

    with pytest.raises(NonFiniteError, match="final evaluation at step 2 is not finite: eval/loss "):
        fit_tiny(tmp_path, loss, evaluate=lambda *a: {"loss": float("nan"), "accuracy": 0.5, "auc": None},
                 num_steps=2)
    assert not os.path.exists(tmp_path / "summary.json")
    rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert rows[-1] == {"step": 2, "eval/loss": None, "eval/accuracy": 0.5}


def jax_leaves(model):
    import jax
    from flax import nnx
    return jax.tree.leaves(nnx.state(model, nnx.Param))


@pytest.mark.slow
def test_cli_refusal_keeps_the_first_runs_config(tmp_path):
    args = [sys.executable, RUN, "--gin_file", os.path.join(REPO, "experiments", "configs", "tiny_rm.gin"),
            "--workdir", str(tmp_path), "--gin_param", "LoopConfig.num_steps=2", "--gin_param", "LoopConfig.eval_every=0",
            "--gin_param", "LoopConfig.checkpoint_every=2"]
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    subprocess.run(args, check=True, capture_output=True, env=env)
    first = open(tmp_path / "config.gin").read()
    bad = subprocess.run(args + ["--gin_param", 'train_reward_model.model="tiny-qwen3"'], capture_output=True,
                         text=True, env=env)
    assert bad.returncode != 0 and "model: was 'tiny', now 'tiny-qwen3'" in bad.stderr
    assert open(tmp_path / "config.gin").read() == first
    assert not os.path.exists(tmp_path / "config.2.gin")
    again = subprocess.run(args + ["--gin_param", "LoopConfig.num_steps=3"], capture_output=True, text=True, env=env)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "LoopConfig.num_steps = 3" in open(tmp_path / "config.2.gin").read()
    assert open(tmp_path / "config.gin").read() == first
