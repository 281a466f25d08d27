"""The supervised stages' pure train step (reward models, SFT, DPO/IPO) and the losses it takes over a merged module:
`step(trainable, opt_state, frozen, batch) -> (trainable, opt_state, metrics)`. (The RL step is `policy.py`.)

`trainable` is the LoRA adapters (+ head) in parameter-efficient mode, or every parameter when
fully fine-tuning; `frozen` is the rest. The split is made once, with `nnx.split(model, filter, ...)`,
so Optax state exists only for what trains. Loss functions take the merged module and a batch of
NumPy/JAX arrays and return (loss, metrics); they are chosen by reference (gin binds them).
`pe_rlhf.train.sharded` is the one place these steps are jitted (shardings and donation).
"""

from __future__ import annotations

import functools
import math
from typing import Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import PartitionSpec as P

from pe_rlhf.models.attention import mesh_axes
from pe_rlhf.train.precision import Precision
from pe_rlhf.train.rollout import response_logprobs
from pe_rlhf.train.supervised_losses import (PREFERENCE_LOSSES, bradley_terry_loss, binary_cross_entropy_loss,
                                             dpo_loss, ipo_loss, masked_token_loss)


# -- loss functions over a merged module ---------------------------------------------------
def pairwise_reward_loss(model, batch, *, center_coef: float = 0.0):
    """Bradley-Terry on a RewardModel; chosen and rejected go through one forward pass of 2B rows."""
    b = batch["chosen_tokens_BxT"].shape[0]
    tokens = jnp.concatenate([batch["chosen_tokens_BxT"], batch["rejected_tokens_BxT"]], axis=0)
    mask = jnp.concatenate([batch["chosen_mask_BxT"], batch["rejected_mask_BxT"]], axis=0)
    r_2B = model(tokens, mask)
    return bradley_terry_loss(r_2B[:b], r_2B[b:], batch.get("margin_B"), center_coef=center_coef)


def classification_reward_loss(model, batch):
    """Binary cross-entropy of a RewardModel's score against 0/1 labels."""
    return binary_cross_entropy_loss(model(batch["tokens_BxT"], batch["mask_BxT"]), batch["label_B"])


def packed_pairwise_reward_loss(model, batch, *, span: int, center_coef: float = 0.0):
    """Bradley-Terry over a packed batch (`data.packing`): each pair's prompt computed once."""
    r_RxPx2 = model.score_packed(batch, span)
    return bradley_terry_loss(r_RxPx2[..., 0].ravel(), r_RxPx2[..., 1].ravel(), batch["margin_RxP"].ravel(),
                              center_coef=center_coef, weights_B=batch["valid_RxP"].ravel())


def packed_classification_reward_loss(model, batch, *, span: int):
    """Binary cross-entropy over a packed batch of labelled responses."""
    r_RxP = model.score_packed(batch, span)[..., 0]
    return binary_cross_entropy_loss(r_RxP.ravel(), batch["label_RxP"].ravel(), weights_B=batch["valid_RxP"].ravel())


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


def sft_loss(model, batch, *, response_window: int | None = None):
    """Next-token cross-entropy on response tokens of a Transformer (`token_nll`).

    With `response_window` W (at least the longest response, e.g. `max_response_len`), the
    vocabulary projection runs only at the W positions that predict each row's response, not at
    every position: on a 262k vocabulary that projection dominates the step, and prompts are most
    of each row. The loss is the same (the positions left out carry no target).
    """
    tokens_BxT, response_BxT = batch["tokens_BxT"], batch["response_mask_BxT"]
    h_BxTxD, _ = model.hidden(tokens_BxT, input_mask_BxT=batch["mask_BxT"].astype(bool))
    if response_window is None:  # position t predicts token t + 1
        return token_nll(model, h_BxTxD[:, :-1], tokens_BxT[:, 1:], response_BxT[:, 1:])
    t = tokens_BxT.shape[1]
    start_B = jnp.argmax(response_BxT > 0, axis=1)  # first response token (0 for a row without one)
    target_BxW = start_B[:, None] + jnp.arange(response_window)[None, :]
    inside_BxW = target_BxW < t
    target_BxW = jnp.minimum(target_BxW, t - 1)
    h_BxWxD = jnp.take_along_axis(h_BxTxD, jnp.maximum(target_BxW - 1, 0)[..., None], axis=1)
    mask_BxW = jnp.take_along_axis(response_BxT, target_BxW, axis=1) * inside_BxW * (start_B > 0)[:, None]
    return token_nll(model, h_BxWxD, jnp.take_along_axis(tokens_BxT, target_BxW, axis=1), mask_BxW)


