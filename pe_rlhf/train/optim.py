"""Optimizers: AdamW with warm-up + cosine/linear decay, clipping and gradient accumulation."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import optax

from pe_rlhf.config_checks import check_fields, choice, integer, number, optional


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """AdamW options. Defaults follow common LoRA practice (lr 1e-4, no decay on a fresh adapter); the
    schedule decays over the run's `LoopConfig.num_steps` unless `total_steps` says otherwise."""

    learning_rate: float = 1e-4
    schedule: str = "cosine"  # cosine | linear | constant
    warmup_steps: int = 0
    total_steps: int | None = None  # the schedule's length in updates; None: the run's LoopConfig.num_steps
    end_lr_fraction: float = 0.0
    weight_decay: float = 0.0
    max_grad_norm: float | None = 1.0
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    grad_accum_steps: int = 1
    # The scalar reward head's own peak learning rate (same schedule shape). A fully tuned reward model
    # trains its backbone at ~1e-5, far too slow for a zero-initialised head; None: `learning_rate`.
    head_learning_rate: float | None = None

    def __post_init__(self):
        check_fields(self, learning_rate=number(gt=0), schedule=choice("cosine", "linear", "constant"),
                     warmup_steps=integer(ge=0), total_steps=optional(integer(ge=1)),
                     end_lr_fraction=number(ge=0, le=1), weight_decay=number(ge=0),
                     max_grad_norm=optional(number(gt=0)), b1=number(ge=0, lt=1), b2=number(ge=0, lt=1),
                     eps=number(ge=0), grad_accum_steps=integer(ge=1),
                     head_learning_rate=optional(number(gt=0)))


def learning_rate_schedule(cfg: OptimizerConfig, num_steps: int | None = None) -> optax.Schedule:
    """Warm-up, then decay over `cfg.total_steps` updates, or over `num_steps` (the run's) when that is None."""
    if cfg.schedule == "constant":  # no length
        decay = optax.constant_schedule(cfg.learning_rate)
    else:
        total_steps = cfg.total_steps if cfg.total_steps is not None else num_steps
        if total_steps is None:
            raise ValueError(f"OptimizerConfig(schedule={cfg.schedule!r}, total_steps=None): the schedule decays over "
                             "the run, but make_optimizer was not told its length; pass num_steps (the run's "
                             "LoopConfig.num_steps) or set OptimizerConfig.total_steps")
        decay_steps = max(total_steps - cfg.warmup_steps, 1)
        if cfg.schedule == "cosine":
            decay = optax.cosine_decay_schedule(cfg.learning_rate, decay_steps, alpha=cfg.end_lr_fraction)
        else:
            decay = optax.linear_schedule(cfg.learning_rate, cfg.learning_rate * cfg.end_lr_fraction, decay_steps)
    if cfg.warmup_steps <= 0:
        return decay
    warmup = optax.linear_schedule(0.0, cfg.learning_rate, cfg.warmup_steps)
    return optax.join_schedules([warmup, decay], [cfg.warmup_steps])


def _is_head(path) -> bool:
    return any(getattr(k, "key", getattr(k, "name", None)) == "head" for k in path)


def head_labels(params):
    """'head' for the reward head's parameters (any path through a `head` attribute), else 'body'."""
    return jax.tree_util.tree_map_with_path(lambda path, _: "head" if _is_head(path) else "body", params)


def make_optimizer(cfg: OptimizerConfig, num_steps: int | None = None) -> optax.GradientTransformation:
    """Clip, then AdamW on the schedule; wrapped in MultiSteps when accumulating gradients.

    The schedule counts optimizer updates (not micro-batches) and decays over `cfg.total_steps`, or
    when that is None over `num_steps`, the run's `LoopConfig.num_steps` (the stages pass it). With
    `head_learning_rate`, the reward head gets its own AdamW at that peak rate (clipping stays global).
    """
    parts = []
    if cfg.max_grad_norm is not None:
        parts.append(optax.clip_by_global_norm(cfg.max_grad_norm))
    adamw = lambda c: optax.adamw(learning_rate_schedule(c, num_steps), b1=c.b1, b2=c.b2, eps=c.eps,
                                  weight_decay=c.weight_decay)
    if cfg.head_learning_rate is None:
        parts.append(adamw(cfg))
    else:
        head = dataclasses.replace(cfg, learning_rate=cfg.head_learning_rate, head_learning_rate=None)
        parts.append(optax.multi_transform({"body": adamw(cfg), "head": adamw(head)}, head_labels))
    tx = optax.chain(*parts)
    if cfg.grad_accum_steps > 1:
        tx = optax.MultiSteps(tx, every_k_schedule=cfg.grad_accum_steps).gradient_transformation()
    return tx


def guard_nonfinite(tx: optax.GradientTransformation) -> optax.GradientTransformation:
    """Skip (and count, in the optimizer state) any update whose gradients are not finite.

    The step leaves the trainable parameters and Adam moments unchanged. Steps update through
    `guarded_update`, which also skips an update whose loss is not finite. The training loop stops
    after too many in a row.
    """
    return optax.apply_if_finite(tx, max_consecutive_errors=1_000_000)


def guarded_update(tx: optax.GradientTransformation, grads, opt_state, params, loss):
    """(params, opt_state) after one update of `tx` (a `guard_nonfinite` optimizer) by `grads`.

    The update is skipped and counted when the loss, any gradient or the gradient's global norm is not
    finite. The loss can be NaN while its gradient is finite (0 * inf), and every entry of a gradient
    can be finite while its norm overflows (clipping by that norm then silently zeroes the update).
    """
    finite = jnp.isfinite(loss) & jnp.isfinite(optax.global_norm(grads))
    grads = jax.tree.map(lambda g: jnp.where(finite, g, jnp.nan), grads)  # apply_if_finite skips it
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state


def nonfinite_updates(opt_state) -> tuple[int, int]:
    """(skipped in a row now, skipped in all) by `guard_nonfinite`, read on the host (it waits for the device)."""
    in_a_row, total = jax.device_get((opt_state.notfinite_count, opt_state.total_notfinite))
    return int(in_a_row), int(total)


def nonfinite_counts(opt_state) -> jax.Array:
    """`nonfinite_updates` as a new device array [in a row, in all], without waiting for the device.

    A copy: the training loop keeps one per step and reads them at its log steps, after the next steps
    have taken (donated) the state they came from.
    """
    return jnp.stack([opt_state.notfinite_count, opt_state.total_notfinite])
