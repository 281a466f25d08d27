"""Mesh and logical-axis rules on 8 simulated CPU devices (tests/conftest.py)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from pe_rlhf.models import ModelConfig, Transformer
from pe_rlhf.sharding import (
    DEFAULT_RULES,
    MeshConfig,
    MeshError,
    ShardingFallbackWarning,
    ShardingRuleError,
    batch_shardings,
    cache_shardings,
    logical_to_spec,
    make_mesh,
    shard_state,
    state_shardings,
)

# Tiny Llama-style model: D=64, F=128, V=256, N=4, K=2, H=16 (q 64 wide, kv 32 wide).
CFG = ModelConfig()
# (data, fsdp, tensor)
MESHES = {"data": MeshConfig(data=8), "fsdp": MeshConfig(data=1, fsdp=8), "tensor": MeshConfig(data=2, tensor=4),
          "mixed": MeshConfig(data=2, fsdp=2, tensor=2)}


@pytest.fixture(scope="module")
def model_and_logits():
    model = Transformer(CFG, rngs=nnx.Rngs(1))
    tokens_BxT = jax.random.randint(jax.random.key(0), (8, 12), 0, CFG.vocab_size)
    mask_BxT = jnp.arange(12)[None, :] >= jnp.array([0, 3, 0, 5, 1, 0, 2, 0])[:, None]  # left padding
    graphdef, state = nnx.split(model)
    forward = jax.jit(lambda state, t, m: nnx.merge(graphdef, state)(t, input_mask_BxT=m))
    return model, tokens_BxT, mask_BxT, forward(state, tokens_BxT, mask_BxT)


# -- the mesh -------------------------------------------------------------------------


def test_mesh_sizes_and_axes():
    assert jax.device_count() == 8
    assert dict(make_mesh().shape) == {"data": 8, "fsdp": 1, "tensor": 1}
    assert dict(make_mesh(MeshConfig(data=2, fsdp=-1, tensor=2)).shape) == {"data": 2, "fsdp": 2, "tensor": 2}
    mesh = make_mesh(MeshConfig(data=1, fsdp=2, tensor=4))
    assert mesh.axis_names == ("data", "fsdp", "tensor")
    assert mesh.devices.shape == (1, 2, 4)
    assert sorted(d.id for d in mesh.devices.flat) == list(range(8))


@pytest.mark.parametrize("config, needle", [
    (MeshConfig(data=3), "multiply to 3 but there are 8 devices"),
    (MeshConfig(data=-1, tensor=3), "multiply to 3, which does not divide the 8 devices"),
])
def test_mesh_that_does_not_fit_the_devices_is_a_clear_error(config, needle):
    with pytest.raises(MeshError, match=needle):
        make_mesh(config)


@pytest.mark.parametrize("sizes, message", [
    (dict(data=-1, fsdp=-1),
     "MeshConfig(data=-1, fsdp=-1, tensor=1): at most one axis may be -1 (the rest), got data, fsdp"),
    (dict(data=0), "MeshConfig.data=0: expected an integer >= 1 or -1"),
    (dict(tensor=2.0), "MeshConfig.tensor=2.0: expected an integer >= 1 or -1"),
])
def test_mesh_config_with_impossible_sizes_fails_when_built(sizes, message):
    with pytest.raises(MeshError) as e:
        MeshConfig(**sizes)
    assert str(e.value) == message


# -- rules ------------------------------------------------------------------------------


def test_logical_to_spec_default_rules():
    assert logical_to_spec(("embed", "heads")) == P("fsdp", "tensor")
    assert logical_to_spec(("mlp", "embed")) == P("tensor", "fsdp")
    assert logical_to_spec(("vocab", "embed")) == P("tensor", "fsdp")
    assert logical_to_spec(("head_dim",)) == P(None)
    assert logical_to_spec(("embed", "lora_rank")) == P("fsdp", None)
    # 'fsdp' is taken by the batch, so the activation's embed dimension stays whole.
    assert logical_to_spec(("batch", "seq", "embed")) == P(("data", "fsdp"), None, None)
    assert logical_to_spec(("batch", "cache_seq", "kv", "head_dim")) == P(("data", "fsdp"), None, "tensor", None)


def test_repeated_rule_takes_first_free_mesh_axis():
    rules = (("a", "tensor"), ("b", "tensor"), ("b", "fsdp"), ("c", "tensor"))
    assert logical_to_spec(("a", "b"), rules) == P("tensor", "fsdp")
    assert logical_to_spec(("b", "a"), rules) == P("tensor", None)  # a's only entry collides
    assert logical_to_spec(("c", None), rules) == P("tensor", None)


def test_missing_rule_names_parameter_path_and_axis():
    mesh = make_mesh(MeshConfig(data=8))
    state = nnx.state(nnx.eval_shape(lambda: Transformer(CFG)))
    rules = [r for r in DEFAULT_RULES if r[0] != "kv"]
    with pytest.raises(ShardingRuleError, match=r"parameter layers\.0\.attn\.k_proj\.kernel: logical axis 'kv'"):
        state_shardings(state, mesh, rules)


def test_variable_without_logical_axes_is_an_error():
    class Bare(nnx.Module):
        def __init__(self):
            self.w = nnx.Param(jnp.zeros((4, 2)))
            self.step = nnx.Variable(jnp.zeros((), jnp.int32))  # scalars need no axes

    with pytest.raises(ShardingRuleError, match=r"parameter w \(Param, shape \(4, 2\)\) has no logical_axes"):
        state_shardings(nnx.state(Bare()), make_mesh(), DEFAULT_RULES)


def test_non_divisible_dimension_is_replicated_with_warning():
    cfg = CFG.replace(num_heads=3, num_kv_heads=1, head_dim=6)  # q 18 wide, kv 6 wide: not / 4
    mesh = make_mesh(MeshConfig(data=1, fsdp=2, tensor=4))
    state = nnx.state(nnx.eval_shape(lambda: Transformer(cfg)))
    with pytest.warns(ShardingFallbackWarning) as caught:
        shardings = state_shardings(state, mesh)
    messages = [str(w.message) for w in caught]
    assert "parameter layers.0.attn.q_proj.kernel: dimension 1 (size 18) is not divisible by mesh axes ('tensor',) " \
           "(4 devices); replicating that dimension" in messages
    # q, k, v (dim 1) and o (dim 0) in each of 2 layers: 8 fallbacks, nothing else.
    assert len(messages) == 8
    flat = dict(nnx.to_flat_state(shardings))
    assert flat[("layers", 0, "attn", "q_proj", "kernel")].get_value().spec == P("fsdp", None)
    assert flat[("layers", 0, "attn", "o_proj", "kernel")].get_value().spec == P(None, "fsdp")
    assert flat[("layers", 0, "mlp", "up_proj", "kernel")].get_value().spec == P("fsdp", "tensor")


def test_batch_shardings_and_indivisible_batch():
    mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    batch = {"tokens": jnp.zeros((8, 5), jnp.int32), "reward": jnp.zeros((8,)), "step": jnp.zeros(())}
    out = batch_shardings(batch, mesh)
    assert out["tokens"].spec == P(("data", "fsdp"), None)
    assert out["reward"].spec == P(("data", "fsdp"))
    assert out["step"].spec == P()
    placed = jax.device_put(batch["tokens"], out["tokens"])
    assert placed.sharding.shard_shape(placed.shape) == (2, 5)  # 8 rows over data x fsdp = 4
    with pytest.raises(ShardingRuleError, match=r"batch\['tokens'\]: batch dimension 6 is not divisible by the 4"):
        batch_shardings({"tokens": jnp.zeros((6, 5))}, mesh)


# -- a real model on the mesh ------------------------------------------------------------

# The mesh axes each parameter must carry and its global shape; shard shapes follow from the mesh.
EXPECTED = {
    # path: (mesh axes, global shape)
    "embedding": (("tensor", "fsdp"), (256, 64)),
    "layers.0.attn.q_proj.kernel": (("fsdp", "tensor"), (64, 64)),
    "layers.1.attn.k_proj.kernel": (("fsdp", "tensor"), (64, 32)),
    "layers.0.attn.o_proj.kernel": (("tensor", "fsdp"), (64, 64)),
    "layers.1.mlp.down_proj.kernel": (("tensor", "fsdp"), (128, 64)),
    "lm_head.kernel": (("fsdp", "tensor"), (64, 256)),
    "final_norm.scale": (("fsdp",), (64,)),
}


@pytest.mark.parametrize("name", list(MESHES))
def test_params_sharded_as_rules_say_and_forward_matches(name, model_and_logits):
    model, tokens_BxT, mask_BxT, want_BxTxV = model_and_logits
    mesh = make_mesh(MESHES[name])
    graphdef, state = nnx.split(model)
    shardings = state_shardings(state, mesh)
    sharded = shard_state(state, shardings)

    arrays = {".".join(map(str, p)): v.get_value() for p, v in nnx.to_flat_state(sharded)}
    for path, (mesh_axes, shape) in EXPECTED.items():
        arr = arrays[path]
        assert arr.sharding.spec == P(*mesh_axes), path
        want_shard = tuple(n // mesh.shape[a] for n, a in zip(shape, mesh_axes))
        assert arr.sharding.shard_shape(arr.shape) == want_shard, path
        assert arr.addressable_shards[0].data.shape == want_shard, path
        np.testing.assert_array_equal(np.asarray(arr), np.asarray(arrays_unsharded(state)[path]))

    batch_sh = batch_shardings(tokens_BxT, mesh)
    logits_sh = NamedSharding(mesh, logical_to_spec(("batch", "seq", "vocab")))

    def forward(state, tokens_BxT, mask_BxT):
        return nnx.merge(graphdef, state)(tokens_BxT, input_mask_BxT=mask_BxT)

    fwd = jax.jit(forward, in_shardings=(shardings, batch_sh, batch_sh), out_shardings=logits_sh)
    got_BxTxV = fwd(sharded, tokens_BxT, mask_BxT)
    assert got_BxTxV.sharding.spec == logits_sh.spec
    np.testing.assert_allclose(np.asarray(got_BxTxV), np.asarray(want_BxTxV), atol=1e-5, rtol=1e-5)


def arrays_unsharded(state):
    return {".".join(map(str, p)): v.get_value() for p, v in nnx.to_flat_state(state)}


def prefill_fn(graphdef):
    def prefill(state, tokens_BxT, mask_BxT, cache):
        return nnx.merge(graphdef, state).decode(tokens_BxT, cache, input_mask_BxT=mask_BxT)

    return prefill


def test_sharded_kv_cache_decode_matches(model_and_logits):
    model, tokens_BxT, mask_BxT, _ = model_and_logits
    mesh = make_mesh(MESHES["mixed"])
    graphdef, state = nnx.split(model)
    shardings = state_shardings(state, mesh)
    cache = model.init_cache(8, 16)
    want_BxTxV, want_cache = jax.jit(prefill_fn(graphdef))(state, tokens_BxT, mask_BxT, cache)
    cache_sh = cache_shardings(cache, mesh)
    assert cache_sh.k[0].spec == P(("data", "fsdp"), None, "tensor", None)
    assert cache_sh.mask_BxS.spec == P(("data", "fsdp"), None)
    batch_sh = batch_shardings(tokens_BxT, mesh)

    step = jax.jit(prefill_fn(graphdef), in_shardings=(shardings, batch_sh, batch_sh, cache_sh),
                   out_shardings=(NamedSharding(mesh, logical_to_spec(("batch", "seq", "vocab"))), cache_sh))
    logits_BxTxV, new_cache = step(shard_state(state, shardings), tokens_BxT, mask_BxT, jax.device_put(cache, cache_sh))
    assert new_cache.k[1].sharding.shard_shape(new_cache.k[1].shape) == (2, 16, 1, 16)  # B/4, S, K/2, H
    np.testing.assert_allclose(np.asarray(logits_BxTxV), np.asarray(want_BxTxV), atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(new_cache.v[1]), np.asarray(want_cache.v[1]), atol=1e-5, rtol=1e-5)
