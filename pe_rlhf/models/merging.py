"""Adapters folded into kernels: in place (`merge_adapter` / `unmerge_adapter`) or into a plain copy.

`merged_kernels` computes the kernels that named adapters run, W + sum of scale * a @ b (DoRA: m * V / ||V||_c,
alone on its projections); `merged_model` builds a plain `Transformer` with them, dense even where the
backbone is stored quantised, which is what the exports (`pe_rlhf.checkpoints.export`) and judges read.
Merging in place into a quantised kernel is refused (`pe_rlhf.models.quant`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from pe_rlhf.models import quant
from pe_rlhf.models.lora import (DoRAMergedRatio, LoRAError, LoRALinear, adapter_names, check_dora_alone,
                                 lora_modules, path_str)
from pe_rlhf.models.transformer import Transformer


def _carrying(model: nnx.Module, name: str) -> list[tuple[tuple, LoRALinear]]:
    if name not in adapter_names(model):
        raise LoRAError(f"no adapter named {name!r} on this model; adapters: {adapter_names(model)}")
    return [(p, m) for p, m in lora_modules(model) if name in m.lora]


def _check_not_quantized(modules, what: str) -> None:
    quantized = [p for p, m in modules if isinstance(m.kernel, quant.QuantizedKernel)]
    if quantized:
        raise LoRAError(
            f"{what}: {path_str(quantized[0])}.kernel (and {len(quantized) - 1} more) is stored quantised and "
            "frozen, so no adapter can be merged into it in place; `merged_model(model, name)` (and "
            "`export_merged`) build a dense model with dequantised W + the update instead")


def merge_adapter(model: nnx.Module, name: str) -> None:
    """Fold adapter `name` into the base kernels in place (it is skipped in the forward pass after).

    LoRA: W <- W + scale * a @ b. DoRA: W <- r * (W + scale * a @ b), r = m / ||V||_c; r is stored
    beside the adapter (`merged_ratio`), as W cannot be recovered from the merged kernel without it.
    """
    modules = _carrying(model, name)
    if any(name in m.merged for _, m in modules):
        raise LoRAError(f"adapter {name!r} is already merged")
    _check_not_quantized(modules, "merge_adapter")
    for path, m in modules:
        check_dora_alone(m, (name,), "merge_adapter", path_str(path))
    for _, m in modules:
        adapter, w = m.lora[name], m.kernel.get_value()
        v = w.astype(jnp.float32) + adapter.delta_kernel()
        if adapter.dora:
            ratio_O = adapter.dora_ratio(w)
            adapter.merged_ratio = DoRAMergedRatio(ratio_O, logical_axes=adapter.magnitude.get_metadata().get(
                "logical_axes", (None,)))
            v = ratio_O * v
        m.kernel.set_value(v.astype(w.dtype))
        m.merged = m.merged + (name,)


def unmerge_adapter(model: nnx.Module, name: str) -> None:
    """Undo `merge_adapter`: W <- W - scale * a @ b, or for DoRA W <- W' / r - scale * a @ b with the stored r.

    Exact up to rounding in the kernel dtype (and, for DoRA, the division by r), provided the adapter's
    weights did not change while merged.
    """
    modules = _carrying(model, name)
    if not any(name in m.merged for _, m in modules):
        raise LoRAError(f"adapter {name!r} is not merged")
    _check_not_quantized(modules, "unmerge_adapter")
    for _, m in modules:
        adapter, w = m.lora[name], m.kernel.get_value()
        w32 = w.astype(jnp.float32)
        if adapter.dora:
            w32 = w32 / adapter.merged_ratio.get_value()
            adapter.merged_ratio = None
        m.kernel.set_value((w32 - adapter.delta_kernel()).astype(w.dtype))
        m.merged = tuple(n for n in m.merged if n != name)


def merged_kernels(model: nnx.Module, *names: str) -> dict[tuple, jax.Array]:
    """Kernel path -> the kernel that `names` run, in the kernel dtype; the model is not changed.

    LoRA adapters add up: W + sum over `names` of scale * a @ b. A DoRA adapter stands alone on its
    projections: m * V / ||V||_c (`LoRAError` if another named or merged adapter shares one).
    Adapters already merged in place are in W and are not added twice.
    """
    unknown = [n for n in names if n not in adapter_names(model)]
    if unknown:
        raise LoRAError(f"no adapter named {unknown} on this model; adapters: {adapter_names(model)}")
    out = {}
    for path, m in lora_modules(model):
        check_dora_alone(m, names, "merged_kernels", path_str(path))
        todo = [n for n in names if n in m.lora and n not in m.merged]
        if todo:
            w = m.kernel.get_value()
            if m.lora[todo[0]].dora:  # alone, by the check above
                w32 = m.lora[todo[0]].adapted_kernel(w)
            else:
                w32 = w.astype(jnp.float32) + sum(m.lora[n].delta_kernel() for n in todo)
            out[path + ("kernel",)] = w32.astype(w.dtype)
    return out


def merged_model(model: Transformer, *names: str) -> Transformer:
    """A plain `Transformer` (no adapters) whose kernels have the named adapters merged in.

    With no names it is the base model. Unchanged weights are shared, not copied. Quantised kernels
    (`pe_rlhf.models.quant`) come out dense in the model dtype: dequantised W + the adapters' update.
    """
    kernels = {**quant.dequantized_kernels(model), **merged_kernels(model, *names)}
    abstract = nnx.eval_shape(lambda: Transformer(model.config, dtype=model.dtype, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    ours = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
    flat = nnx.to_flat_state(state)
    for path, var in flat:
        var.set_value(kernels[path] if path in kernels else ours[path].get_value())
    return nnx.merge(graphdef, nnx.from_flat_state(flat))


__all__ = ["merge_adapter", "merged_kernels", "merged_model", "unmerge_adapter"]
