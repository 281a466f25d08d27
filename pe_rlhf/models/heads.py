"""A scalar reward head on the decoder backbone, read at the last real token."""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from pe_rlhf.models.transformer import Packing, Transformer


def last_real_index(mask_BxT):
    """Index of the last True of each row: works for left and right padding alike."""
    t = mask_BxT.shape[1]
    return t - 1 - jnp.argmax(mask_BxT[:, ::-1].astype(jnp.int32), axis=1)


class ScalarHead(nnx.Module):
    """r = h · w + b in float32. Zero-initialised weight: a fresh reward model scores every text 0."""

    def __init__(self, hidden_size: int):
        self.kernel = nnx.Param(jnp.zeros((hidden_size,), jnp.float32), logical_axes=("embed",))
        self.bias = nnx.Param(jnp.zeros((), jnp.float32), logical_axes=())

    def __call__(self, h_BxD):
        return h_BxD.astype(jnp.float32) @ self.kernel[...] + self.bias[...]


class RewardModel(nnx.Module):
    """Backbone + `ScalarHead`. The backbone may be shared with a policy (same Python object).

    `adapters` names the LoRA adapters active while scoring (None: leave the backbone as it is);
    this is how a reward adapter and a policy adapter share one copy of the base weights.
    """

    def __init__(self, backbone: Transformer, *, adapters: tuple[str, ...] | None = None):
        self.backbone = backbone
        self.head = ScalarHead(backbone.config.hidden_size)
        self.adapters = adapters

    def _hidden(self, tokens_BxT, mask_BxT=None, **packed):
        if self.adapters is None:
            return self.backbone.hidden(tokens_BxT, input_mask_BxT=mask_BxT, **packed)[0]
        from pe_rlhf.models.lora import use_adapters

        with use_adapters(self.backbone, *self.adapters):
            return self.backbone.hidden(tokens_BxT, input_mask_BxT=mask_BxT, **packed)[0]

    def __call__(self, tokens_BxT, mask_BxT):
        """One score per sequence, read at its last real token: [B]."""
        mask_BxT = mask_BxT.astype(bool)
        h_Bx1xD = self._hidden(tokens_BxT, mask_BxT, read_BxM=last_real_index(mask_BxT)[:, None])
        return self.head(h_Bx1xD[:, 0])

    def score_packed(self, batch, span: int):
        """Scores of a packed batch (`pe_rlhf.data.packing`): [R, P, K], one per response of each item.

        `span` is the longest item the batch may hold (prompt + responses), a static int.
        """
        packing = Packing(batch["segment_RxN"], batch["branch_RxN"], span=span)
        r, p, k = batch["read_RxPxK"].shape
        h_RxPKxD = self._hidden(batch["tokens_RxN"], positions_BxT=batch["positions_RxN"], packing=packing,
                                read_BxM=batch["read_RxPxK"].reshape(r, p * k))
        return self.head(h_RxPKxD).reshape(r, p, k)

    def token_values(self, tokens_BxL, mask_BxL, prompt_len: int):
        """A score at every position that predicts a response token (PPO's value of each state): [B, N].

        Aligned with the policy's response logits: column n reads position prompt_len - 1 + n.
        """
        h_BxLxD = self._hidden(tokens_BxL, mask_BxL.astype(bool))
        return self.head(h_BxLxD[:, prompt_len - 1:-1])


