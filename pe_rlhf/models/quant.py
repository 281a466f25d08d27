"""A quantised frozen backbone (QLoRA, Dettmers et al. 2023, arXiv 2305.14314): weight-only, dequantised on the fly.

`quantize_projections(model, "nf4")` replaces the kernel of every decoder projection (attention q/k/v/o and
MLP gate/up/down, found by path as `add_lora` finds them) with a `QuantizedKernel` in place. The embedding,
the untied lm_head and the norms keep their dtype. Quantisation and dequantisation are qwix's
(`qwix.quantize`, `qwix.dequantize`, Google's JAX quantisation library); this module only chooses the
layout per format and packs 4-bit codes two to a byte, so that a 4-bit kernel takes half a byte per
weight on every backend (XLA's CPU backend stores a jnp.int4 array one byte per element).

    format  codes                                   scales (absmax, symmetric)              bytes / weight
    int8    int8, round(w / s)                      one fp32 per output column              1 + 4 / in
    int4    int4, round(w / s), two per uint8       one bf16 per block of 64 inputs x 1 col  0.5 + 2 / 64
    nf4     NormalFloat-4 index, two per uint8      as int4                                  0.5 + 2 / 64

(fp32: 4 bytes per weight.) Blocks run along the input axis of the [in, out] kernel, 64 weights each as in
QLoRA (QLoRA's per-block constants are double-quantised to 8 bits; here they are bf16). A projection whose
input size 64 does not divide takes the largest power-of-two block that does (32 for in = 96).

A `QuantizedKernel` reads like the `nnx.Param` it replaces: `kernel[...]` and `kernel.get_value()` give
the dequantised [in, out] kernel in the model dtype, so `Linear`, `LoRALinear` (LoRA and DoRA) and the
merging code run unchanged on it. Its codes and scales are `QuantizedWeight` variables: not `nnx.Param`,
so no trainable filter, gradient or optimizer state ever holds them. Writing into it (`set_value`, i.e.
merging an adapter in place) is an error; `merging.merged_model` and the exports produce dense kernels,
dequantised W plus the adapters' update.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import qwix
from flax import nnx

from pe_rlhf.models.transformer import Linear
from pe_rlhf.sharding.rules import gathered

FORMATS = ("int8", "int4", "nf4")
BLOCK = 64  # QLoRA's block size: weights per 4-bit scale, along the kernel's input axis
_QTYPE = {"int8": jnp.int8, "int4": jnp.int4, "nf4": "nf4"}


class QuantizationError(ValueError):
    """A quantisation request this model or format cannot take."""


class QuantizedWeight(nnx.Variable):
    """Codes or scales of a quantised kernel: frozen state, deliberately not an `nnx.Param`."""


def block_size(in_features: int) -> int:
    """Weights per 4-bit scale: `BLOCK`, or the largest power of two dividing `in_features` when BLOCK does not."""
    return math.gcd(in_features, BLOCK)


def _pack_nibbles(codes_IxO):
    """[in, out] 4-bit codes (0..15 as uint8) -> [in / 2, out] uint8, row 2i in the low nibble, 2i + 1 in the high."""
    pairs = codes_IxO.reshape(codes_IxO.shape[0] // 2, 2, codes_IxO.shape[1])
    return pairs[:, 0] | (pairs[:, 1] << 4)


def _unpack_nibbles(packed):
    """Inverse of `_pack_nibbles`: [in / 2, out] uint8 -> [in, out] codes 0..15 (uint8)."""
    return jnp.stack([packed & 0xF, packed >> 4], axis=1).reshape(packed.shape[0] * 2, packed.shape[1])


def quantize_kernel(w_IxO, fmt: str) -> tuple[jax.Array, jax.Array]:
    """(stored codes, scales) of an [in, out] kernel in format `fmt` (see the module docstring)."""
    if fmt not in FORMATS:
        raise QuantizationError(f"quantize format {fmt!r}: expected one of {', '.join(FORMATS)}")
    w = jnp.asarray(w_IxO, jnp.float32)
    if fmt == "int8":
        q = qwix.quantize(w, jnp.int8, channelwise_axes=(1,))
        return q.qvalue, q.scale
    q = qwix.quantize(w, _QTYPE[fmt], channelwise_axes=(1,), tiled_axes={0: block_size(w.shape[0])},
                      scale_dtype=jnp.bfloat16)
    nibbles = q.qvalue.astype(jnp.int8).astype(jnp.uint8) & 0xF  # int4 two's complement, or the nf4 index
    return _pack_nibbles(nibbles), q.scale


def dequantize_kernel(codes, scales, fmt: str, dtype=jnp.float32):
    """The [in, out] kernel that (codes, scales) of format `fmt` stand for, in `dtype`.

    Computed in `dtype` itself (qwix multiplies in the scales' dtype), so a bfloat16 model never holds a
    float32 copy of a kernel: on an accelerator that copy is a step temporary the size of the largest
    projection, twice its bf16 size. The price is rounding: in bf16 the code's value (nf4) or the scale
    (int8) is rounded before the multiply, which at most doubles the bf16 rounding error of the kernel
    (int4: identical, its codes and scales are exact in bf16).
    """
    scales = scales.astype(dtype)
    if fmt == "int8":
        return qwix.dequantize(qwix.QArray(codes, scales, qtype=jnp.int8))
    nibbles = _unpack_nibbles(codes)
    if fmt == "int4":  # sign-extend the nibble: 8..15 stand for -8..-1
        values = jnp.where(nibbles >= 8, nibbles.astype(jnp.int8) - 16, nibbles.astype(jnp.int8))
        return qwix.dequantize(qwix.QArray(values, scales, qtype=jnp.int4))
    values = _nf4_lookup(nibbles, dtype)
    blocks = scales.shape[0]
    return (values.reshape(blocks, -1, values.shape[1]) * scales[:, None, :]).reshape(values.shape)


def _nf4_lookup(nibbles, dtype):
    """The NormalFloat-4 values of 4-bit codes, in `dtype`: a tree of 15 selects on the code's bits.

    The same values as indexing the 16-entry table (qwix looks codes up in a float32 table; here they are
    looked up in `dtype`, which keeps the kernel in it). A select is elementwise, where an indexed lookup is a
    gather: XLA can fuse selects into the product that consumes the kernel instead of writing the
    dequantised kernel out as a temporary, as it does for int8's multiply.
    """
    values = [jnp.asarray(v, dtype) for v in _nf4_values()]
    for bit in range(4):  # bit 0 picks within pairs, bit 3 between the halves
        set_ = (nibbles >> bit) & 1 == 1
        values = [jnp.where(set_, values[2 * j + 1], values[2 * j]) for j in range(len(values) // 2)]
    return values[0]


@functools.cache
def _nf4_values() -> np.ndarray:
    """The 16 NormalFloat-4 values, index order, as qwix defines them (float32)."""
    with jax.ensure_compile_time_eval():  # concrete even when first called inside a trace (eval_shape, jit)
        ones = qwix.QArray(np.arange(16, dtype=np.uint8).reshape(16, 1), np.ones((1, 1), np.float32), qtype="nf4")
        return np.asarray(qwix.dequantize(ones))[:, 0]


class QuantizedKernel(nnx.Module):
    """A frozen [in, out] kernel stored as `codes` and `scales` (`QuantizedWeight`s), read dequantised.

    `kernel[...]` / `get_value()`: the dequantised kernel in `dtype`; `get_metadata()`: the replaced
    parameter's (its `logical_axes`). Both stored arrays keep the kernel's logical axes (their dimensions
    are the kernel's, packed or blocked), so the sharding rules place them as they placed the kernel.
    """

    def __init__(self, kernel: nnx.Variable, fmt: str):
        w = kernel.get_value()
        if w.ndim != 2:
            raise QuantizationError(f"only [in, out] kernels are quantised, got shape {w.shape}")
        if fmt != "int8" and w.shape[0] % 2:
            raise QuantizationError(f"{fmt} packs two codes per byte along the input axis, which needs an even "
                                    f"input size; this kernel is {w.shape}. Use quantize='int8' for this model")
        axes = tuple(kernel.get_metadata().get("logical_axes", (None, None)))
        codes, scales = quantize_kernel(w, fmt)
        self.codes = QuantizedWeight(codes, logical_axes=axes)
        self.scales = QuantizedWeight(scales, logical_axes=axes)
        self.logical_axes = axes
        self.format = fmt
        self.shape = tuple(w.shape)
        self.dtype = jnp.dtype(w.dtype).name

    def get_value(self):
        return self._dequantize(self.codes[...], self.scales[...])

    def dequantize_after(self, x):
        """(the kernel, x) for the product x @ kernel: the kernel dequantised once x exists.

        An optimisation barrier ties the stored arrays to the layer's input, so the compiler cannot
        dequantise every layer's kernels ahead of their layers (XLA's TPU scheduler did, in the sampler's
        loop: the whole bf16 model live at once, 1.9 GB on gemma3-1b). `x` is returned unchanged in value.
        """
        codes, scales, x = jax.lax.optimization_barrier((self.codes[...], self.scales[...], x))
        return self._dequantize(codes, scales), x

    def _dequantize(self, codes, scales):
        # under a mesh the stored codes are gathered (FSDP) and dequantised here, not the dequantised kernel
        codes, scales = gathered(codes, self.logical_axes), gathered(scales, self.logical_axes)
        return dequantize_kernel(codes, scales, self.format, jnp.dtype(self.dtype))

    def __getitem__(self, index):
        return self.get_value()[index]

    def get_metadata(self) -> dict:
        return {"logical_axes": self.logical_axes}

    def set_value(self, value):
        raise QuantizationError(
            "this kernel is stored quantised and frozen; it cannot be written (e.g. an adapter merged into it in "
            "place). Build a dense copy with the adapter merged instead: merging.merged_model(model, name), or "
            "export_merged / export_peft")


def _decoder_projections(model: nnx.Module) -> list[tuple[tuple, Linear]]:
    """(path, module) of every `Linear` (or `LoRALinear`) inside a `Transformer`'s decoder layers."""
    return [(tuple(p), m) for p, m in nnx.iter_modules(model)
            if isinstance(m, Linear) and p and p[0] == "layers"]


def quantized_projections(model: nnx.Module) -> list[tuple[tuple, Linear]]:
    """(path, module) of every projection whose kernel is a `QuantizedKernel`, wherever it sits in `model`."""
    return [(tuple(p), m) for p, m in nnx.iter_modules(model)
            if isinstance(m, Linear) and isinstance(m.kernel, QuantizedKernel)]


def quantize_projections(model: nnx.Module, fmt: str) -> None:
    """Store every decoder projection kernel of `model` in format `fmt` (int8 | int4 | nf4), in place.

    Call it before adding adapters. The embedding, lm_head, norms and biases are left as they are.
    """
    if fmt not in FORMATS:
        raise QuantizationError(f"quantize={fmt!r}: expected None or one of {', '.join(FORMATS)}")
    found = _decoder_projections(model)
    if not found:
        raise QuantizationError(f"quantize: {type(model).__name__} has no decoder projections (no Linear under "
                                "'layers'); quantise the Transformer itself, before wrapping it")
    done = [".".join(map(str, p)) for p, m in found if isinstance(m.kernel, QuantizedKernel)]
    if done:
        raise QuantizationError(f"quantize: {done[0]} (and {len(done) - 1} more) is already quantised")
    for _, m in found:
        m.kernel = QuantizedKernel(m.kernel, fmt)


def dequantized_kernels(model: nnx.Module) -> dict[tuple, jax.Array]:
    """Kernel path (`('layers', 0, 'attn', 'q_proj', 'kernel')`) -> the dense kernel of every quantised projection."""
    return {p + ("kernel",): m.kernel.get_value() for p, m in quantized_projections(model)}


def _bytes(x) -> int:
    return x.size * jnp.dtype(x.dtype).itemsize


@dataclasses.dataclass(frozen=True)
class KernelBytes:
    """Bytes of the decoder projection kernels as stored (`stored`) against the same kernels dense in float32."""

    stored: int
    float32: int

    @property
    def ratio(self) -> float:
        return self.stored / self.float32 if self.float32 else 0.0

    def __str__(self) -> str:
        return f"{self.stored:,} B ({100 * self.ratio:.1f}% of {self.float32:,} B in float32)"


def projection_bytes(model: nnx.Module) -> KernelBytes:
    """Stored bytes of the decoder projection kernels (codes + scales when quantised) against fp32 dense.

    `model` is a `Transformer` or anything holding one (a `RewardModel`); a shared backbone counts once.
    """
    stored = f32 = 0
    for _, m in ((p, m) for p, m in nnx.iter_modules(model) if isinstance(m, Linear) and "layers" in p):
        k = m.kernel
        if isinstance(k, QuantizedKernel):
            stored += _bytes(k.codes.get_value()) + _bytes(k.scales.get_value())
            f32 += 4 * math.prod(k.shape)
        else:
            stored += _bytes(k.get_value())
            f32 += 4 * k.get_value().size
    return KernelBytes(stored=stored, float32=f32)


__all__ = [
    "BLOCK", "FORMATS", "KernelBytes", "QuantizationError", "QuantizedKernel", "QuantizedWeight", "block_size",
    "dequantize_kernel", "dequantized_kernels", "projection_bytes", "quantize_kernel",
    "quantize_projections", "quantized_projections",
]