def response_sequence_logprobs(model, prompt_BxT, prompt_mask_BxT, tokens_BxN, mask_BxN, *, average: bool = False):
    """log p(response | prompt) of each row, summed over its response tokens (or, `average`, their mean).

    The RL layout: prompts left-padded to T, responses right-padded after them to N; the vocabulary
    projection runs over chunks of response positions only (`rollout.response_logprobs`).
    """
    seq_BxL = jnp.concatenate([prompt_BxT, tokens_BxN], axis=1)
    seq_mask_BxL = jnp.concatenate([prompt_mask_BxT, mask_BxN], axis=1).astype(bool)
    logp_BxN, _ = response_logprobs(model, seq_BxL, seq_mask_BxL, prompt_BxT.shape[1], tokens_BxN)
    mask_BxN = mask_BxN.astype(jnp.float32)
    total_B = jnp.sum(logp_BxN * mask_BxN, axis=1)
    return total_B / jnp.maximum(mask_BxN.sum(axis=1), 1.0) if average else total_B


def preference_loss(m, batch, *, beta: float, loss: str = "dpo", label_smoothing: float = 0.0):
    """DPO or IPO on an `RLModules` (`m.as_policy()`, `m.as_anchor()`) over a batch of pairs.

    The policy (the backbone with its adapter on) and the reference (`m.as_anchor()`: the same backbone
    with every adapter off, or a frozen copy when fully tuning) score the chosen and the rejected
    responses, each in one forward of 2B rows, in the same function; the reference under stop_gradient.
    IPO uses per-token mean log-probs, DPO summed ones (as TRL's DPOTrainer). Batch keys: prompt_BxT,
    prompt_mask_BxT, {chosen,rejected}_BxN, {chosen,rejected}_mask_BxN, optional valid_B.
    """
    if loss not in PREFERENCE_LOSSES:
        raise ValueError(f"preference loss {loss!r}: expected one of {PREFERENCE_LOSSES}")
    b = batch["prompt_BxT"].shape[0]
    rows = (jnp.concatenate([batch["prompt_BxT"]] * 2), jnp.concatenate([batch["prompt_mask_BxT"]] * 2),
            jnp.concatenate([batch["chosen_BxN"], batch["rejected_BxN"]]),
            jnp.concatenate([batch["chosen_mask_BxN"], batch["rejected_mask_BxN"]]))
    average = loss == "ipo"
    with m.as_policy() as policy:
        logp_2B = response_sequence_logprobs(policy, *rows, average=average)
    with m.as_anchor() as reference:
        ref_logp_2B = jax.lax.stop_gradient(response_sequence_logprobs(reference, *rows, average=average))
    args = (logp_2B[:b], logp_2B[b:], ref_logp_2B[:b], ref_logp_2B[b:])
    weights_B = batch.get("valid_B")
    if loss == "dpo":
        return dpo_loss(*args, beta=beta, label_smoothing=label_smoothing, weights_B=weights_B)
    return ipo_loss(*args, beta=beta, weights_B=weights_B)


# -- the step -------------------------------------------------------------------------------
def train_step(trainable, opt_state, frozen, batch, *, graphdef, tx: optax.GradientTransformation,
               loss_fn: Callable, precision: Precision = Precision()):
    """One optimizer update of `trainable`; `frozen` is read, never written.

    With a mixed `precision` (`precision.master_weights`), `trainable` holds fp32 masters: the loss runs on
    their compute copy and the gradients, taken through the cast, update the masters in fp32.
    """

    def loss_of(trainable):
        model = nnx.merge(graphdef, precision.cast(trainable), frozen)
        return loss_fn(model, batch)

    (loss, metrics), grads = jax.value_and_grad(loss_of, has_aux=True)(trainable)
    updates, opt_state = tx.update(grads, opt_state, trainable)
    trainable = optax.apply_updates(trainable, updates)
    metrics = dict(metrics, grad_norm=optax.global_norm(grads))
    return trainable, opt_state, metrics


def eval_step(trainable, frozen, batch, *, graphdef, loss_fn: Callable):
    model = nnx.merge(graphdef, trainable, frozen)
    return loss_fn(model, batch)[1]
