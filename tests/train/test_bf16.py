"""bf16 training: fp32 master weights for full tuning, fp32 adapters and Adam state for LoRA (tiny models, CPU).

Numbers: Adam's first step moves each weight by lr * g / (|g| + eps), ~lr * sign(g); at lr 1e-6 the fp32
masters take that step while the same update applied to bf16 weights of magnitude >= 1e-3 rounds away
(bf16's spacing there is >= 2^-17 ~ 7.6e-6 > 2 * 1e-6).
"""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from pe_rlhf import data as D
from pe_rlhf.checkpoints.orbax_io import RunCheckpointer
from pe_rlhf.data import toy
from pe_rlhf.models import lora
from pe_rlhf.models.tiny import tiny_config, tiny_model
from pe_rlhf.profiling.measure import compile_step, concrete_args
from pe_rlhf.profiling.step_builders import build_rl_step, build_rm_step
from pe_rlhf.train import supervised_steps
from pe_rlhf.train.optim import OptimizerConfig, make_optimizer
from pe_rlhf.train.precision import Precision, master_weights
from pe_rlhf.train.sharded import sharded_train_step
from pe_rlhf.train.supervised import (DataConfig, LoopConfig, TuningConfig, reward_model, train_reward_model,
                                      train_sft, trainable_filter)

FULL = TuningConfig(mode="full")
LORA4 = TuningConfig(mode="lora", lora=lora.LoRAConfig(rank=4, alpha=8.0))
BF16, F32 = jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float32)


def _batch(pairs=4, length=12, seed=0):
    rng = np.random.default_rng(seed)
    tokens = lambda: rng.integers(3, tiny_config().vocab_size, (pairs, length)).astype(np.int32)
    ones = np.ones((pairs, length), np.int32)
    return {"chosen_tokens_BxT": tokens(), "rejected_tokens_BxT": tokens(), "chosen_mask_BxT": ones,
            "rejected_mask_BxT": ones}


def _split_rm(dtype, tuning, head_seed=None):
    """A tiny reward model built in `dtype` and split as `supervised.fit` splits it (masters for full tuning)."""
    rm = reward_model(tiny_model("llama", dtype=dtype)[0], tuning, "reward")
    if head_seed is not None:  # a zero head scores every text 0 (loss log 2 whatever the backbone): give it weights
        rm.head.kernel.set_value(0.1 * jax.random.normal(jax.random.key(head_seed), rm.head.kernel.get_value().shape))
    graphdef, trainable, frozen = nnx.split(rm, trainable_filter(tuning, "reward"), ...)
    return graphdef, trainable, frozen


def _stepper(graphdef, trainable, frozen, batch, optimizer, precision=Precision()):
    tx = make_optimizer(optimizer)
    step = sharded_train_step(None, graphdef=graphdef, tx=tx, loss_fn=supervised_steps.pairwise_reward_loss,
                              trainable=trainable, opt_state=jax.eval_shape(tx.init, trainable), frozen=frozen,
                              batch=batch, precision=precision)
    trainable, _, frozen = step.place(trainable, None, frozen)
    return step, trainable, step.init_opt_state(tx, trainable), frozen


def _flat(state):
    """{'path': np.ndarray} of a state's leaves (copies: the step donates its inputs)."""
    return {jax.tree_util.keystr(p): np.array(x) for p, x in jax.tree_util.tree_leaves_with_path(state)}


def _grads(graphdef, trainable, frozen, batch, precision):
    def loss(t):
        return supervised_steps.pairwise_reward_loss(nnx.merge(graphdef, precision.cast(t), frozen), batch)[0]

    return jax.grad(loss)(trainable)


def _dtypes(tree):
    return {jnp.dtype(x.dtype) for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.floating)}


