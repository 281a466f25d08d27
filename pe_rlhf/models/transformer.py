"""One decoder-only transformer in Flax NNX; the families are switches in `ModelConfig`.

Array names carry their shapes: B batch, T new tokens, S key slots, D hidden,
N query heads, K key/value heads, G = N // K query heads per key head, H head
dim, F mlp width, V vocabulary.

Every parameter carries `logical_axes` metadata (embed, heads, kv, mlp, vocab,
head_dim) so that sharding is a table of rules over these names; under a mesh the
residual stream, queries, keys, values and MLP intermediates are placed by the same
rules (`sharding.rules.constrain`: rows split over the data axes). Projections
are `Linear` modules held as attributes (`attn.q_proj`, `mlp.up_proj`...):
adapters replace them by path without touching any forward pass, and a reward
head reads `Transformer.hidden`.

Decoding carries an explicit `KVCache` in and out; nothing mutates inside jit.
Packed rows (several sequences per row, a reward pair's shared prompt computed
once) carry a `Packing`: segment and branch ids decide who sees whom, and
attention runs over windows of `span` keys instead of the whole row.

`ModelConfig.attention_impl` chooses between these einsum masks and a fused kernel fed segment
ids (`SegmentMask`); `pe_rlhf.models.attention` says which passes can take which.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pe_rlhf.models.attention import (
    LocalMask,
    Packing,
    SegmentMask,
    _key_windows,
    attention_path,
    fused_attention,
    gather_rows,
    packed_masks,
    packed_query_masks,
)
from pe_rlhf.models.config import ModelConfig
from pe_rlhf.models.kv_cache import KVCache
from pe_rlhf.sharding.rules import constrain, free_activations, vocab_split

_MASKED = -2.3819763e38  # large finite negative: fully masked rows stay finite
# Logical axes of the activations `constrain` places under a mesh (sharding.rules).
_RESIDUAL, _MLP = ("batch", "seq", "embed"), ("batch", "seq", "mlp")
_HEADS, _KV = ("batch", "seq", "heads", "head_dim"), ("batch", "seq", "kv", "head_dim")


def _normal(rngs: nnx.Rngs, shape, dtype, stddev: float):
    return (stddev * jax.random.normal(rngs.params(), shape, jnp.float32)).astype(dtype)


class Linear(nnx.Module):
    """y = x @ kernel (+ bias); kernel is [in, out]."""

    def __init__(self, in_features: int, out_features: int, *, axes: tuple[str, str], use_bias: bool,
                 dtype, rngs: nnx.Rngs, init_std: float = 0.02):
        self.kernel = nnx.Param(_normal(rngs, (in_features, out_features), dtype, init_std), logical_axes=axes)
        self.bias = (
            nnx.Param(jnp.zeros((out_features,), dtype), logical_axes=(axes[1],)) if use_bias else None
        )

    def __call__(self, x):
        w, x = kernel_for(self.kernel, x)
        y = x @ w
        if self.bias is not None:
            y = y + self.bias[...]
        return y


def kernel_for(kernel, x):
    """(the [in, out] kernel as `x @ kernel` reads it, x): a quantised kernel (`models.quant`) is dequantised
    only once `x` exists (`QuantizedKernel.dequantize_after`); a plain parameter is read as it is."""
    if hasattr(kernel, "dequantize_after"):
        return kernel.dequantize_after(x)
    return kernel[...], x


class RMSNorm(nnx.Module):
    """RMS norm computed in float32; the scale is (offset + w): offset 1 for Gemma, 0 otherwise."""

    def __init__(self, dim: int, *, eps: float, offset: float, axis_name: str, dtype):
        init = jnp.zeros if offset else jnp.ones
        self.scale = nnx.Param(init((dim,), dtype), logical_axes=(axis_name,))
        self.eps = eps
        self.offset = offset

    def __call__(self, x):
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.eps)
        return (x32 * (self.offset + self.scale[...].astype(jnp.float32))).astype(x.dtype)


def apply_rope(x_BxTxNxH, positions_BxT, inv_freq_h):
    """Rotary embedding in the rotate-half layout used by HF checkpoints."""
    angles_BxTxh = positions_BxT[..., None].astype(jnp.float32) * inv_freq_h
    cos = jnp.cos(jnp.concatenate([angles_BxTxh, angles_BxTxh], -1))[:, :, None, :]
    sin = jnp.sin(jnp.concatenate([angles_BxTxh, angles_BxTxh], -1))[:, :, None, :]
    x = x_BxTxNxH.astype(jnp.float32)
    x1, x2 = jnp.split(x, 2, axis=-1)
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    return (x * cos + rotated * sin).astype(x_BxTxNxH.dtype)


_SPLIT_VOCAB_MAX_ROWS = 32  # from 64 rows the split gains nothing on the CPU, at 256 it is slower


def _tied_logits(x_NxD, embedding_VxD):
    """x @ embedding.T in float32.

    On the CPU backend the vocabulary is split in two halves computed as one batched dot: for few
    rows (decoding) XLA's CPU dot of [N, D] x [V, D]^T streams the embedding on fewer threads than a
    batched dot does, and on Gemma 3's 262k x 640 embedding (671 MB in fp32) the batched form runs at
    the memory's streaming rate (33 ms against 52-68 ms on the 2-core machine of docs/results.md).
    Other backends take the plain dot.
    """
    v, d = embedding_VxD.shape
    if jax.default_backend() != "cpu" or v % 2 or x_NxD.size // d > _SPLIT_VOCAB_MAX_ROWS:
        return jnp.einsum("...D,VD->...V", x_NxD, embedding_VxD, preferred_element_type=jnp.float32)
    halves_2xNxV = jnp.einsum("...D,CVD->C...V", x_NxD, embedding_VxD.reshape(2, v // 2, d),
                              preferred_element_type=jnp.float32)
    return jnp.moveaxis(halves_2xNxV, 0, -2).reshape(*x_NxD.shape[:-1], v)


def _attend(q_BxTxKxGxH, k_BxSxKxH, v_BxSxKxH, mask_BxTxS, scale: float, softcap: float | None, dtype):
    """Softmax attention of grouped queries over keys; masked keys get no weight."""
    logits_BxKxGxTxS = jnp.einsum(
        "BTKGH,BSKH->BKGTS", q_BxTxKxGxH, k_BxSxKxH.astype(q_BxTxKxGxH.dtype),
        preferred_element_type=jnp.float32,
    ) * scale
    if softcap is not None:
        logits_BxKxGxTxS = jnp.tanh(logits_BxKxGxTxS / softcap) * softcap
    logits_BxKxGxTxS = jnp.where(mask_BxTxS[:, None, None], logits_BxKxGxTxS, _MASKED)
    probs_BxKxGxTxS = jax.nn.softmax(logits_BxKxGxTxS, axis=-1).astype(dtype)
    return jnp.einsum("BKGTS,BSKH->BTKGH", probs_BxKxGxTxS, v_BxSxKxH.astype(dtype))


class Attention(nnx.Module):
    def __init__(self, cfg: ModelConfig, layer: int, *, dtype, rngs: nnx.Rngs):
        d, n, k, h = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.q_proj = Linear(d, n * h, axes=("embed", "heads"), use_bias=cfg.qkv_bias, dtype=dtype, rngs=rngs,
                             init_std=cfg.initializer_range)
        self.k_proj = Linear(d, k * h, axes=("embed", "kv"), use_bias=cfg.qkv_bias, dtype=dtype, rngs=rngs,
                             init_std=cfg.initializer_range)
        self.v_proj = Linear(d, k * h, axes=("embed", "kv"), use_bias=cfg.qkv_bias, dtype=dtype, rngs=rngs,
                             init_std=cfg.initializer_range)
        self.o_proj = Linear(n * h, d, axes=("heads", "embed"), use_bias=cfg.o_bias, dtype=dtype, rngs=rngs,
                             init_std=cfg.initializer_range)
        if cfg.qk_norm:
            kw = dict(eps=cfg.rms_norm_eps, offset=cfg.norm_offset, axis_name="head_dim", dtype=dtype)
            self.q_norm = RMSNorm(h, **kw)
            self.k_norm = RMSNorm(h, **kw)
        else:
            self.q_norm = self.k_norm = None
        self.num_heads, self.num_kv_heads, self.head_dim = n, k, h
        self.scale = cfg.attn_scale
        self.softcap = cfg.attn_logit_softcap
        self.inv_freq = tuple(float(f) for f in cfg.layer_rope(layer).inv_freq(h))

    def __call__(self, x_BxTxD, positions_BxT, mask_BxTxS, kv_cache, end, query_index_BxM=None):
        """Returns (y_BxTxD, (k_BxSxKxH, v_BxSxKxH)); with a cache, the new keys are written at `end`.

        With `query_index_BxM`, only those positions query (keys and values come from every
        position; `mask_BxTxS` is then [B, M, S]) and y is [B, M, D].
        """
        b, t, _ = x_BxTxD.shape
        n, k, h = self.num_heads, self.num_kv_heads, self.head_dim
        xq_BxTxD, q_positions_BxT = x_BxTxD, positions_BxT
        if query_index_BxM is not None:
            xq_BxTxD = gather_rows(x_BxTxD, query_index_BxM)
            q_positions_BxT = gather_rows(positions_BxT, query_index_BxM)
        tq = xq_BxTxD.shape[1]
        q_BxTxNxH = constrain(self.q_proj(xq_BxTxD).reshape(b, tq, n, h), _HEADS)
        k_BxTxKxH = constrain(self.k_proj(x_BxTxD).reshape(b, t, k, h), _KV)
        v_BxTxKxH = constrain(self.v_proj(x_BxTxD).reshape(b, t, k, h), _KV)
        if self.q_norm is not None:
            q_BxTxNxH = self.q_norm(q_BxTxNxH)
            k_BxTxKxH = self.k_norm(k_BxTxKxH)
        inv_freq = jnp.asarray(np.array(self.inv_freq, np.float32))
        q_BxTxNxH = apply_rope(q_BxTxNxH, q_positions_BxT, inv_freq)
        k_BxTxKxH = apply_rope(k_BxTxKxH, positions_BxT, inv_freq)

        if kv_cache is None:
            k_BxSxKxH, v_BxSxKxH = k_BxTxKxH, v_BxTxKxH
        else:
            k_cache, v_cache = kv_cache
            k_BxSxKxH = jax.lax.dynamic_update_slice(k_cache, k_BxTxKxH.astype(k_cache.dtype), (0, end, 0, 0))
            v_BxSxKxH = jax.lax.dynamic_update_slice(v_cache, v_BxTxKxH.astype(v_cache.dtype), (0, end, 0, 0))

        if isinstance(mask_BxTxS, SegmentMask):  # a fused kernel; its mask is segment ids
            sm = mask_BxTxS
            out_BxTxNxH = fused_attention(sm.impl, q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, sm.segment_BxT,
                                          scale=self.scale, softcap=self.softcap, window=sm.window)
            return self.o_proj(out_BxTxNxH.astype(x_BxTxD.dtype).reshape(b, tq, n * h)), (k_BxSxKxH, v_BxSxKxH)
        q_BxTxKxGxH = q_BxTxNxH.reshape(b, tq, k, n // k, h)
        if isinstance(mask_BxTxS, LocalMask):  # packed rows: each query chunk against its window of keys
            lm = mask_BxTxS
            c, w = t // lm.chunk, lm.blocks * lm.chunk
            fold = lambda x: x.reshape(b * c, *x.shape[2:])
            out = _attend(fold(q_BxTxKxGxH.reshape(b, c, lm.chunk, k, n // k, h)),
                          fold(_key_windows(k_BxSxKxH, lm.blocks, lm.chunk, 0)),
                          fold(_key_windows(v_BxSxKxH, lm.blocks, lm.chunk, 0)),
                          lm.mask_BxCxQxW.reshape(b * c, lm.chunk, w), self.scale, self.softcap, x_BxTxD.dtype)
            out_BxTxKxGxH = out.reshape(b, t, k, n // k, h)
        else:
            out_BxTxKxGxH = _attend(q_BxTxKxGxH, k_BxSxKxH, v_BxSxKxH, mask_BxTxS, self.scale, self.softcap,
                                    x_BxTxD.dtype)
        y_BxTxD = self.o_proj(out_BxTxKxGxH.reshape(b, tq, n * h))
        return y_BxTxD, (k_BxSxKxH, v_BxSxKxH)


class MLP(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, dtype, rngs: nnx.Rngs):
        d, f, bias = cfg.hidden_size, cfg.intermediate_size, cfg.mlp_bias
        self.gate_proj = Linear(d, f, axes=("embed", "mlp"), use_bias=bias, dtype=dtype, rngs=rngs,
                              init_std=cfg.initializer_range)
        self.up_proj = Linear(d, f, axes=("embed", "mlp"), use_bias=bias, dtype=dtype, rngs=rngs,
                              init_std=cfg.initializer_range)
        self.down_proj = Linear(f, d, axes=("mlp", "embed"), use_bias=bias, dtype=dtype, rngs=rngs,
                              init_std=cfg.initializer_range)
        self.activation = cfg.activation

    def __call__(self, x_BxTxD):
        gate_BxTxF = constrain(self.gate_proj(x_BxTxD), _MLP)
        if self.activation == "gelu_tanh":
            gate_BxTxF = jax.nn.gelu(gate_BxTxF, approximate=True)
        else:
            gate_BxTxF = jax.nn.silu(gate_BxTxF)
        return self.down_proj(gate_BxTxF * constrain(self.up_proj(x_BxTxD), _MLP))


class Block(nnx.Module):
    """Pre-norm residual block; Gemma adds a norm after attention and after the MLP."""

    def __init__(self, cfg: ModelConfig, layer: int, *, dtype, rngs: nnx.Rngs):
        norm = lambda: RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, offset=cfg.norm_offset,
                               axis_name="embed", dtype=dtype)
        self.attn_norm = norm()
        self.attn = Attention(cfg, layer, dtype=dtype, rngs=rngs)
        self.post_attn_norm = norm() if cfg.is_gemma else None
        self.mlp_norm = norm()
        self.mlp = MLP(cfg, dtype=dtype, rngs=rngs)
        self.post_mlp_norm = norm() if cfg.is_gemma else None
        self.sliding = cfg.layer_is_sliding(layer)

    def __call__(self, x_BxTxD, positions_BxT, mask_BxTxS, kv_cache, end, query_index_BxM=None):
        """With `query_index_BxM`, the block's output only at those positions: [B, M, D]."""
        y_BxTxD, kv = self.attn(self.attn_norm(x_BxTxD), positions_BxT, mask_BxTxS, kv_cache, end, query_index_BxM)
        if query_index_BxM is not None:
            x_BxTxD = gather_rows(x_BxTxD, query_index_BxM)
        if self.post_attn_norm is not None:
            y_BxTxD = self.post_attn_norm(y_BxTxD)
        x_BxTxD = x_BxTxD + y_BxTxD
        y_BxTxD = self.mlp(self.mlp_norm(x_BxTxD))
        if self.post_mlp_norm is not None:
            y_BxTxD = self.post_mlp_norm(y_BxTxD)
        return x_BxTxD + y_BxTxD, kv


