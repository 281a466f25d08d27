"""Abstract step builders: shapes against real states, compiled argument bytes against a hand count,
LoRA below full, PE-ReMax below full PPO, memory growing with batch (tiny configs, CPU)."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from pe_rlhf.models import lora
from pe_rlhf.models.heads import RewardModel
from pe_rlhf.models.tiny import tiny_config
from pe_rlhf.models.transformer import Transformer
from pe_rlhf.profiling.measure import concrete_args, measure_step, reported_usage
from pe_rlhf.profiling.step_builders import build_rl_step, build_rm_step, tree_bytes
from pe_rlhf.train.config import TuningConfig
from pe_rlhf.train.optim import OptimizerConfig, make_optimizer
from pe_rlhf.train.policy import RLModules

F32, I32 = 4, 4
CFG = tiny_config("llama")  # V=100, D=64, 2 layers, 4 heads, 2 KV heads, head_dim 16, F=128, tied embedding
LORA4 = TuningConfig(mode="lora", lora=lora.LoRAConfig(rank=4, alpha=8.0))
FULL = TuningConfig(mode="full")

# Hand count of the tiny llama's parameters.
PER_LAYER = (64 * 64 + 2 * 64 * 32 + 64 * 64  # q, k, v, o (4 query heads x 16, 2 KV heads x 16)
             + 3 * 64 * 128  # gate, up, down
             + 2 * 64)  # attn_norm, mlp_norm
BASE_PARAMS = 100 * 64 + 2 * PER_LAYER + 64  # embedding (tied), 2 layers, final_norm
LORA4_PARAMS = 2 * ((64 * 4 + 4 * 64) + 2 * (64 * 4 + 4 * 32) + (64 * 4 + 4 * 64))  # a [in,4] + b [4,out] on q,k,v,o
HEAD_PARAMS = 64 + 1


@functools.cache
def report(kind: str, pairs: int = 2):
    """Compiled reports, cached across tests (each compile costs seconds on the shared CPU)."""
    if kind == "rm-lora":
        return measure_step(build_rm_step(CFG, LORA4, pairs=pairs, seq_len=16), time_iters=2 if pairs == 2 else 0)
    if kind == "rm-full":
        return measure_step(build_rm_step(CFG, FULL, pairs=pairs, seq_len=16))
    if kind == "remax-lora":
        return measure_step(build_rl_step(CFG, LORA4, algorithm="remax", prompts=pairs, prompt_len=8, new_tokens=4))
    if kind == "ppo-full":
        return measure_step(build_rl_step(CFG, FULL, algorithm="ppo", prompts=pairs, prompt_len=8, new_tokens=4,
                                          ppo_epochs=2))
    raise KeyError(kind)


def _shapes(tree):
    return jax.tree.map(lambda x: (tuple(x.shape), jnp.dtype(x.dtype)), tree)


def test_abstract_rm_args_match_real_states():
    spec = build_rm_step(CFG, LORA4, pairs=2, seq_len=16)
    backbone = Transformer(CFG, rngs=nnx.Rngs(1))
    lora.add_lora(backbone, "reward", lora.LoRAConfig(rank=4, alpha=8.0, targets="attention"))
    rm = RewardModel(backbone, adapters=("reward",))
    _, trainable, frozen = nnx.split(rm, nnx.Any(lora.adapter_filter("reward"), nnx.PathContains("head")), ...)
    opt_state = make_optimizer(OptimizerConfig(), num_steps=1).init(trainable)
    abs_trainable, abs_opt, abs_frozen, batch = spec.args
    assert _shapes(abs_trainable) == _shapes(trainable)
    assert _shapes(abs_frozen) == _shapes(frozen)
    assert _shapes(abs_opt) == _shapes(opt_state)
    assert batch["chosen_tokens_BxT"].shape == (2, 16) and batch["rejected_mask_BxT"].dtype == jnp.int32
    assert tree_bytes(trainable) == (LORA4_PARAMS + HEAD_PARAMS) * F32 == 14596
    assert tree_bytes(frozen) == BASE_PARAMS * F32 == 321792


@pytest.mark.parametrize("mode", ["lora", "full"])
def test_abstract_ppo_args_match_real_states(mode):
    spec = build_rl_step(CFG, LORA4 if mode == "lora" else FULL, algorithm="ppo", prompts=2, prompt_len=8,
                         new_tokens=4)
    if mode == "lora":  # one backbone: policy, reward, value adapters; value head trains, reward head is frozen
        backbone = Transformer(CFG, rngs=nnx.Rngs(1))
        for name in ("policy", "reward", "value"):
            lora.add_lora(backbone, name, lora.LoRAConfig(rank=4, alpha=8.0))
        modules = RLModules(backbone, reward=RewardModel(backbone, adapters=("reward",)),
                            value=RewardModel(backbone, adapters=("value",)))
        train = nnx.Any(lora.adapter_filter("policy", "value"), nnx.All(nnx.PathContains("value"),
                                                                         nnx.PathContains("head")))
    else:  # four models: tuned policy and value, frozen anchor and reward model
        modules = RLModules(Transformer(CFG), policy_adapters=(), anchor=Transformer(CFG),
                            reward=RewardModel(Transformer(CFG)), value=RewardModel(Transformer(CFG)))
        train = lambda path, v: isinstance(v, nnx.Param) and path[0] in ("policy", "value")
    _, trainable, frozen = nnx.split(modules, train, ...)
    abs_trainable, abs_opt, abs_frozen, rl_state, batch, rng = spec.args
    assert _shapes(abs_trainable) == _shapes(trainable)
    assert _shapes(abs_frozen) == _shapes(frozen)
    assert _shapes(abs_opt) == _shapes(make_optimizer(OptimizerConfig(), num_steps=1).init(trainable))
    assert batch["prompt_BxT"].shape == (2, 8) and rl_state["baseline"].shape == ()
    if mode == "lora":  # policy + value adapters and the value head; the backbone and reward head frozen
        assert tree_bytes(trainable) == (2 * LORA4_PARAMS + HEAD_PARAMS) * F32
        assert tree_bytes(frozen) == (BASE_PARAMS + LORA4_PARAMS + HEAD_PARAMS) * F32
    else:
        assert tree_bytes(trainable) == (2 * BASE_PARAMS + HEAD_PARAMS) * F32
        assert tree_bytes(frozen) == (2 * BASE_PARAMS + HEAD_PARAMS) * F32


@pytest.mark.parametrize("kind, trainable_params, frozen_params", [
    ("rm-lora", LORA4_PARAMS + HEAD_PARAMS, BASE_PARAMS),
    ("rm-full", BASE_PARAMS + HEAD_PARAMS, 0),
])
def test_compiled_rm_argument_bytes_match_hand_count(kind, trainable_params, frozen_params):
    r = report(kind)
    trainable = trainable_params * F32
    opt_state = 2 * trainable + I32 + I32  # Adam mu, nu and count; the schedule's step count
    batch = 4 * 2 * 16 * I32  # chosen/rejected tokens and masks, 2 pairs x 16 tokens
    assert r.arg_bytes == {"trainable": trainable, "opt_state": opt_state, "frozen": frozen_params * F32,
                           "batch": batch}
    assert r.memory.argument_bytes == trainable + opt_state + frozen_params * F32 + batch
    assert r.memory.alias_bytes == trainable + opt_state  # donated: the new state reuses their buffers
    assert r.peak_bytes == (r.memory.argument_bytes + r.memory.output_bytes + r.memory.temp_bytes
                            - r.memory.alias_bytes)


def test_lora_rm_peak_is_below_full_and_the_step_was_timed():
    lora_r, full_r = report("rm-lora"), report("rm-full")
    assert lora_r.peak_bytes < full_r.peak_bytes
    # full fine-tuning holds the weights and two Adam moments of every parameter (3x the base bytes), LoRA
    # the frozen base once plus 3x the adapter + head bytes: at least 2x the base bytes apart
    assert full_r.peak_bytes - lora_r.peak_bytes >= 2 * BASE_PARAMS * F32 - 3 * (LORA4_PARAMS + HEAD_PARAMS) * F32
    assert lora_r.median_step_s is not None and 0 < lora_r.median_step_s < 5


def test_pe_remax_peak_is_below_full_ppo():
    pe, full = report("remax-lora"), report("ppo-full")
    assert pe.memory.argument_bytes < full.memory.argument_bytes / 3  # one backbone against four models
    assert pe.peak_bytes < full.peak_bytes
    # the estimates the benchmark quotes: ReMax samples 2 rows per prompt (sampled + greedy)
    assert pe.estimates["response_logits"] == 2 * 2 * 4 * 100 * F32
    assert full.estimates["response_logits"] == 2 * 4 * 100 * F32
    assert pe.estimates["kv_cache"] == 2 * 2 * 4 * (8 + 4) * 2 * 16 * F32


def test_memory_grows_with_batch():
    small, large = report("rm-lora", 2), report("rm-lora", 8)
    assert large.memory.argument_bytes - small.memory.argument_bytes == 4 * (8 - 2) * 16 * I32
    assert large.peak_bytes > small.peak_bytes
    assert large.memory.temp_bytes > small.memory.temp_bytes


def test_reported_usage_and_bad_options():
    assert reported_usage("RESOURCE_EXHAUSTED: Ran out of memory in memory space hbm. Used 20.5G of "
                          "15.75G hbm. Exceeded hbm capacity by 4.75G.") == int(20.5 * 2**30)
    assert reported_usage("Used 512.0M of 15.75G hbm") == 512 * 2**20
    assert reported_usage("RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO "
                          "temporaries (16.24G) exceeds available HBM (15.75G).") == int(16.24 * 2**30)
    assert reported_usage("some other error") is None
    with pytest.raises(ValueError, match="frozen_dtype='float16'; choose float32 or bfloat16"):
        build_rm_step(CFG, LORA4, pairs=1, seq_len=4, frozen_dtype="float16")
    with pytest.raises(ValueError, match="algorithm='grpo'; choose one of reinforce, remax, ppo"):
        build_rl_step(CFG, algorithm="grpo", prompts=1, prompt_len=4, new_tokens=2)


def test_remat_blocks_compute_the_same_update():
    plain = build_rm_step(CFG, LORA4, pairs=2, seq_len=16)
    remat = build_rm_step(CFG, dataclasses.replace(LORA4, remat=True), pairs=2, seq_len=16)
    assert remat.name == "rm/lora-r4-remat" and _shapes(remat.args) == _shapes(plain.args)
    args = concrete_args(plain, seed=3)
    (tr_a, _, m_a), (tr_b, _, m_b) = jax.jit(plain.fn)(*args), jax.jit(remat.fn)(*args)
    assert float(m_a["loss"]) == pytest.approx(float(m_b["loss"]), rel=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), tr_a, tr_b)