# (a) ---------------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_full_bf16_trains_fp32_masters_that_take_updates_bf16_weights_lose():
    lr = 1e-6
    optimizer = OptimizerConfig(learning_rate=lr, schedule="constant", max_grad_norm=None)
    batch = _batch()
    graphdef, bf16, frozen = _split_rm(BF16, FULL, head_seed=1)
    assert _dtypes(bf16) == {BF16, F32}  # the backbone as loaded; the head is fp32
    masters, precision = master_weights(bf16)
    assert precision.mixed and _dtypes(masters) == {F32}
    assert _dtypes(precision.cast(masters)) == {BF16, F32}
    grads = _flat(_grads(graphdef, masters, frozen, batch, precision))
    assert {g.dtype for g in grads.values()} == {np.dtype(np.float32)}  # fp32 gradients reach the masters

    # mixed: the masters move by Adam's first step, -lr * g / (|g| + eps)
    step, tr, opt, fr = _stepper(graphdef, masters, frozen, batch, optimizer, precision)
    before = _flat(tr)
    tr, opt, metrics = step(tr, opt, fr, batch)
    after = _flat(tr)
    assert {x.dtype for x in after.values()} == {np.dtype(np.float32)}
    assert _dtypes(opt) == {F32}  # Adam moments follow the masters
    # the gradient the step took, read back from Adam's first moment (mu = (1 - b1) g): a gradient taken in
    # another program differs by bf16 rounding, enough to flip the sign of a near-zero one
    grads = {k: v / np.float32(1 - optimizer.b1) for k, v in _flat(optax.tree_utils.tree_get(opt, "mu")).items()}
    assert grads.keys() == before.keys()
    moved = kept = 0
    for k, w0 in before.items():
        g, w1 = grads[k], after[k]
        expected = -lr * g / (np.abs(g) + 1e-8)
        tol = np.spacing(np.maximum(np.abs(w0), np.abs(w1)).astype(np.float32))  # one fp32 rounding of w0 + u
        assert np.all(np.abs((w1 - w0) - expected) <= tol + 1e-3 * lr), k
        if "head" not in k:
            big = (np.abs(w0) >= 1e-3) & (np.abs(g) > 1e-6)
            moved += int(np.sum(w1[big] != w0[big]))
            kept += int(np.sum(big))
    assert kept > 50_000 and moved == kept  # every sizeable weight with a gradient took the step

    # bf16 weights updated in place by the same Adam: none of the sizeable weights moves
    graphdef, bf16, frozen = _split_rm(BF16, FULL, head_seed=1)
    step, tr, opt, fr = _stepper(graphdef, bf16, frozen, batch, optimizer)
    before = _flat(tr)
    tr, _, _ = step(tr, opt, fr, batch)
    after = _flat(tr)
    stuck = total = 0
    for k, w0 in before.items():
        if "head" in k:
            continue
        assert w0.dtype == jnp.bfloat16
        big = (np.abs(w0.astype(np.float32)) >= 1e-3) & (np.abs(grads[k]) > 1e-6)
        stuck += int(np.sum(after[k][big] == w0[big]))
        total += int(np.sum(big))
    assert total == kept and stuck == total  # rounded away: the reason for masters


# (b) ---------------------------------------------------------------------------------------------------------
def test_bf16_mixed_step_loss_is_close_to_the_fp32_step():
    """Same weights (bf16 = fp32 rounded), three updates at lr 1e-3: the first loss within 0.5%, the rest within 3%.

    The first step's loss is the forward pass on the same weights (bf16 rounding alone). Later ones drift: Adam's
    early steps move every weight by ~lr * sign(g), and bf16 flips the sign of some near-zero gradients.
    """
    optimizer = OptimizerConfig(learning_rate=1e-3, schedule="constant")
    losses = {}
    for dtype in (F32, BF16):
        graphdef, trainable, frozen = _split_rm(dtype, FULL, head_seed=1)
        trainable, precision = master_weights(trainable)
        assert precision.mixed == (dtype == BF16)
        step, tr, opt, fr = _stepper(graphdef, trainable, frozen, _batch(), optimizer, precision)
        losses[dtype.name] = []
        for i in range(3):
            tr, opt, metrics = step(tr, opt, fr, _batch(seed=i))
            losses[dtype.name].append(float(metrics["loss"]))
    f32, b16 = np.array(losses["float32"]), np.array(losses["bfloat16"])
    rel = np.abs(f32 - b16) / f32
    assert rel[0] <= 5e-3, losses  # the same weights, forward in bf16: measured 0.1%
    assert np.all(rel <= 3e-2), losses  # after two updates the paths drift apart (measured 0.5%, 1.8%)
    assert f32[-1] < f32[0] and b16[-1] < b16[0]  # both train
    assert abs(f32[0] - np.log(2)) > 0.05  # the head scores: the comparison is not the trivial log 2


