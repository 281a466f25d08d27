"""Which attention runs: the XLA softmax over dense masks, or a fused kernel; chosen here alone.

`ModelConfig.attention_impl` names one of `ATTENTION_IMPLS`:
- "xla": softmax(q k^T) v written as einsums over a dense [B, T, S] mask (packed rows: over
  windows of keys). Every case runs here: KV-cache decoding, packed rows with shared prompts.
- "mosaic_tpu": the splash (flash) attention Pallas kernel of `jax.experimental.pallas.ops.tpu`:
  causal or sliding-window masks, logit softcap, grouped-query heads; left padding and packed
  items are segment ids. Lowered for TPU it is the Mosaic kernel; lowered for any other
  platform the same kernel runs in Pallas interpret mode (slow: for tests).
- "cudnn": `jax.nn.dot_product_attention` with implementation="cudnn" on a GPU backend and
  "xla" otherwise, with the mask made dense from the same segment ids. It has no logit
  softcap: a softcapped model falls back to "xla" (logged once).
- "auto": "mosaic_tpu" on TPU, "cudnn" on GPU, "xla" on CPU (the backend JAX computes on, read at
  trace time; to compile for TPU from a CPU host, name "mosaic_tpu").

The fused kernels take what segment ids express: each query sees the earlier keys of its own
segment (and, with a window, the last `sliding_window` of them). Three cases keep the XLA path:
decoding with a KV cache (one query against a cache; the sampler); the last layer of a scorer
that reads a few positions only (`read_BxM`: M queries, nothing to fuse); and packed rows whose
items have several continuations (`Packing.branches` > 1, or unknown): a pair's two responses
share the prompt but must not see each other, a relation that is not an equivalence, so no
assignment of segment ids gives it.

Packed rows themselves are described here too: `Packing` (segment and branch ids), the windowed
masks the XLA path reads (`packed_masks`, `LocalMask`) and the segment ids a kernel reads (`SegmentMask`).
"""

from __future__ import annotations

import functools
import logging
import math

import jax
import jax.numpy as jnp
from flax import struct
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as splash_mask
from jax.sharding import PartitionSpec as P

from pe_rlhf.models.config import ATTENTION_IMPLS
from pe_rlhf.sharding.rules import logical_to_spec

FUSED_IMPLS = ("mosaic_tpu", "cudnn")
_AUTO = {"tpu": "mosaic_tpu", "gpu": "cudnn"}
_BLOCK = 128  # splash tiles: rows are padded to a multiple of this (the TPU's lane width)
_PAD_SEGMENT = -2  # segment id of the slots added to fill the last tile (packing uses -1 for its padding)

log = logging.getLogger(__name__)


@functools.cache
def log_once(message: str) -> None:
    log.warning(message)


def resolve_attention_impl(impl: str, softcap: float | None) -> str:
    """The implementation a model with `attention_impl=impl` runs on the current backend."""
    if impl not in ATTENTION_IMPLS:
        raise ValueError(f"attention_impl {impl!r} is not one of {', '.join(ATTENTION_IMPLS)}")
    if impl == "auto":
        impl = _AUTO.get(jax.default_backend(), "xla")
    if impl == "cudnn" and softcap is not None:
        log_once(f"attention_impl 'cudnn': jax.nn.dot_product_attention has no logit softcap "
                 f"(attn_logit_softcap={softcap}); this model's attention runs on the 'xla' path")
        return "xla"
    return impl


