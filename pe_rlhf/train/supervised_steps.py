"""The supervised stages' pure train step (reward models, SFT, DPO/IPO) and the losses it takes over a merged module:
`step(trainable, opt_state, frozen, batch) -> (trainable, opt_state, metrics)`. (The RL step is `policy.py`.)

`trainable` is the LoRA adapters (+ head) in parameter-efficient mode, or every parameter when
fully fine-tuning; `frozen` is the rest. The split is made once, with `nnx.split(model, filter, ...)`,
so Optax state exists only for what trains. Loss functions take the merged module and a batch of
NumPy/JAX arrays and return (loss, metrics); they are chosen by reference (gin binds them).
`pe_rlhf.train.sharded` is the one place these steps are jitted (shardings and donation).
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from pe_rlhf.train.cross_entropy import token_nll
from pe_rlhf.train.optim import guarded_update
from pe_rlhf.train.precision import Precision
from pe_rlhf.train.rollout import response_logprobs
from pe_rlhf.train.supervised_losses import (PREFERENCE_LOSSES, bradley_terry_loss, binary_cross_entropy_loss,
                                             dpo_loss, ipo_loss)


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
    trainable, opt_state = guarded_update(tx, grads, opt_state, trainable, loss)
    metrics = dict(metrics, grad_norm=optax.global_norm(grads))
    return trainable, opt_state, metrics


def eval_step(trainable, frozen, batch, *, graphdef, loss_fn: Callable):
    model = nnx.merge(graphdef, trainable, frozen)
    return loss_fn(model, batch)[1]
