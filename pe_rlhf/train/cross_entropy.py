"""Next-token cross-entropy through the vocabulary projection (`token_nll`), as `ModelConfig.cross_entropy_impl` says.

"logits" materialises the [rows, V] logits; tokamax's fused `linear_softmax_cross_entropy_loss` computes
the projection and the log-softmax in tiles, no logits in HBM (`mosaic_tpu` on TPU, `tokamax_xla` anywhere).
"auto" takes the fused kernel on TPU where it needs less memory (`fused_cross_entropy_pays`). The SFT
loss (`supervised_steps.sft_loss`) calls `token_nll`.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from pe_rlhf.models.attention import mesh_axes
from pe_rlhf.train.supervised_losses import masked_token_loss


def fused_cross_entropy_pays(rows_per_device: int, hidden: int, dtype_bytes: int) -> bool:
    """Whether tokamax's fused cross-entropy should need less HBM than the logits path.

    The logits path holds about four [rows, V] float32 buffers per device at its peak (logits,
    log-softmax, their gradients); the fused kernel holds none but takes the [D, V] projection whole
    on each device and writes its float32 gradient, (4 + dtype bytes) x D x V. So the kernel pays when
    16 x rows > (4 + dtype bytes) x D. (Calibrated on four AOT plans, v5p:2x2x1, 8 rows: gemma3-1b
    with 512 and 2,047 positions and llama3-8b with 2,047, where it pays, and llama3-8b with 512, where
    it does not; docs/results.md.)
    """
    return 16 * rows_per_device > (4 + dtype_bytes) * hidden


def resolve_cross_entropy_impl(impl: str, final_logit_softcap: float | None) -> str:
    """`ModelConfig.cross_entropy_impl` for the backend computing now: "auto" is tokamax's fused Mosaic
    kernel on TPU and the logits path elsewhere (and wherever Gemma 2-style final-logit softcapping
    applies, which the fused kernels do not compute); a fused path named with softcapping is an error.
    `token_nll` further keeps "auto" on the logits path when the fused kernel would not pay
    (`fused_cross_entropy_pays`)."""
    if impl == "auto":
        return "mosaic_tpu" if jax.default_backend() == "tpu" and final_logit_softcap is None else "logits"
    if impl != "logits" and final_logit_softcap is not None:
        raise ValueError(f"cross_entropy_impl {impl!r}: this model softcaps its final logits "
                         f"({final_logit_softcap}), which tokamax's fused cross-entropy does not compute; "
                         "use 'logits' (or 'auto')")
    return impl


FUSED_CE_ROWS = 1024  # tokamax's Mosaic cross-entropy takes rows in blocks of (at least) this many


def _tokamax():
    """tokamax, imported when a fused path first needs it. tokamax reads its options as absl flags and,
    finding them unparsed, parses the program's own command line, which fails on any flag it does not
    define (run.py's --gin_file, pytest's -q): its flags are marked parsed first, at their defaults."""
    from absl import flags
    import tokamax

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()
    return tokamax


def token_nll(model, h_BxNxD, targets_BxN, mask_BxN):
    """Mean cross-entropy of `targets` given hidden states `h` (aligned), over positions with `mask`:
    `masked_token_loss(model.logits(h), ...)`, computed as `model.config.cross_entropy_impl` says.

    "logits" materialises the [B, N, V] float32 logits (on Gemma's 262k vocabulary the largest buffer
    of an SFT step). "mosaic_tpu" is tokamax's fused `linear_softmax_cross_entropy_loss` (Pallas, TPU):
    the projection and the log-softmax in VMEM tiles, no logits in HBM; "tokamax_xla" is the same op's
    XLA reference, for checking it anywhere. The fused op sums the loss over all rows, so rows without
    a target enter as zero vectors, whose loss is exactly log V (all logits 0) and whose gradient
    vanishes, and that constant is subtracted.
    """
    impl = resolve_cross_entropy_impl(model.config.cross_entropy_impl, model.config.final_logit_softcap)
    # under a mesh the Mosaic kernel runs per device, on the rows the `batch` axes give each
    mesh = jax.sharding.get_abstract_mesh()
    split = None if mesh.empty or mesh.size == 1 else mesh_axes(mesh, "batch", mesh.size)
    ways = math.prod(mesh.shape[a] for a in split) if split else 1
    if impl == "mosaic_tpu" and model.config.cross_entropy_impl == "auto":
        rows = math.prod(targets_BxN.shape) // ways
        if not fused_cross_entropy_pays(rows, h_BxNxD.shape[-1], jnp.dtype(h_BxNxD.dtype).itemsize):
            impl = "logits"
    if impl == "logits":
        return masked_token_loss(model.logits(h_BxNxD), targets_BxN, mask_BxN)
    tokamax = _tokamax()
    d = h_BxNxD.shape[-1]
    mask_R = mask_BxN.reshape(-1).astype(jnp.float32)
    x_RxD = jnp.where(mask_R[:, None] > 0, h_BxNxD.reshape(-1, d), jnp.zeros((), h_BxNxD.dtype))
    labels_R = targets_BxN.reshape(-1).astype(jnp.int32)
    w_DxV = model.embedding[...].T if model.lm_head is None else model.lm_head.kernel[...]
    op = functools.partial(tokamax.linear_softmax_cross_entropy_loss, reduction="sum",
                           implementation="xla" if impl == "tokamax_xla" else impl)
    if impl == "tokamax_xla":
        total = op(x_RxD, labels_R, w_DxV.astype(x_RxD.dtype))
    else:
        # the Mosaic kernel: rows in blocks of 1,024 per device (zero rows, like masked ones, pad them),
        # and per device under a mesh, since XLA cannot partition it (rows split as `batch` is, W whole)
        pad = -x_RxD.shape[0] % (FUSED_CE_ROWS * ways)
        x_RxD, labels_R = jnp.pad(x_RxD, ((0, pad), (0, 0))), jnp.pad(labels_R, (0, pad))
        mask_R = jnp.pad(mask_R, (0, pad))
        if split is None:
            total = op(x_RxD, labels_R, w_DxV.astype(x_RxD.dtype))
        else:
            total = jax.shard_map(lambda x, y, w: jax.lax.psum(op(x, y, w), split), mesh=mesh,
                                  in_specs=(P(split, None), P(split), P(None, None)), out_specs=P(),
                                  check_vma=False)(x_RxD, labels_R, w_DxV.astype(x_RxD.dtype))
    count = mask_R.sum()
    nll = total.astype(jnp.float32) - (mask_R.size - count) * jnp.log(jnp.float32(w_DxV.shape[1]))
    loss = nll / jnp.maximum(count, 1.0)
    return loss, {"loss": loss, "tokens": count, "perplexity": jnp.exp(loss)}


__all__ = ["FUSED_CE_ROWS", "fused_cross_entropy_pays", "resolve_cross_entropy_impl", "token_nll"]
