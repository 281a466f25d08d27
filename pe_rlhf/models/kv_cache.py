"""The decoder's key/value cache: what a sampler carries from one step to the next.

Array names carry their shapes: B batch, T new tokens, S slots, K key/value heads, H head dim.
Nothing mutates inside jit: each step takes a cache and returns a new one.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from pe_rlhf.models.config import ModelConfig


@struct.dataclass
class KVCache:
    """Keys and values of every layer, written slot by slot as tokens arrive.

    `mask_BxS` marks the slots that hold real tokens (left padding stays False);
    `end` is the number of slots written so far, the same for every row.
    """

    k: tuple  # per layer: [B, S, K, H]
    v: tuple
    mask_BxS: jax.Array
    end: jax.Array  # int32 scalar

    @classmethod
    def init(cls, cfg: ModelConfig, batch: int, length: int, dtype=jnp.float32) -> "KVCache":
        shape = (batch, length, cfg.num_kv_heads, cfg.head_dim)
        zeros = tuple(jnp.zeros(shape, dtype) for _ in range(cfg.num_layers))
        return cls(k=zeros, v=zeros, mask_BxS=jnp.zeros((batch, length), bool), end=jnp.zeros((), jnp.int32))

    @property
    def length(self) -> int:
        return self.mask_BxS.shape[1]

    def mask_after(self, input_mask_BxT) -> jax.Array:
        """The slots' mask [B, S] once T more tokens (real where `input_mask_BxT`) are written at `end`."""
        return jax.lax.dynamic_update_slice(self.mask_BxS, input_mask_BxT.astype(bool), (0, self.end))

    def write(self, k_layers, v_layers, input_mask_BxT) -> "KVCache":
        """This cache with T tokens' keys and values (per layer [B, T, K, H]) written at slots end..end+T-1.

        The caller checks that they fit: `end` is traced, so a write past the last slot cannot be caught here
        (XLA would clamp it).
        """
        t = input_mask_BxT.shape[1]
        put = lambda slots, new: jax.lax.dynamic_update_slice(slots, new.astype(slots.dtype), (0, self.end, 0, 0))
        return KVCache(k=tuple(map(put, self.k, k_layers)), v=tuple(map(put, self.v, v_layers)),
                       mask_BxS=self.mask_after(input_mask_BxT), end=self.end + t)
