"""Train steps on a mesh of 8 simulated CPU devices (tests/conftest.py): the reward-model step and the
ReMax step give the numbers they give on one device, and every array sits where the rules put it."""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from pe_rlhf.models import Transformer, lora
from pe_rlhf.models.heads import RewardModel
from pe_rlhf.models.tiny import tiny_config
from pe_rlhf.sharding import DEFAULT_RULES, MeshConfig, MeshError, ShardingRuleError
from pe_rlhf.train import supervised_steps
from pe_rlhf.train.optim import OptimizerConfig, make_optimizer
from pe_rlhf.train.policy import RLConfig, RLModules, rl_step
from pe_rlhf.train.sharded import sharded_rl_step, sharded_train_step

# D=64, F=128, V=128, N=4 heads, K=2 kv heads, H=16, one layer: q 64 wide, kv 32 wide, all divisible by 4 and 8.
CFG = tiny_config("llama", vocab_size=128, num_layers=1)
# Adam's first steps move each weight by about lr * g / |g|: a gradient element near zero turns float noise
# of the sharded reductions into up to lr * 1e-4 of difference. lr 1e-3 keeps that within atol 1e-6; the
# gradients themselves are compared through Adam's mu, to rtol 1e-5.
LR = 1e-3
# The centering term gives the head's bias a real gradient (Bradley-Terry alone cancels it to float noise).
RM_LOSS = functools.partial(supervised_steps.pairwise_reward_loss, center_coef=0.01)
MESHES = {"data": MeshConfig(data=8), "fsdp": MeshConfig(data=2, fsdp=4),
          "tensor": MeshConfig(data=1, fsdp=2, tensor=4)}
LORA = lora.LoRAConfig(rank=8, alpha=16.0, targets="all_linear")
RM_TRAINABLE = nnx.Any(lora.adapter_filter("reward"), nnx.PathContains("head"))

# Shard shape of each parameter per mesh (data, fsdp=(2,4,1), tensor=(1,2,4)), by hand from its logical axes:
# embed -> fsdp, heads/kv/mlp/vocab -> tensor, lora_rank -> replicated.
RM_EXPECTED = {
    # path: (spec, {mesh: shard shape})
    "backbone.embedding": (P("tensor", "fsdp"), {"data": (128, 64), "fsdp": (128, 16), "tensor": (32, 32)}),
    "backbone.layers.0.attn.q_proj.kernel": (P("fsdp", "tensor"),
                                             {"data": (64, 64), "fsdp": (16, 64), "tensor": (32, 16)}),
    "backbone.layers.0.mlp.down_proj.kernel": (P("tensor", "fsdp"),
                                               {"data": (128, 64), "fsdp": (128, 16), "tensor": (32, 32)}),
    "backbone.layers.0.attn.q_proj.lora.reward.a": (P("fsdp", None),
                                                    {"data": (64, 8), "fsdp": (16, 8), "tensor": (32, 8)}),
    "backbone.layers.0.attn.k_proj.lora.reward.b": (P(None, "tensor"),
                                                    {"data": (8, 32), "fsdp": (8, 32), "tensor": (8, 8)}),
    "backbone.layers.0.mlp.down_proj.lora.reward.a": (P("tensor", None),
                                                      {"data": (128, 8), "fsdp": (128, 8), "tensor": (32, 8)}),
    "head.kernel": (P("fsdp"), {"data": (64,), "fsdp": (16,), "tensor": (32,)}),
    "head.bias": (P(), {"data": (), "fsdp": (), "tensor": ()}),
}
# Global batch rows each device holds: 8 rows over data x fsdp.
ROWS_PER_DEVICE = {"data": 1, "fsdp": 1, "tensor": 4}


def flat(state) -> dict:
    return {".".join(map(str, p)): v.get_value() for p, v in nnx.to_flat_state(state)}


