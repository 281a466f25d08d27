"""Weight averaging of LoRA adapters: WARM reward models, WARP-style policy interpolation.

Averaging the factors of K adapters, mean(a) @ mean(b), is not the average of their updates
(a product does not commute with a mean). The average of the updates is itself a LoRA update of
rank K*r, exactly:

    sum_k w_k s_k a_k @ b_k = [w_1 s_1 a_1 | ... | w_K s_K a_K] @ [b_1; ...; b_K]

so `average_adapters` concatenates the factors (weights and scales folded into `a`) into one adapter
with scale 1. The averaged model costs one rank-K*r adapter in the forward pass (and nothing once
merged) instead of K forward passes, which is what WARM (Ramé et al. 2024, arXiv 2401.12187) buys
over an ensemble. `scale_adapter` moves a policy along the line from its start to its end,
W + eta * delta (WARP's interpolation towards the initialisation, Ramé et al. 2024,
arXiv 2406.16768): eta < 1 trades reward for KL without training.

DoRA adapters are not averaged: their update depends on the base weights through the column norm.
"""

from __future__ import annotations

from typing import Sequence

import jax.numpy as jnp

from pe_rlhf.models import lora


def _check(model, names: Sequence[str]) -> list[tuple[tuple, lora.LoRALinear]]:
    known = lora.adapter_names(model)
    unknown = [n for n in names if n not in known]
    if unknown:
        raise lora.LoRAError(f"no adapter named {unknown} on this model; adapters: {known}")
    modules = lora.lora_modules(model)
    for path, m in modules:
        present = [n for n in names if n in m.lora]
        if present and len(present) != len(names):
            missing = sorted(set(names) - set(present))
            raise lora.LoRAError(f"adapters {list(names)} do not cover the same projections: "
                                 f"{'.'.join(map(str, path))} lacks {missing}; only adapters with the same "
                                 "targets can be averaged")
        for n in present:
            if m.lora[n].dora:
                raise lora.LoRAError(f"adapter {n!r} is a DoRA adapter: its update depends on the base weights "
                                     "through a column norm, so averaging it is not a LoRA update")
        merged = [n for n in present if n in m.merged]
        if merged:
            raise lora.LoRAError(f"adapter {merged[0]!r} is merged into the base weights; unmerge it first")
    return modules


def average_adapters(model, names: Sequence[str], new_name: str, weights: Sequence[float] | None = None) -> int:
    """Add adapter `new_name` whose update is exactly sum_k weights[k] * update of `names[k]`.

    `weights` default to 1/K (the average). The new adapter has rank sum of the ranks, scale 1, the
    adapters' dtype, and is switched on beside the others (`use_adapters` chooses what runs). Returns
    its rank. Raises `LoRAError` for unknown, merged or DoRA adapters and for adapters on different
    projections.
    """
    names = list(names)
    if not names:
        raise lora.LoRAError("average_adapters: no adapters named")
    weights = [1.0 / len(names)] * len(names) if weights is None else [float(w) for w in weights]
    if len(weights) != len(names):
        raise lora.LoRAError(f"average_adapters: {len(weights)} weights for {len(names)} adapters")
    if new_name in lora.adapter_names(model):
        raise lora.LoRAError(f"adapter {new_name!r} already exists on this model")
    if not new_name.isidentifier():
        raise lora.LoRAError(f"adapter name must be a Python identifier, got {new_name!r}")
    rank = None
    for _, m in _check(model, names):
        if names[0] not in m.lora:
            continue
        parts = [m.lora[n] for n in names]
        dtype = parts[0].a[...].dtype
        a = jnp.concatenate([(w * p.scale) * p.a[...].astype(jnp.float32) for w, p in zip(weights, parts)], axis=1)
        b = jnp.concatenate([p.b[...].astype(jnp.float32) for p in parts], axis=0)
        rank = a.shape[1]
        axes = m.kernel.get_metadata().get("logical_axes", (None, None))
        m.lora[new_name] = lora.LoRAAdapter(a.astype(dtype), b.astype(dtype), alpha=float(rank), axes=axes)
        m.active = m.active + (new_name,)
    return rank


def scale_adapter(model, name: str, factor: float) -> None:
    """Scale adapter `name`'s update in place: W + delta -> W + factor * delta (`b` is scaled).

    factor 0 is the starting model, 1 the trained one; in between, WARP's interpolation towards the
    initialisation. Exact for LoRA (the update is linear in `b`).
    """
    for _, m in _check(model, [name]):
        if name in m.lora:
            p = m.lora[name]
            p.b.set_value((p.b[...].astype(jnp.float32) * factor).astype(p.b[...].dtype))


__all__ = ["average_adapters", "scale_adapter"]
