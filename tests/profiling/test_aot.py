"""Ahead-of-time compilation for Cloud TPU slices on this CPU-only machine (needs the libtpu wheel)."""

import importlib.util
import math

import jax
import jax.numpy as jnp
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from pe_rlhf.models import ModelConfig, Transformer
from pe_rlhf.profiling import (
    GENERATIONS, TopologyError, aot_memory_report, hbm_bytes_per_device, parse_topology, topology,
)
from pe_rlhf.profiling.measure import compile_step
from pe_rlhf.profiling.step_builders import build_rm_step
from pe_rlhf.sharding import MeshConfig, batch_shardings, make_mesh, state_shardings

pytestmark = pytest.mark.slow  # every test compiles ahead of time for a TPU topology

GIB = 1 << 30
F32 = 4
needs_libtpu = pytest.mark.skipif(
    importlib.util.find_spec("libtpu") is None,
    reason=f'libtpu is not installed; AOT TPU compilation needs: pip install "jax[tpu]=={jax.__version__}"',
)


def _refuse(*args):
    raise AssertionError("the topology name must be checked before anything is traced")


@pytest.mark.parametrize("name, needle", [
    ("v3:2x2", "unknown TPU topology 'v3:2x2'.*supported generations: v4, v5e, v5p, v6e"),
    ("v5e-4", "unknown TPU topology 'v5e-4'"),
    ("v5e:2x2x1", "v5e slices have 2 positive dimensions"),
    ("v4:2x2", "v4 slices have 3 positive dimensions"),
])
def test_unknown_topology_fails_before_compiling(name, needle):
    with pytest.raises(TopologyError, match=needle):
        aot_memory_report(_refuse, (jax.ShapeDtypeStruct((4,), jnp.float32),), name)


def test_parse_and_hbm_table():
    assert parse_topology("v5p:2x2x1") == ("v5p", (2, 2, 1))
    assert set(GENERATIONS) == {"v4", "v5e", "v5p", "v6e"}
    assert hbm_bytes_per_device("v4:2x2x1") == 32 * GIB
    assert hbm_bytes_per_device("v5e:2x2") == 16 * GIB
    assert hbm_bytes_per_device("v5p:2x2x2") == 95 * GIB
    assert hbm_bytes_per_device("v6e:4x4") == 32 * GIB


@needs_libtpu
@pytest.mark.parametrize("name, kind, devices, hbm_gib", [
    ("v5e:2x2", "TPU v5 lite", 4, 16), ("v6e:2x4", "TPU v6 lite", 8, 32),
    ("v4:2x2x1", "TPU v4", 4, 32), ("v5p:2x2x1", "TPU v5", 4, 95),
])
def test_topology_devices(name, kind, devices, hbm_gib):
    topo = topology(name)
    assert len(topo.devices) == devices  # v4 / v5p as megacore: one device per chip
    assert {d.device_kind for d in topo.devices} == {kind}
    assert topo.hbm_bytes_per_device == hbm_gib * GIB