def moments(opt_state, name: str) -> dict:
    """{parameter path: array} of Adam's `mu` or `nu` in an Optax state over an nnx.State."""
    out = {}
    for path, x in jax.tree_util.tree_flatten_with_path(opt_state)[0]:
        keys = [str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path]
        if name in keys:
            out[".".join(keys[keys.index(name) + 1:-1] if keys[-1] == "value" else keys[keys.index(name) + 1:])] = x
    return out


def built(module_fn, trainable_filter, seed: int, trainable_std: float):
    """(graphdef, trainable, frozen) of `module_fn()` with NumPy weights: the backbone N(0, 0.2^2) with unit
    norm scales (as tiny_config), every trainable leaf N(0, trainable_std^2) so that one step moves all of
    them and the policy differs from its anchor. (Eager JAX init costs seconds on a shared CPU.)"""
    graphdef, trainable, frozen = nnx.split(nnx.eval_shape(module_fn), trainable_filter, ...)
    rng = np.random.default_rng(seed)
    draw = lambda std: lambda x: (std * rng.standard_normal(x.shape)).astype(x.dtype)
    frozen = jax.tree.map(lambda x: np.ones(x.shape, x.dtype) if len(x.shape) == 1 else draw(0.2)(x), frozen)
    return graphdef, jax.tree.map(draw(trainable_std), trainable), frozen


def host(tree):
    """NumPy copies: the sharded steps donate their inputs, the references must not see that."""
    return jax.tree.map(np.array, tree)


def assert_close(got, want, what, rtol=1e-5, atol=1e-6):
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=rtol, atol=atol, err_msg=what)


def assert_moment_close(got, want, what, rtol=1e-5):
    """Gradient-like arrays: each element to rtol of the array's largest (sums of many terms, reordered)."""
    want = np.asarray(want)
    assert np.abs(want).max() > 0, what
    np.testing.assert_allclose(np.asarray(got), want, rtol=rtol, atol=rtol * np.abs(want).max(), err_msg=what)


# -- the reward-model step ------------------------------------------------------------------------


def reward_model():
    backbone = Transformer(CFG)
    lora.add_lora(backbone, "reward", LORA)
    return RewardModel(backbone, adapters=("reward",))


@pytest.fixture(scope="module")
def rm_reference():
    """A LoRA reward model, two Bradley-Terry steps on one device, and what the mesh runs need."""
    graphdef, trainable, frozen = built(reward_model, RM_TRAINABLE, seed=0, trainable_std=0.1)
    tx = make_optimizer(OptimizerConfig(learning_rate=LR, schedule="constant"))
    rng = np.random.default_rng(0)
    batches = []
    for _ in range(2):
        ch_len, rj_len = rng.integers(4, 13, size=(2, 8))
        mask = lambda n: (np.arange(12)[None, :] < n[:, None]).astype(np.int32)  # right padding
        batches.append({"chosen_tokens_BxT": rng.integers(4, 100, (8, 12)).astype(np.int32),
                        "rejected_tokens_BxT": rng.integers(4, 100, (8, 12)).astype(np.int32),
                        "chosen_mask_BxT": mask(ch_len), "rejected_mask_BxT": mask(rj_len)})
    step = jax.jit(functools.partial(supervised_steps.train_step, graphdef=graphdef, tx=tx, loss_fn=RM_LOSS))
    tr, opt, losses = trainable, tx.init(trainable), []
    for batch in batches:
        tr, opt, metrics = step(tr, opt, frozen, batch)
        losses.append(float(metrics["loss"]))
    return dict(graphdef=graphdef, trainable=host(trainable), frozen=host(frozen), tx=tx, batches=batches,
                want_losses=losses, want_trainable=host(tr), want_opt=host(opt))