# (c) ---------------------------------------------------------------------------------------------------------
def test_lora_bf16_keeps_fp32_adapters_grads_and_moments_and_is_unchanged():
    batch = _batch()
    graphdef, trainable, frozen = _split_rm(BF16, LORA4)
    masters, precision = master_weights(trainable)
    assert not precision.mixed  # nothing to widen: adapters and head are fp32
    assert _dtypes(trainable) == {F32}
    for (p, a), (q, b) in zip(jax.tree_util.tree_leaves_with_path(trainable),
                              jax.tree_util.tree_leaves_with_path(masters)):
        assert p == q and a is b  # the very arrays
    kernels = {jax.tree_util.keystr(p): x.dtype for p, x in jax.tree_util.tree_leaves_with_path(frozen)}
    assert kernels and all(d == BF16 for k, d in kernels.items() if k.endswith("['kernel']"))
    assert _dtypes(frozen) == {BF16}
    names = list(_flat(trainable))
    assert any("['lora']['reward']" in k for k in names) and any("['head']" in k for k in names)
    assert _dtypes(_grads(graphdef, trainable, frozen, batch, precision)) == {F32}

    results = []
    for p in (Precision(), precision):  # the LoRA path with and without the precision step: bitwise equal
        graphdef, trainable, frozen = _split_rm(BF16, LORA4)
        optimizer = OptimizerConfig(learning_rate=1e-3, total_steps=1000)
        step, tr, opt, fr = _stepper(graphdef, trainable, frozen, batch, optimizer, p)
        tr, opt, metrics = step(tr, opt, fr, batch)
        assert _dtypes(tr) == {F32} and _dtypes(opt) == {F32}  # adapters, head, Adam mu and nu
        results.append((_flat(tr), _flat(opt), float(metrics["loss"])))
    (tr_a, opt_a, loss_a), (tr_b, opt_b, loss_b) = results
    assert loss_a == loss_b
    for k in tr_a:
        np.testing.assert_array_equal(tr_a[k], tr_b[k])
    for k in opt_a:
        np.testing.assert_array_equal(opt_a[k], opt_b[k])


# (3) memory accounting --------------------------------------------------------------------------------------
def test_planner_builds_full_bf16_as_fp32_masters_and_a_bf16_compute_copy():
    cfg = tiny_config("llama")
    base = sum(x.size for x in jax.tree.leaves(nnx.state(tiny_model("llama")[0], nnx.Param)))
    full32 = build_rm_step(cfg, FULL, pairs=2, seq_len=8)
    full16 = build_rm_step(cfg, FULL, pairs=2, seq_len=8, frozen_dtype="bfloat16")
    assert full32.arg_bytes()["trainable"] == full16.arg_bytes()["trainable"] == (base + 65) * 4
    assert full32.arg_bytes()["opt_state"] == full16.arg_bytes()["opt_state"]  # fp32 Adam either way
    assert "compute_copy" not in full32.estimates and full16.estimates["compute_copy"] == base * 2
    # the planner's abstract state is what training builds
    _, trainable, _ = _split_rm(BF16, FULL)
    masters, _ = master_weights(trainable)
    shapes = lambda t: jax.tree.map(lambda x: (tuple(x.shape), jnp.dtype(x.dtype)), t)
    assert shapes(full16.args[0]) == shapes(masters)
    lora16 = build_rm_step(cfg, LORA4, pairs=2, seq_len=8, frozen_dtype="bfloat16")
    assert lora16.arg_bytes()["frozen"] == base * 2 and "compute_copy" not in lora16.estimates


