"""Optimizers: AdamW with warm-up + cosine/linear decay, clipping and gradient accumulation."""

from __future__ import annotations

import dataclasses

import optax


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """AdamW options. Defaults follow common LoRA practice (lr 1e-4, no decay on a fresh adapter)."""

    learning_rate: float = 1e-4
    schedule: str = "cosine"  # cosine | linear | constant
    warmup_steps: int = 0
    total_steps: int = 1000
    end_lr_fraction: float = 0.0
    weight_decay: float = 0.0
    max_grad_norm: float | None = 1.0
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    grad_accum_steps: int = 1

    def __post_init__(self):
        if self.schedule not in ("cosine", "linear", "constant"):
            raise ValueError(f"OptimizerConfig.schedule={self.schedule!r}; choose cosine, linear or constant")
        if self.grad_accum_steps < 1:
            raise ValueError(f"OptimizerConfig.grad_accum_steps={self.grad_accum_steps} must be >= 1")


def learning_rate_schedule(cfg: OptimizerConfig) -> optax.Schedule:
    decay_steps = max(cfg.total_steps - cfg.warmup_steps, 1)
    end = cfg.learning_rate * cfg.end_lr_fraction
    if cfg.schedule == "cosine":
        decay = optax.cosine_decay_schedule(cfg.learning_rate, decay_steps, alpha=cfg.end_lr_fraction)
    elif cfg.schedule == "linear":
        decay = optax.linear_schedule(cfg.learning_rate, end, decay_steps)
    else:
        decay = optax.constant_schedule(cfg.learning_rate)
    if cfg.warmup_steps <= 0:
        return decay
    warmup = optax.linear_schedule(0.0, cfg.learning_rate, cfg.warmup_steps)
    return optax.join_schedules([warmup, decay], [cfg.warmup_steps])


def make_optimizer(cfg: OptimizerConfig) -> optax.GradientTransformation:
    """Clip, then AdamW on the schedule; wrapped in MultiSteps when accumulating gradients.

    The schedule counts optimizer updates (not micro-batches).
    """
    parts = []
    if cfg.max_grad_norm is not None:
        parts.append(optax.clip_by_global_norm(cfg.max_grad_norm))
    parts.append(optax.adamw(learning_rate_schedule(cfg), b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                             weight_decay=cfg.weight_decay))
    tx = optax.chain(*parts)
    if cfg.grad_accum_steps > 1:
        tx = optax.MultiSteps(tx, every_k_schedule=cfg.grad_accum_steps).gradient_transformation()
    return tx