@pytest.mark.parametrize("mesh_name", list(MESHES))
def test_reward_step_on_a_mesh_matches_one_device(mesh_name, rm_reference):
    r = rm_reference
    tx = r["tx"]
    step = sharded_train_step(MESHES[mesh_name], graphdef=r["graphdef"], tx=tx, loss_fn=RM_LOSS,
                              trainable=r["trainable"], opt_state=jax.eval_shape(tx.init, r["trainable"]),
                              frozen=r["frozen"], batch=r["batches"][0])
    tr, _, frozen = step.place(r["trainable"], None, r["frozen"])
    opt = step.init_opt_state(tx, tr)  # created on the mesh
    losses = []
    for batch in r["batches"]:
        tr_in = tr
        tr, opt, metrics = step(tr, opt, frozen, batch)
        losses.append(float(metrics["loss"]))
        assert all(x.is_deleted() for x in jax.tree.leaves(tr_in))  # donated
    assert_close(losses, r["want_losses"], "loss")
    assert r["want_losses"][1] != r["want_losses"][0]
    got, want = flat(tr), flat(r["want_trainable"])
    assert got.keys() == want.keys() and len(got) == 2 * 7 + 2  # a, b on 7 projections; head kernel, bias
    for path in want:
        assert_close(got[path], want[path], path)
        assert np.abs(want[path] - flat(r["trainable"])[path]).max() > 1e-4, path  # every leaf moved
    got_mu, want_mu = moments(opt, "mu"), moments(r["want_opt"], "mu")
    assert got_mu.keys() == want.keys()
    for path in want_mu:
        # the head bias's gradient is a sum of nearly cancelling terms (Bradley-Terry cancels it exactly, the
        # centering term is small), so the reordered sums of a mesh move it by more, relative to itself
        assert_moment_close(got_mu[path], want_mu[path], f"mu {path}", rtol=1e-4 if path == "head.bias" else 1e-5)

    # where everything lives
    mesh = step.mesh
    arrays = {**flat(tr), **flat(frozen)}
    for path, (spec, shards) in RM_EXPECTED.items():
        arr = arrays[path]
        assert arr.sharding.spec == spec, path
        assert arr.addressable_shards[0].data.shape == shards[mesh_name], path
    for path in ("backbone.layers.0.attn.q_proj.lora.reward.a", "head.kernel"):
        mu = got_mu[path]
        assert mu.sharding.spec == RM_EXPECTED[path][0], f"mu {path}"
        assert mu.addressable_shards[0].data.shape == RM_EXPECTED[path][1][mesh_name], f"mu {path}"
    assert metrics["loss"].sharding.spec == P() and metrics["loss"].sharding.mesh.shape == mesh.shape
    assert step.shardings.rest[0]["chosen_tokens_BxT"].shard_shape((8, 12)) == (ROWS_PER_DEVICE[mesh_name], 12)

    # memory at run start: every device holds its shard of each state array
    memory = step.memory()
    total = sum(x.nbytes for x in jax.tree.leaves((r["trainable"], r["want_opt"], r["frozen"])))
    assert memory.total_state_bytes == total
    held = sum(x.addressable_shards[0].data.nbytes for x in jax.tree.leaves((tr, opt, frozen)))
    assert set(memory.state_bytes.values()) == {held} and len(memory.state_bytes) == 8
    if mesh_name == "data":
        assert held == total  # pure data parallelism replicates the state
    else:
        assert held < total / 2
    batch_bytes = sum(x.nbytes for x in r["batches"][0].values()) // (8 // ROWS_PER_DEVICE[mesh_name])
    assert memory.compiled.argument_bytes == held + batch_bytes
    line = str(memory)
    assert "\n" not in line and line.startswith(f"mesh data={mesh.shape['data']} fsdp={mesh.shape['fsdp']}")


# -- the ReMax step -------------------------------------------------------------------------------


def upper_fraction_reward(seen: list):
    """Reward: the fraction of response tokens with ids 4..29; records the tokens the step sampled."""

    def reward_fn(prompt_BxT, prompt_mask_BxT, resp_BxN, resp_mask_BxN):
        jax.debug.callback(lambda t: seen.append(np.asarray(t)), resp_BxN)
        hit = (resp_BxN >= 4) & (resp_BxN < 30) & resp_mask_BxN
        return hit.sum(1) / jnp.maximum(resp_mask_BxN.sum(1), 1)

    return reward_fn