def _call(block, *args):
    return block(*args)


def _checkpointed(block, *args):
    """`block(*args)` under `jax.checkpoint`: the backward pass recomputes the block from its input.

    The block is rebuilt inside the checkpoint from its (graphdef, state); it reads its weights and
    writes nothing, so nothing has to flow back out.
    """
    graphdef, state = nnx.split(block)
    return jax.checkpoint(lambda state, *args: nnx.merge(graphdef, state)(*args))(state, *args)


class Transformer(nnx.Module):
    """Decoder-only language model.

    `model(tokens_BxT, input_mask=...)` gives logits [B, T, V];
    `model.decode(tokens_BxT, cache, input_mask=...)` gives (logits, new_cache);
    `model.hidden(...)` gives the final-norm hidden states for heads.
    """

    def __init__(self, cfg: ModelConfig, *, dtype=jnp.float32, rngs: nnx.Rngs | None = None, remat: bool = False):
        rngs = rngs if rngs is not None else nnx.Rngs(0)
        self.config = cfg
        self.dtype = dtype
        self.remat = remat  # recompute each block's activations in the backward pass (keeps its input only)
        self.embedding = nnx.Param(
            _normal(rngs, (cfg.vocab_size, cfg.hidden_size), dtype, cfg.initializer_range),
            logical_axes=("vocab", "embed")
        )
        self.layers = nnx.List([Block(cfg, i, dtype=dtype, rngs=rngs) for i in range(cfg.num_layers)])
        self.final_norm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, offset=cfg.norm_offset,
                                  axis_name="embed", dtype=dtype)
        self.lm_head = (
            None if cfg.tie_word_embeddings
            else Linear(cfg.hidden_size, cfg.vocab_size, axes=("embed", "vocab"), use_bias=False,
                        dtype=dtype, rngs=rngs, init_std=cfg.initializer_range)
        )

    # -- the forward pass -------------------------------------------------------------
    def hidden(self, tokens_BxT, *, positions_BxT=None, input_mask_BxT=None, cache: KVCache | None = None,
               packing: Packing | None = None, read_BxM=None):
        """Final-norm hidden states [B, T, D] and the updated cache (None without one).

        With `packing` (no cache), rows hold several sequences: `positions_BxT` is required and
        `packing` decides which tokens see which (see `Packing`). With `read_BxM` (no cache), only
        the hidden states at those positions are returned, [B, M, D]: the last block computes its
        queries and MLP there alone (a reward head reads one token per sequence).

        Under a mesh, passes of several tokens per row (training, scoring, and a sampler's prefill into
        its cache) keep their rows split as the sharding rules say; a decode step (one token per row,
        with a cache) does not constrain its activations: there one token per row meets whole layers of
        weights, and rows split over the FSDP axis made XLA gather every layer's weights inside the
        sampler's loop. A prefill left free was computed whole on every chip instead (docs/results.md,
        "Real sizes").
        """
        kw = dict(positions_BxT=positions_BxT, input_mask_BxT=input_mask_BxT, cache=cache, packing=packing,
                  read_BxM=read_BxM)
        if cache is None:
            return self._hidden(tokens_BxT, **kw)[0], None
        if tokens_BxT.shape[1] > 1:
            return self._hidden(tokens_BxT, **kw)
        with free_activations():
            return self._hidden(tokens_BxT, **kw)

    def prefill(self, tokens_BxT, *, input_mask_BxT=None, length: int):
        """A prompt's pass into a fresh KV cache of `length` slots: (hidden states [B, T, D], the cache).

        The same values as `hidden(tokens_BxT, cache=self.init_cache(B, length))`, computed as a cache-less
        pass: attention over the prompt alone takes the fused kernel where `attention_impl` chooses one
        (a pass with a cache always runs the 'xla' path, [B, N, T, S] scores), and under a mesh the rows
        stay split as in training. The sampler prefills so. Cached keys and values at left-padding slots
        may differ between attention paths; the cache's mask hides them.
        """
        b, t = tokens_BxT.shape
        if t > length:
            raise ValueError(f"Transformer.prefill: a prompt of {t} tokens does not fit a cache of {length} slots")
        input_mask_BxT = jnp.ones((b, t), bool) if input_mask_BxT is None else input_mask_BxT.astype(bool)
        x_BxTxD, (k_layers, v_layers) = self._hidden(tokens_BxT, positions_BxT=None, input_mask_BxT=input_mask_BxT,
                                                     cache=None, packing=None, read_BxM=None)
        return x_BxTxD, self.init_cache(b, length).write(k_layers, v_layers, input_mask_BxT)

    def _hidden(self, tokens_BxT, *, positions_BxT, input_mask_BxT, cache, packing, read_BxM):
        cfg = self.config
        b, t = tokens_BxT.shape
        if packing is not None:
            if cache is not None or positions_BxT is None:
                raise ValueError("Transformer.hidden: packed rows need positions_BxT and no cache")
            input_mask_BxT = packing.segment_BxT >= 0
        if input_mask_BxT is None:
            input_mask_BxT = jnp.ones((b, t), bool)
        input_mask_BxT = input_mask_BxT.astype(bool)
        if cache is None:
            end = jnp.zeros((), jnp.int32)
            key_mask_BxS = input_mask_BxT
            prior_tokens_B = jnp.zeros((b,), jnp.int32)
            k_slots_S = jnp.arange(t)
        else:
            end = cache.end
            prior_tokens_B = cache.mask_BxS.sum(axis=1).astype(jnp.int32)
            key_mask_BxS = cache.mask_after(input_mask_BxT)
            k_slots_S = jnp.arange(cache.length)
        if positions_BxT is None:
            positions_BxT = prior_tokens_B[:, None] + jnp.cumsum(input_mask_BxT, axis=1) - 1
            positions_BxT = jnp.maximum(positions_BxT, 0)
        q_slots_T = end + jnp.arange(t)

        causal_TxS = k_slots_S[None, :] <= q_slots_T[:, None]
        full_BxTxS = key_mask_BxS[:, None, :] & causal_TxS[None]
        sliding_BxTxS = full_BxTxS
        if cfg.sliding_window is not None:
            window_TxS = (q_slots_T[:, None] - k_slots_S[None, :]) < cfg.sliding_window
            sliding_BxTxS = full_BxTxS & window_TxS[None]
        if packing is not None:
            full_BxTxS, sliding_BxTxS = packed_masks(packing, positions_BxT, cfg.sliding_window)
        impl = attention_path(cfg.attention_impl, cfg.attn_logit_softcap, cached=cache is not None,
                              packed=packing is not None, branches=None if packing is None else packing.branches,
                              dtype=self.dtype)
        dense_full_BxTxS, dense_sliding_BxTxS = full_BxTxS, sliding_BxTxS  # for a read_BxM last layer
        if impl != "xla":  # left padding is segment 0 and real tokens segment 1; packing has its own
            segment_BxT = input_mask_BxT.astype(jnp.int32) if packing is None else packing.segment_BxT
            full_BxTxS = SegmentMask(segment_BxT, impl)
            sliding_BxTxS = SegmentMask(segment_BxT, impl, cfg.sliding_window)

        x_BxTxD = self.embedding[...][tokens_BxT]
        if cfg.embed_scale is not None:
            x_BxTxD = x_BxTxD * jnp.asarray(cfg.embed_scale, self.dtype)
        x_BxTxD = constrain(x_BxTxD, _RESIDUAL)
        if read_BxM is not None and cache is not None:
            raise ValueError("Transformer.hidden: read_BxM is for cache-less scoring")
        new_k, new_v = [], []
        for i, block in enumerate(self.layers):
            kv_cache = None if cache is None else (cache.k[i], cache.v[i])
            mask_BxTxS = sliding_BxTxS if block.sliding else full_BxTxS
            run = _checkpointed if self.remat else _call
            if read_BxM is not None and i == len(self.layers) - 1:
                if packing is not None:
                    full_BxMxS, sliding_BxMxS = packed_query_masks(packing, positions_BxT, read_BxM,
                                                                   cfg.sliding_window)
                    mask_BxMxS = sliding_BxMxS if block.sliding else full_BxMxS
                else:
                    mask_BxMxS = gather_rows(dense_sliding_BxTxS if block.sliding else dense_full_BxTxS, read_BxM)
                x_BxTxD, (k, v) = run(block, x_BxTxD, positions_BxT, mask_BxMxS, kv_cache, end, read_BxM)
            else:
                x_BxTxD, (k, v) = run(block, x_BxTxD, positions_BxT, mask_BxTxS, kv_cache, end)
            x_BxTxD = constrain(x_BxTxD, _RESIDUAL)
            new_k.append(k)
            new_v.append(v)
        x_BxTxD = self.final_norm(x_BxTxD)
        if cache is None:  # each layer's keys and values, for `prefill`
            return x_BxTxD, (tuple(new_k), tuple(new_v))
        return x_BxTxD, KVCache(k=tuple(new_k), v=tuple(new_v), mask_BxS=key_mask_BxS, end=end + t)

    def logits(self, x_BxTxD):
        """Vocabulary logits [.., V] in float32 from hidden states."""
        if self.lm_head is None:
            logits = _tied_logits(x_BxTxD, self.embedding[...])
        else:
            logits = jnp.einsum("...D,DV->...V", x_BxTxD, self.lm_head.kernel[...],
                                preferred_element_type=jnp.float32)
        logits = vocab_split(logits)  # under a mesh: vocabulary-parallel, no chip gathers the whole weight
        if self.config.final_logit_softcap is not None:
            cap = self.config.final_logit_softcap
            logits = jnp.tanh(logits / cap) * cap
        return logits

    def __call__(self, tokens_BxT, *, positions_BxT=None, input_mask_BxT=None):
        x_BxTxD, _ = self.hidden(tokens_BxT, positions_BxT=positions_BxT, input_mask_BxT=input_mask_BxT)
        return self.logits(x_BxTxD)

    def decode(self, tokens_BxT, cache: KVCache, *, positions_BxT=None, input_mask_BxT=None):
        """One prefill or decode step: (logits_BxTxV, new_cache)."""
        x_BxTxD, cache = self.hidden(tokens_BxT, positions_BxT=positions_BxT, input_mask_BxT=input_mask_BxT,
                                     cache=cache)
        return self.logits(x_BxTxD), cache

    def init_cache(self, batch: int, length: int) -> KVCache:
        return KVCache.init(self.config, batch, length, self.dtype)