def attention_path(impl: str, softcap: float | None, *, cached: bool, packed: bool,
                   branches: int | None, dtype=None) -> str:
    """'xla' or the fused kernel that one forward pass runs (see the module docstring for the cases).

    `dtype` is the activations' dtype: cuDNN attention takes only fp16 and bf16, so on a GPU an fp32
    model asked for 'cudnn' (or 'auto') runs the 'xla' path. Elsewhere 'cudnn' is
    `jax.nn.dot_product_attention`'s XLA implementation, which takes any float.
    """
    impl = resolve_attention_impl(impl, softcap)
    if impl == "xla" or cached:
        return "xla"
    half = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
    if impl == "cudnn" and jax.default_backend() == "gpu" and dtype is not None and jnp.dtype(dtype) not in half:
        log_once(f"attention_impl 'cudnn': cuDNN attention takes fp16 or bf16 inputs, not {jnp.dtype(dtype).name}; "
                 "this model's attention runs on the 'xla' path")
        return "xla"
    if packed and (branches is None or branches > 1):
        log_once(f"attention_impl {impl!r}: packed rows whose items have several continuations "
                 f"(Packing.branches={branches}) run on the 'xla' path: segment ids cannot let two "
                 "continuations share a prompt without seeing each other")
        return "xla"
    return impl


def fused_attention(impl: str, q_BxTxNxH, k_BxTxKxH, v_BxTxKxH, segment_BxT, *, scale: float,
                    softcap: float | None, window: int | None):
    """Causal attention within segments, by a fused kernel: [B, T, N, H] in q's dtype.

    Query t sees key s when s <= t, segment[s] == segment[t] and, with `window`, t - s < window.
    Rows with no visible key cannot occur (a query sees itself), so every output is finite.
    """
    if impl == "mosaic_tpu":
        return _splash(q_BxTxNxH, k_BxTxKxH, v_BxTxKxH, segment_BxT, scale=scale, softcap=softcap, window=window)
    if impl == "cudnn":
        return _jax_nn(q_BxTxNxH, k_BxTxKxH, v_BxTxKxH, segment_BxT, scale=scale, window=window)
    raise ValueError(f"fused_attention: {impl!r} is not one of {', '.join(FUSED_IMPLS)}")


def _splash(q_BxTxNxH, k_BxTxKxH, v_BxTxKxH, segment_BxT, *, scale, softcap, window):
    t = q_BxTxNxH.shape[1]
    padded = -(-t // _BLOCK) * _BLOCK
    pad = lambda x, fill=0: jnp.pad(x, [(0, 0), (0, padded - t)] + [(0, 0)] * (x.ndim - 2), constant_values=fill)
    heads_first = lambda x: jnp.swapaxes(pad(x), 1, 2)  # [B, N, T', H]: the kernel's layout
    q_BxNxTxH = heads_first(q_BxTxNxH * jnp.asarray(scale, q_BxTxNxH.dtype))
    k_BxKxTxH = heads_first(k_BxTxKxH.astype(q_BxTxNxH.dtype))
    v_BxKxTxH = heads_first(v_BxTxKxH.astype(q_BxTxNxH.dtype))
    segment_BxT = pad(segment_BxT.astype(jnp.int32), _PAD_SEGMENT)
    shape = (padded, padded)
    one = (splash_mask.CausalMask(shape) if window is None
           else splash_mask.LocalMask(shape, window_size=(window - 1, 0), offset=0))
    block = min(512, padded) if padded % min(512, padded) == 0 else _BLOCK
    sizes = splash.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block, block_q_dkv=block,
                              block_kv_dkv=block, block_kv_dkv_compute=block, block_q_dq=block, block_kv_dq=block)

    def kernel(interpret):
        def attend(q_BxNxTxH, k_BxKxTxH, v_BxKxTxH, segment_BxT):  # N: this device's heads
            heads = q_BxNxTxH.shape[1]
            one_row = splash.make_splash_mha(splash_mask.MultiHeadMask((one,) * heads), block_sizes=sizes,
                                             head_shards=1, q_seq_shards=1, attn_logits_soft_cap=softcap,
                                             interpret=interpret)
            segments = splash.SegmentIds(q=segment_BxT, kv=segment_BxT)
            return jax.vmap(one_row)(q_BxNxTxH, k_BxKxTxH, v_BxKxTxH, segment_ids=segments)
        return attend

    run = lambda *args: jax.lax.platform_dependent(*args, tpu=kernel(False), default=kernel(True))
    out_BxNxTxH = _per_shard(run, q_BxNxTxH, k_BxKxTxH, v_BxKxTxH, segment_BxT)
    return jnp.swapaxes(out_BxNxTxH, 1, 2)[:, :t]