def policy_modules():
    backbone = Transformer(CFG)
    lora.add_lora(backbone, "policy", LORA)
    return RLModules(backbone)


RL_CFG = RLConfig(algorithm="remax", max_new_tokens=8, kl_beta=0.05)


@pytest.fixture(scope="module")
def remax_reference():
    graphdef, trainable, frozen = built(policy_modules, lora.adapter_filter("policy"), seed=2, trainable_std=0.05)
    tx = make_optimizer(OptimizerConfig(learning_rate=LR, schedule="constant"))
    rng = np.random.default_rng(1)
    pad_BxT = np.arange(8)[None, :] < rng.integers(0, 4, size=8)[:, None]  # left padding, 5..8 real tokens
    batch = {"prompt_BxT": np.where(pad_BxT, 0, rng.integers(4, 100, (8, 8))).astype(np.int32),
             "prompt_mask_BxT": (~pad_BxT).astype(np.int32)}
    seen = []
    step = jax.jit(functools.partial(rl_step, graphdef=graphdef, tx=tx, cfg=RL_CFG,
                                     reward_fn=upper_fraction_reward(seen), eos_ids=(1,), pad_id=0))
    tr, opt, state, metrics = trainable, tx.init(trainable), {"baseline": jnp.zeros(())}, []
    for i in range(2):
        tr, opt, state, m = step(tr, opt, frozen, state, batch, jax.random.key(10 + i))
        metrics.append(jax.device_get(m))
    jax.effects_barrier()
    assert len(seen) == 2 and seen[0].shape == (16, 8)  # 8 sampled + 8 greedy rows
    return dict(graphdef=graphdef, trainable=host(trainable), frozen=host(frozen), tx=tx, batch=batch,
                want_tokens=seen, want_metrics=metrics, want_trainable=host(tr), want_opt=host(opt))


REMAX_EXPECTED = {
    "policy.layers.0.mlp.up_proj.kernel": (P("fsdp", "tensor"),
                                           {"data": (64, 128), "fsdp": (16, 128), "tensor": (32, 32)}),
    "policy.layers.0.attn.v_proj.kernel": (P("fsdp", "tensor"),
                                           {"data": (64, 32), "fsdp": (16, 32), "tensor": (32, 8)}),
    "policy.layers.0.attn.o_proj.lora.policy.b": (P(None, "fsdp"),
                                                  {"data": (8, 64), "fsdp": (8, 16), "tensor": (8, 32)}),
    "policy.layers.0.mlp.gate_proj.lora.policy.b": (P(None, "tensor"),
                                                    {"data": (8, 128), "fsdp": (8, 128), "tensor": (8, 32)}),
}