@pytest.mark.slow
def test_full_ppo_in_bf16_trains_fp32_policy_and_value_masters_against_bf16_frozen_models():
    cfg = tiny_config("llama")
    spec = build_rl_step(cfg, FULL, algorithm="ppo", prompts=2, prompt_len=6, new_tokens=3, ppo_epochs=1,
                         frozen_dtype="bfloat16")
    trainable, opt_state, frozen = spec.args[:3]
    assert _dtypes(trainable) == {F32} and _dtypes(opt_state) == {F32}
    paths = {jax.tree_util.keystr(p): x.dtype for p, x in jax.tree_util.tree_leaves_with_path(frozen)}
    assert all(d == BF16 for k, d in paths.items() if "['head']" not in k)  # anchor, RM backbone
    assert any(k.startswith("['anchor']") for k in paths) and any(k.startswith("['reward']") for k in paths)
    args = concrete_args(spec)
    before = _flat(args[0])
    out = compile_step(spec)(*args)
    after = _flat(out[0])
    assert {x.dtype for x in after.values()} == {np.dtype(np.float32)}
    assert any(not np.array_equal(before[k], after[k]) for k in before if k.startswith("['policy']"))
    assert any(not np.array_equal(before[k], after[k]) for k in before if k.startswith("['value']['backbone']"))
    assert np.isfinite(float(out[-1]["loss"]))


# (d), (e) end to end --------------------------------------------------------------------------------------------
def _pairs(n):
    rng = np.random.default_rng(0)
    text = lambda end: "".join(rng.choice(list("abcdefgh "), rng.integers(3, 9))) + end
    return D.Loaded(examples=tuple(D.PreferenceExample("Q: say it", text("!"), text(".")) for _ in range(n)),
                    source="synthetic")


def _loop(steps, every=2):
    return LoopConfig(num_steps=steps, batch_size=4, eval_every=0, log_every=1, checkpoint_every=every,
                      progress_bar=False)


def _checkpoint(workdir):
    c = RunCheckpointer(os.path.join(workdir, "checkpoints"))
    step, restored = c.latest_step(), c.manager.restore(c.latest_step())
    c.close()
    return step, {jax.tree_util.keystr(p): np.asarray(x)
                  for p, x in jax.tree_util.tree_leaves_with_path(restored["state"])}


@pytest.mark.slow
def test_full_bf16_resume_restores_the_fp32_masters_exactly(tmp_path):
    kw = dict(dataset=_pairs(40), model="tiny", dtype="bfloat16", tuning=FULL,
              optimizer=OptimizerConfig(learning_rate=1e-4, schedule="constant"),
              data=DataConfig(max_prompt_len=8, max_response_len=8, eval_size=8))
    straight, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")
    train_reward_model(workdir=straight, loop=_loop(4), **kw)
    train_reward_model(workdir=resumed, loop=_loop(2), **kw)
    _, at2 = _checkpoint(resumed)
    train_reward_model(workdir=resumed, loop=_loop(4), **kw)  # resumes at step 2 from fp32 masters
    (s1, a), (s2, b) = _checkpoint(straight), _checkpoint(resumed)
    assert s1 == s2 == 4 and a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)  # masters and Adam moments, bitwise
    embedding = next(v for k, v in at2.items() if "trainable" in k and "embedding" in k)
    assert embedding.dtype == np.float32
    assert np.any(embedding != embedding.astype(jnp.bfloat16).astype(np.float32))  # more than a bf16 holds
    floats = [v for k, v in a.items() if "trainable" in k and v.dtype.kind == "f"]
    assert floats and all(v.dtype == np.float32 for v in floats)

    # a frozen reader of this run (the RL stage's reward model) restores the masters rounded to its own bf16
    rm = reward_model(tiny_model("llama", dtype=BF16)[0], FULL, "reward")
    c = RunCheckpointer(os.path.join(straight, "checkpoints"))
    c.restore_module(rm, trainable_filter(FULL, "reward"))
    c.close()
    got = np.asarray(rm.backbone.embedding.get_value())
    want = next(v for k, v in a.items() if "trainable" in k and "embedding" in k)
    assert got.dtype == jnp.bfloat16
    np.testing.assert_array_equal(got, want.astype(jnp.bfloat16))