def mesh_axes(mesh, logical: str, size: int) -> tuple[str, ...] | None:
    """The axes of `mesh` the sharding rules map `logical` to, if together they divide `size`; else None."""
    names = logical_to_spec((logical,))[0]
    names = tuple(a for a in ((names,) if isinstance(names, str) else names or ()) if a in mesh.shape)
    ways = math.prod(mesh.shape[a] for a in names)
    return names if names and size % ways == 0 else None


def _per_shard(run, q_BxNxTxH, k_BxKxTxH, v_BxKxTxH, segment_BxT):
    """`run` on each device's rows and heads: XLA cannot partition a Mosaic kernel itself.

    Under a mesh (`jax.set_mesh`), rows split as the sharding rules place `batch` and heads over
    `heads`' mesh axes when they divide both N and K; anything else stays whole on every device.
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1:
        return run(q_BxNxTxH, k_BxKxTxH, v_BxKxTxH, segment_BxT)
    rows = mesh_axes(mesh, "batch", q_BxNxTxH.shape[0])
    heads = mesh_axes(mesh, "heads", math.gcd(q_BxNxTxH.shape[1], k_BxKxTxH.shape[1]))
    qkv, seg = P(rows, heads, None, None), P(rows, None)
    return jax.shard_map(run, mesh=mesh, in_specs=(qkv, qkv, qkv, seg), out_specs=qkv,
                         check_vma=False)(q_BxNxTxH, k_BxKxTxH, v_BxKxTxH, segment_BxT)


def _jax_nn(q_BxTxNxH, k_BxTxKxH, v_BxTxKxH, segment_BxT, *, scale, window):
    same_BxTxS = segment_BxT[:, :, None] == segment_BxT[:, None, :]
    args = (q_BxTxNxH, k_BxTxKxH.astype(q_BxTxNxH.dtype), v_BxTxKxH.astype(q_BxTxNxH.dtype))
    kw = dict(mask=same_BxTxS[:, None], scale=scale, is_causal=True,
              local_window_size=None if window is None else (window - 1, 0))
    # cuDNN is looked for when the call is traced, so the choice is the backend's, not the lowering's.
    implementation = "cudnn" if jax.default_backend() == "gpu" else "xla"
    return jax.nn.dot_product_attention(*args, implementation=implementation, **kw)


# -- packed rows and the masks the XLA path reads ---------------------------------------------
@struct.dataclass
class Packing:
    """Several sequences packed into the rows of a batch (no KV cache).

    `segment_BxT`: the packed item each token belongs to (-1: padding). `branch_BxT`: 0 for the
    tokens every continuation of the item sees (its prompt), k > 0 for the k-th continuation,
    which sees the prompt and itself only: a preference pair is `[prompt | chosen | rejected]`,
    the prompt computed once. Positions are the caller's (`positions_BxT`: each branch continues
    the prompt's positions). No item is longer than `span` tokens, so each query attends to a
    window of keys in chunks of `chunk` queries: T x span work instead of T x T.

    `branches`: the most continuations an item has (None: not stated). With at most one, segment
    ids alone say who sees whom and a fused attention kernel can run (`ModelConfig.attention_impl`);
    its sliding window then counts slots, which equals counting positions when positions advance by
    one per slot within an item (as `pe_rlhf.data.packing` lays them out).
    """

    segment_BxT: jax.Array
    branch_BxT: jax.Array
    span: int = struct.field(pytree_node=False)
    chunk: int = struct.field(pytree_node=False, default=64)
    branches: int | None = struct.field(pytree_node=False, default=None)


@struct.dataclass
class LocalMask:
    """A `Packing`'s attention mask by chunks: query chunk c sees the `blocks` key chunks ending at c."""

    mask_BxCxQxW: jax.Array
    chunk: int = struct.field(pytree_node=False)
    blocks: int = struct.field(pytree_node=False)