@pytest.mark.parametrize("mesh_name", list(MESHES))
def test_remax_step_on_a_mesh_matches_one_device(mesh_name, remax_reference):
    r = remax_reference
    tx, seen = r["tx"], []
    abstract = lambda tree: jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)
    step = sharded_rl_step(MESHES[mesh_name], graphdef=r["graphdef"], tx=tx, cfg=RL_CFG,
                           trainable=abstract(r["trainable"]), opt_state=jax.eval_shape(tx.init, r["trainable"]),
                           frozen=abstract(r["frozen"]), rl_state={"baseline": jnp.zeros(())}, batch=r["batch"],
                           reward_fn=upper_fraction_reward(seen), eos_ids=(1,), pad_id=0)
    tr, opt, frozen = step.place(r["trainable"], tx.init(r["trainable"]), r["frozen"])
    state, metrics = {"baseline": jnp.zeros(())}, []
    for i in range(2):
        key = jax.device_put(jax.random.key(10 + i), jax.devices()[3])  # committed elsewhere: replicated here
        tr, opt, state, m = step(tr, opt, frozen, state, r["batch"], key)
        metrics.append(jax.device_get(m))
    jax.effects_barrier()
    # the same rollouts first: same key, same tokens, greedy rows included
    assert len(seen) == 2
    for got, want in zip(seen, r["want_tokens"]):
        np.testing.assert_array_equal(got, want)
    for got, want in zip(metrics, r["want_metrics"]):
        for k in ("loss", "reward_mean", "baseline_reward", "kl", "kl_k3", "entropy", "grad_norm"):
            assert_close(got[k], want[k], k)
    assert abs(float(r["want_metrics"][0]["kl"])) > 1e-4 and float(r["want_metrics"][0]["grad_norm"]) > 0
    got, want = flat(tr), flat(r["want_trainable"])
    assert got.keys() == want.keys()
    for path in want:
        assert_close(got[path], want[path], path)
    got_mu, want_mu = moments(opt, "mu"), moments(r["want_opt"], "mu")
    for path in want_mu:
        assert_moment_close(got_mu[path], want_mu[path], f"mu {path}")

    arrays = {**got, **flat(frozen)}
    for path, (spec, shards) in REMAX_EXPECTED.items():
        assert arrays[path].sharding.spec == spec, path
        assert arrays[path].addressable_shards[0].data.shape == shards[mesh_name], path
    mu = got_mu["policy.layers.0.attn.o_proj.lora.policy.b"]
    assert mu.sharding.spec == P(None, "fsdp")
    assert mu.addressable_shards[0].data.shape == REMAX_EXPECTED["policy.layers.0.attn.o_proj.lora.policy.b"][1][
        mesh_name]
    assert state["baseline"].sharding.spec == P()


# -- bad input fails before anything is traced --------------------------------------------------


@pytest.fixture(scope="module")
def abstract_rm():
    graphdef, trainable, frozen = nnx.split(nnx.eval_shape(reward_model), RM_TRAINABLE, ...)
    tx = make_optimizer(OptimizerConfig(), num_steps=100)
    tokens = jax.ShapeDtypeStruct((8, 12), jnp.int32)
    batch = {"chosen_tokens_BxT": tokens, "rejected_tokens_BxT": tokens, "chosen_mask_BxT": tokens,
             "rejected_mask_BxT": tokens}
    return graphdef, trainable, jax.eval_shape(tx.init, trainable), frozen, tx, batch


def never_traced(model, batch):
    raise AssertionError("the step was traced before its inputs were checked")


@pytest.mark.parametrize("change, error, needle", [
    (dict(mesh=MeshConfig(data=3)), MeshError, "multiply to 3 but there are 8 devices"),
    (dict(mesh=MeshConfig(data=-1, tensor=3)), MeshError, "does not divide the 8 devices"),
    (dict(rules=tuple(r for r in DEFAULT_RULES if r[0] != "lora_rank")), ShardingRuleError,
     "parameter backbone.layers.0.attn.k_proj.lora.reward.a: logical axis 'lora_rank' (of axes ('embed', "
     "'lora_rank')) has no sharding rule"),
    (dict(rules=tuple(r for r in DEFAULT_RULES if r[0] != "vocab")), ShardingRuleError,
     "parameter backbone.embedding: logical axis 'vocab'"),
    (dict(pairs=6), ShardingRuleError, "batch dimension 6 is not divisible by the 8 devices"),
])
def test_bad_mesh_rules_or_batch_fail_before_tracing(change, error, needle, abstract_rm):
    graphdef, trainable, opt_state, frozen, tx, batch = abstract_rm
    if "pairs" in change:
        batch = {k: jax.ShapeDtypeStruct((change["pairs"], 12), jnp.int32) for k in batch}
    with pytest.raises(error, match=re.escape(needle)):
        sharded_train_step(change.get("mesh", MeshConfig(data=8)), graphdef=graphdef, tx=tx, loss_fn=never_traced,
                           trainable=trainable, opt_state=opt_state, frozen=frozen, batch=batch,
                           rules=change.get("rules", DEFAULT_RULES))