@pytest.mark.slow
def test_full_bf16_sft_exports_the_fp32_masters(tmp_path):
    from safetensors.numpy import load_file

    workdir = str(tmp_path / "sft")
    train_sft(workdir=workdir, dataset=toy.sft_demonstrations(24), model="tiny", dtype="bfloat16", tuning=FULL,
              optimizer=OptimizerConfig(learning_rate=1e-4, schedule="constant"), loop=_loop(3, every=3),
              data=DataConfig(max_prompt_len=48, max_response_len=32, eval_size=4))
    tensors = load_file(os.path.join(workdir, "export", "model.safetensors"))
    config = json.load(open(os.path.join(workdir, "export", "config.json")))
    assert config["dtype"] == "float32" and {t.dtype for t in tensors.values()} == {np.dtype(np.float32)}
    _, ckpt = _checkpoint(workdir)
    master = next(v for k, v in ckpt.items() if "trainable" in k and "embedding" in k)
    np.testing.assert_array_equal(tensors["model.embed_tokens.weight"], master)  # the masters, not a bf16 copy
    assert np.any(master != master.astype(jnp.bfloat16).astype(np.float32))


# the RL and DPO jobs in full bf16 -----------------------------------------------------------------------------
def _trainable_dtypes(workdir):
    _, leaves = _checkpoint(workdir)
    return {v.dtype for k, v in leaves.items() if "['trainable']" in k and v.dtype.kind == "f"}


@pytest.mark.slow
@pytest.mark.parametrize("algorithm", ["remax", "ppo"])
def test_full_bf16_rl_jobs_train_fp32_masters(tmp_path, algorithm, capsys):
    from pe_rlhf.train.policy import RLConfig
    from pe_rlhf.train.rl_loop import train_policy

    target = jnp.asarray([ord(c) % tiny_config().vocab_size for c in "no"])
    reward = lambda p, pm, resp, rm: (resp[:, :2] == target).mean(axis=1)
    summary = train_policy(workdir=str(tmp_path), prompts=toy.prompts(16), model="tiny", dtype="bfloat16",
                           reward_fn=reward, tuning=FULL,
                           rl=RLConfig(algorithm=algorithm, max_new_tokens=4, ppo_epochs=1),
                           optimizer=OptimizerConfig(learning_rate=1e-5, schedule="constant"),
                           loop=_loop(2), data=DataConfig(max_prompt_len=32, eval_size=4))
    out = capsys.readouterr().out
    assert "mixed precision:" in out and "fp32 masters of a bfloat16 compute copy" in out
    assert np.isfinite(summary["eval/reward"]) and summary["skipped_steps"] == 0
    assert _trainable_dtypes(tmp_path) == {np.dtype(np.float32)}  # policy (and PPO's value model) masters


@pytest.mark.slow
def test_full_bf16_dpo_trains_fp32_masters_against_a_bf16_reference(tmp_path):
    from pe_rlhf.train.preference import train_dpo

    summary = train_dpo(workdir=str(tmp_path), dataset=_pairs(40), model="tiny", dtype="bfloat16", tuning=FULL,
                        optimizer=OptimizerConfig(learning_rate=1e-4, schedule="constant"), loop=_loop(2),
                        data=DataConfig(max_prompt_len=8, max_response_len=8, eval_size=8))
    assert np.isfinite(summary["eval/loss"]) and summary["skipped_steps"] == 0
    assert _trainable_dtypes(tmp_path) == {np.dtype(np.float32)}
