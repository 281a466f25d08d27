"""Compiled-memory report against hand counts, runtime stats, trace and pprof output (CPU)."""

import glob
import gzip
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from pe_rlhf.profiling import lower_and_compile, runtime_peak_bytes, save_memory_profile, trace
from pe_rlhf.sharding.memory import MemoryReport, compiled_memory

F32 = 4


def test_matmul_arguments_and_outputs_match_hand_count():
    x = jax.ShapeDtypeStruct((8, 32), jnp.float32)
    w = jax.ShapeDtypeStruct((32, 16), jnp.float32)
    report = compiled_memory(lower_and_compile(lambda x, w: x @ w, x, w))
    assert report.argument_bytes == (8 * 32 + 32 * 16) * F32 == 3072
    assert report.output_bytes == 8 * 16 * F32 == 512
    assert report.alias_bytes == 0
    assert report.peak_bytes == 3072 + 512 + report.temp_bytes
    assert report.as_dict()["peak_bytes"] == report.peak_bytes


def test_donation_shows_as_alias_bytes():
    x = jax.ShapeDtypeStruct((8, 32), jnp.float32)
    w = jax.ShapeDtypeStruct((32, 32), jnp.float32)
    report = compiled_memory(lower_and_compile(lambda x, w: x @ w, x, w, donate_argnums=0))
    assert report.argument_bytes == (8 * 32 + 32 * 32) * F32 == 5120
    assert report.output_bytes == 8 * 32 * F32 == 1024
    assert report.alias_bytes == 1024  # the output reuses x's buffer
    assert report.peak_bytes == 5120 + 1024 + report.temp_bytes - 1024


def test_sharded_arguments_are_counted_per_device():
    mesh = jax.sharding.Mesh(np.array(jax.devices()).reshape(8), ("data",))
    x = jax.ShapeDtypeStruct((64, 32), jnp.float32)
    w = jax.ShapeDtypeStruct((32, 16), jnp.float32)
    compiled = lower_and_compile(lambda x, w: x @ w, x, w,
                                 in_shardings=(NamedSharding(mesh, P("data")), NamedSharding(mesh, P())))
    report = compiled_memory(compiled)
    assert report.argument_bytes == (64 // 8 * 32 + 32 * 16) * F32  # one row block of x, all of w
    assert report.output_bytes == 64 // 8 * 16 * F32


def test_lower_and_compile_accepts_jitted_function_but_not_twice_configured():
    f = jax.jit(lambda x: x * 2)
    report = compiled_memory(lower_and_compile(f, jax.ShapeDtypeStruct((5, 3), jnp.float32)))
    assert report.argument_bytes == report.output_bytes == 15 * F32
    with pytest.raises(TypeError, match="already jitted"):
        lower_and_compile(f, jax.ShapeDtypeStruct((5,), jnp.float32), donate_argnums=0)


def test_report_formats_bytes():
    report = MemoryReport(argument_bytes=3 << 30, output_bytes=1 << 20, temp_bytes=512, alias_bytes=1 << 20,
                          generated_code_bytes=2048)
    assert report.peak_bytes == (3 << 30) + 512
    assert str(report).startswith("peak 3.00 GiB per device = arguments 3.00 GiB + outputs 1.0 MiB + temporaries 512 B")


def test_runtime_peak_is_none_on_cpu():
    assert jax.default_backend() == "cpu"
    assert runtime_peak_bytes() is None
    assert runtime_peak_bytes(jax.devices()[0]) is None


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def test_memory_profile_records_a_live_buffer(tmp_path):
    live = jnp.ones((1000, 1000), jnp.float32)  # 4,000,000 bytes
    live.block_until_ready()
    path = save_memory_profile(str(tmp_path / "prof"))
    raw = open(path, "rb").read()
    assert raw[:2] == b"\x1f\x8b"  # gzipped pprof
    profile = gzip.decompress(raw)
    # pprof Sample.value is packed [count, bytes]: one buffer of 4,000,000 bytes.
    assert b"\x12\x05\x01" + _varint(4_000_000) in profile
    del live


def test_trace_writes_an_xplane(tmp_path):
    with trace(str(tmp_path)) as log_dir:
        jnp.arange(10.0).sum().block_until_ready()
    files = glob.glob(os.path.join(log_dir, "plugins", "profile", "*", "*.xplane.pb"))
    assert len(files) == 1 and os.path.getsize(files[0]) > 0