@struct.dataclass
class SegmentMask:
    """Causal attention within segments, for a fused kernel: query t sees key s <= t of its own
    segment (and, with `window`, t - s < window). Cache-less passes only: T == S."""

    segment_BxT: jax.Array
    impl: str = struct.field(pytree_node=False)
    window: int | None = struct.field(pytree_node=False, default=None)


def _key_windows(x_BxT, blocks: int, chunk: int, fill):
    """[B, T, ...] -> [B, C, blocks * chunk, ...]: for query chunk c, the keys of chunks c-blocks+1..c."""
    b, t = x_BxT.shape[:2]
    pad = [(0, 0), ((blocks - 1) * chunk, 0)] + [(0, 0)] * (x_BxT.ndim - 2)
    x = jnp.pad(x_BxT, pad, constant_values=fill)
    x = x.reshape(b, t // chunk + blocks - 1, chunk, *x_BxT.shape[2:])
    c = t // chunk
    windows = jnp.stack([x[:, i:i + c] for i in range(blocks)], axis=2)
    return windows.reshape(b, c, blocks * chunk, *x_BxT.shape[2:])


def gather_rows(x_BxT, index_BxM):
    """x[b, index[b, m]] for each row b: [B, M, ...]."""
    index = index_BxM.reshape(index_BxM.shape + (1,) * (x_BxT.ndim - 2))
    return jnp.take_along_axis(x_BxT, index, axis=1)


def packed_query_masks(packing: Packing, positions_BxT, index_BxM, sliding_window: int | None):
    """(global, sliding) dense masks [B, M, T] of the queries at `index_BxM` in a packed batch."""
    t = packing.segment_BxT.shape[1]
    q = lambda x: gather_rows(x, index_BxM)[:, :, None]
    k = lambda x: x[:, None, :]
    slots = jnp.broadcast_to(jnp.arange(t), packing.segment_BxT.shape)
    seg, br = packing.segment_BxT, packing.branch_BxT
    full = ((q(seg) == k(seg)) & (q(seg) >= 0) & (k(slots) <= q(slots)) & ((k(br) == 0) | (k(br) == q(br))))
    if sliding_window is None:
        return full, full
    return full, full & ((q(positions_BxT) - k(positions_BxT)) < sliding_window)


def packed_masks(packing: Packing, positions_BxT, sliding_window: int | None) -> tuple[LocalMask, LocalMask]:
    """(global, sliding) `LocalMask`s of a packed batch."""
    b, t = packing.segment_BxT.shape
    chunk = packing.chunk
    if t % chunk:
        raise ValueError(f"a packed row of {t} tokens is not a multiple of the attention chunk ({chunk}); "
                         "pad the rows to a multiple of it (data.packing does)")
    blocks = -(-(packing.span - 1) // chunk) + 1
    c = t // chunk
    q = lambda x: x.reshape(b, c, chunk)[..., :, None]
    k = lambda x, fill: _key_windows(x, blocks, chunk, fill)[:, :, None, :]
    slots = jnp.broadcast_to(jnp.arange(t), (b, t))
    seg_q, seg_k = q(packing.segment_BxT), k(packing.segment_BxT, -2)
    br_q, br_k = q(packing.branch_BxT), k(packing.branch_BxT, 0)
    full = ((seg_q == seg_k) & (seg_q >= 0) & (k(slots, t) <= q(slots))
            & ((br_k == 0) | (br_k == br_q)))
    sliding = full
    if sliding_window is not None:
        sliding = full & ((q(positions_BxT) - k(positions_BxT, 0)) < sliding_window)
    return LocalMask(full, chunk, blocks), LocalMask(sliding, chunk, blocks)
