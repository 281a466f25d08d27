"""Reductions over real tokens only: masked sum, mean, variance, whitening.

A mask is 1 (or True) on real response tokens and 0 on padding. Padded
positions are selected away with `jnp.where`, never multiplied by zero, so a
NaN or -inf sitting in padding (a log-prob of a pad token, say) cannot leak
into the result. An all-padding reduction gives 0, not NaN. That holds for
values; for gradients, padded inputs must stay finite through the op applied
before masking (log-probs of pad tokens are fine; -inf fed to exp() is not:
its gradient there is 0 * inf = NaN).
"""

from __future__ import annotations

import jax.numpy as jnp


def _real(mask):
    return jnp.asarray(mask).astype(bool)


def masked_sum(x, mask, axis=None):
    """Sum of `x` over positions where `mask` is set (`mask` broadcasts against `x`)."""
    real = jnp.broadcast_to(_real(mask), jnp.shape(x))
    return jnp.sum(jnp.where(real, x, 0), axis=axis)


def masked_count(x, mask, axis=None):
    """Number of real positions, in `x`'s floating dtype."""
    real = jnp.broadcast_to(_real(mask), jnp.shape(x))
    return jnp.sum(real, axis=axis).astype(jnp.result_type(x, jnp.float32))


def masked_mean(x, mask, axis=None):
    """Mean of `x` over real positions; 0 where there are none."""
    count = masked_count(x, mask, axis)
    return masked_sum(x, mask, axis) / jnp.where(count > 0, count, 1)


def masked_var(x, mask, axis=None):
    """Population variance (divide by the count, ddof=0) of `x` over real positions."""
    mean = masked_mean(x, mask, axis)
    mean = mean if axis is None else jnp.expand_dims(mean, axis)
    return masked_mean(jnp.square(x - mean), mask, axis)


def masked_whiten(x, mask, *, shift_mean=True, epsilon=1e-8):
    """(x - mean) / sqrt(var + epsilon) over all real positions; padding becomes 0.

    Mean and population variance are taken over every real position of the
    whole array (the batch statistics), as `whiten` in
    openai/lm-human-preferences (utils/core.py) does over a full batch.
    `shift_mean=False` adds the mean back (rescale only), as that code does
    for rewards.
    """
    mean = masked_mean(x, mask)
    var = masked_var(x, mask)
    whitened = (x - mean) / jnp.sqrt(var + epsilon)
    if not shift_mean:
        whitened = whitened + mean
    return jnp.where(jnp.broadcast_to(_real(mask), jnp.shape(x)), whitened, 0)