@needs_libtpu
def test_matmul_peak_on_v5e_matches_hand_count_and_grows_with_batch():
    def f(x, w):
        return jnp.tanh(x @ w)

    def shardings(mesh):  # x split over the 4 chips, w replicated
        return NamedSharding(mesh, P(("data", "fsdp"))), NamedSharding(mesh, P())

    w = jax.ShapeDtypeStruct((256, 512), jnp.float32)
    peaks = []
    for batch in (32, 256):
        x = jax.ShapeDtypeStruct((batch, 256), jnp.float32)
        report = aot_memory_report(f, (x, w), "v5e:2x2", in_shardings=shardings)
        assert report.mesh_shape == {"data": 4, "fsdp": 1, "tensor": 1}
        assert report.memory.argument_bytes == (batch // 4 * 256 + 256 * 512) * F32
        assert report.memory.output_bytes == batch // 4 * 512 * F32
        assert report.fits and report.hbm_bytes_per_device == 16 * GIB
        peaks.append(report.peak_bytes)
    assert peaks[1] > peaks[0]
    assert peaks[1] - peaks[0] >= (256 - 32) // 4 * (256 + 512) * F32  # the growth of x and of the output


@needs_libtpu
def test_sharded_transformer_forward_on_v5e():
    cfg = ModelConfig(vocab_size=512, hidden_size=128, intermediate_size=256, num_layers=1, num_heads=4,
                      num_kv_heads=2, head_dim=32)
    graphdef, abs_state = nnx.split(nnx.eval_shape(lambda: Transformer(cfg)))
    mesh_config = MeshConfig(data=2, tensor=2)

    def forward(state, tokens_BxT):
        return nnx.merge(graphdef, state)(tokens_BxT)

    # Per-device parameter bytes, from the shard shapes the rules give on a 2x1x2 mesh.
    mesh = make_mesh(mesh_config, topology("v5e:2x2").devices)
    shard_bytes = sum(math.prod(s.get_value().shard_shape(v.get_value().shape)) * F32
                      for (_, s), (_, v) in zip(nnx.to_flat_state(state_shardings(abs_state, mesh)),
                                                nnx.to_flat_state(abs_state)))
    full_bytes = sum(math.prod(v.get_value().shape) * F32 for _, v in nnx.to_flat_state(abs_state))
    assert shard_bytes < full_bytes

    peaks = []
    for batch in (8, 16):
        tokens = jax.ShapeDtypeStruct((batch, 128), jnp.int32)  # 128: no TPU tile padding
        with jax.default_matmul_precision("default"):  # as a TPU run would; conftest's "highest" compiles slowly
            report = aot_memory_report(
                forward, (abs_state, tokens), "v5e:2x2", mesh_config=mesh_config,
                in_shardings=lambda mesh: (state_shardings(abs_state, mesh), batch_shardings(tokens, mesh)),
                out_shardings=lambda mesh: NamedSharding(mesh, P("data", None, "tensor")),
            )
        assert report.memory.argument_bytes == shard_bytes + batch // 2 * 128 * 4  # int32 tokens split over data
        assert report.memory.output_bytes == batch // 2 * 128 * (512 // 2) * F32  # logits: batch / 2, vocab / 2
        peaks.append(report.peak_bytes)
    assert peaks[1] > peaks[0]


@needs_libtpu
def test_program_larger_than_hbm_does_not_fit():
    huge = jax.ShapeDtypeStruct((5 * GIB // 1024, 1024), jnp.float32)  # 20 GiB replicated on 16 GiB chips
    report = aot_memory_report(lambda x: x * 2, (huge,), "v5e:2x2")
    assert not report.fits and report.memory is None
    assert "RESOURCE_EXHAUSTED" in report.compiler_error
    assert "does not fit" in str(report)


@needs_libtpu
def test_reward_model_step_with_the_splash_kernel_on_v5e():
    """The Mosaic splash kernel compiles for TPU inside a sharded RM step and needs less HBM than XLA's.

    At 2,048 tokens: with the rows split over the chips (the activation rules), XLA's attention at 1,024
    tokens needed less than the kernel at this model's size (8.8 against 10.0 MB of temporaries).
    """
    cfg = ModelConfig(vocab_size=1024, hidden_size=256, intermediate_size=512, num_layers=2, num_heads=4,
                      num_kv_heads=2, head_dim=64)
    peaks = {}
    for impl in ("xla", "mosaic_tpu"):
        with jax.default_matmul_precision("default"):
            compiled = compile_step(build_rm_step(cfg.replace(attention_impl=impl), pairs=4, seq_len=2048),
                                    topology="v5e:2x2")
        assert ("tpu_custom_call" in compiled.as_text()) == (impl == "mosaic_tpu")
        peaks[impl] = compiled.memory_analysis().temp_size_in_bytes
    assert peaks["mosaic_tpu"] < peaks["xla"]


@needs_libtpu
def test_packed_reward_step_runs_the_splash_kernel_only_without_a_shared_prompt():
    """A packed RM batch whose pairs repeat their prompt (`DataConfig.pack_share_prompt=False`) is plain causal
    segments: the splash kernel takes it. With a shared prompt the step keeps the XLA path. The abstract batch
    is the one `data.packing.pack` makes, key for key and shape for shape."""
    from pe_rlhf.data import TokenizedPair
    from pe_rlhf.data import packing
    from pe_rlhf.profiling.step_builders import build_packed_rm_step

    cfg = ModelConfig(vocab_size=1024, hidden_size=256, intermediate_size=512, num_layers=2, num_heads=4,
                      num_kv_heads=2, head_dim=64, attention_impl="mosaic_tpu")
    pair = TokenizedPair([5] * 200, [6] * 50, [7] * 40)
    for share in (True, False):
        spec = build_packed_rm_step(cfg, rows=4, length=1024, pairs_per_row=3, span=packing.span(200, 56, 2, share),
                                    share_prompt=share)
        real = packing.pack([pair] * 4, packing.PackOptions(rows=4, length=1024, items_per_row=3, share_prompt=share))
        assert {k: (v.shape, v.dtype) for k, v in spec.args[3].items()} == {k: (v.shape, v.dtype)
                                                                          for k, v in real.items()}
        with jax.default_matmul_precision("default"):
            compiled = compile_step(spec, topology="v5e:2x2")
        assert ("tpu_custom_call" in compiled.as_text()) == (not share), share
