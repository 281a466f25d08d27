"""LoRA adapters as their own partition of the parameters.

Adapter weights are `LoRAParam`, a variable type that is not an `nnx.Param`, so
one split separates what is trained from what is frozen:

    graphdef, adapters, frozen = nnx.split(model, LoRAParam, ...)

A step is then a pure function of `(adapters, opt_state, frozen, batch)` and the
optimizer state exists for the adapters only; the frozen state may be bf16 while
adapters (and their Adam moments) stay fp32.

`add_lora` replaces each matched `Linear` (found by its attribute path, no
forward pass is edited) with a `LoRALinear` that keeps the base kernel and bias
at the same parameter paths (`layers.0.attn.q_proj.kernel`) and holds named
adapters beside them (`layers.0.attn.q_proj.lora.policy.a`):

    y = x @ W (+ bias) + (x @ a @ b) * (alpha / rank)      a [in, r], b [r, out]

Several named adapters share one backbone (`policy`, `reward`). Which ones run is
a static attribute set by `use_adapters(model, *names)`; `use_adapters(model)`
runs the base alone (the KL anchor of the policy). Being static, it is chosen at
trace time and is legal inside `jit` on a model rebuilt there with `nnx.merge`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import re
import zlib

import flax.errors
import jax
import jax.numpy as jnp
from flax import nnx

from pe_rlhf.config_checks import check_fields, choice, integer, number, text
from pe_rlhf.models.transformer import Linear, Transformer

log = logging.getLogger(__name__)

# Preset -> regex searched in a projection's module path, e.g. "layers.3.attn.q_proj".
# The lm_head is never a target: `Transformer.logits` reads its kernel directly.
TARGET_PRESETS = {
    "attention": r"\.attn\.[qkvo]_proj$",
    "mlp": r"\.mlp\.(gate|up|down)_proj$",
    "all_linear": r"\.(attn\.[qkvo]|mlp\.(gate|up|down))_proj$",
}


class LoRAError(ValueError):
    """A LoRA request that cannot be applied to this model."""


class LoRAParam(nnx.Variable):
    """An adapter weight: its own partition of the state, deliberately not an `nnx.Param`."""


@dataclasses.dataclass(frozen=True)
class LoRAConfig:
    """Options of one adapter.

    Defaults: the PE-RLHF paper (arXiv 2403.10704) puts LoRA on the attention
    projections; rank 8 and alpha 16 (scale 2) are common LoRA settings.
    `targets` is a preset name (attention | mlp | all_linear) or a regex searched
    in projection paths such as "layers.3.attn.q_proj". `a` starts as
    N(0, 1/in_features) (fan-in scaled), `b` as zeros, so a fresh adapter leaves
    the outputs unchanged.
    """

    rank: int = 8
    alpha: float = 16.0
    targets: str = "attention"
    param_dtype: str = "float32"  # adapters (and so their optimizer state) stay fp32 under a bf16 base

    def __post_init__(self):
        check_fields(self, LoRAError, rank=integer(ge=1), alpha=number(gt=0), targets=text(),
                     param_dtype=choice("float32", "bfloat16", "float16"))
        try:
            re.compile(self.regex)
        except re.error as e:
            raise LoRAError(f"LoRAConfig.targets {self.targets!r} is not a valid regex: {e}") from e

    @property
    def regex(self) -> str:
        return TARGET_PRESETS.get(self.targets, self.targets)

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


class LoRAAdapter(nnx.Module):
    """One low-rank update: delta(x) = (x @ a @ b) * alpha / rank, computed in the adapter dtype.

    Logical axes: a is (kernel's in axis, 'lora_rank'), b is ('lora_rank', kernel's out axis).
    """

    def __init__(self, a_IxR, b_RxO, *, alpha: float, axes: tuple):
        self.a = LoRAParam(a_IxR, logical_axes=(axes[0], "lora_rank"))
        self.b = LoRAParam(b_RxO, logical_axes=("lora_rank", axes[1]))
        self.alpha = float(alpha)

    @property
    def rank(self) -> int:
        return self.a.get_value().shape[1]

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def __call__(self, x):
        a = self.a[...]
        return ((x.astype(a.dtype) @ a) @ self.b[...]) * self.scale

    def delta_kernel(self):
        """The update to the [in, out] kernel, scale * a @ b, in float32."""
        a, b = self.a[...].astype(jnp.float32), self.b[...].astype(jnp.float32)
        return (a @ b) * self.scale


class LoRALinear(Linear):
    """A `Linear` with named adapters beside its base kernel and bias (same parameter paths).

    `active` names the adapters that run (static, set by `use_adapters`);
    `merged` names those already added into `kernel` by `merge_adapter`, which
    are then skipped in the forward pass.
    """

    def __init__(self, base: Linear):  # noqa: super().__init__ would build new weights
        self.kernel = base.kernel
        self.bias = base.bias
        self.lora = nnx.Dict()
        self.active: tuple[str, ...] = ()
        self.merged: tuple[str, ...] = ()

    def __call__(self, x):
        y = super().__call__(x)
        for name in self.active:
            if name not in self.merged:
                y = y + self.lora[name](x).astype(y.dtype)
        return y


# -- finding and wrapping projections ---------------------------------------------------
def _path_str(path) -> str:
    return ".".join(str(p) for p in path)


def _projections(model: nnx.Module) -> list[tuple[tuple, Linear]]:
    """Every `Linear` inside the decoder layers, with its path."""
    return [(tuple(p), m) for p, m in nnx.iter_modules(model)
            if isinstance(m, Linear) and p and p[0] == "layers"]


def lora_modules(model: nnx.Module) -> list[tuple[tuple, LoRALinear]]:
    """(path, module) of every projection that carries adapters, e.g. (('layers', 0, 'attn', 'q_proj'), m)."""
    return [(tuple(p), m) for p, m in nnx.iter_modules(model) if isinstance(m, LoRALinear)]


def adapter_names(model: nnx.Module) -> tuple[str, ...]:
    """Names of the adapters on `model`, in the order they were added."""
    names: list[str] = []
    for _, m in lora_modules(model):
        names += [n for n in m.lora if n not in names]
    return tuple(names)


def _replace(model: nnx.Module, path: tuple, new: nnx.Module) -> None:
    parent = model
    for key in path[:-1]:
        parent = parent[key] if isinstance(parent, (nnx.List, nnx.Dict)) else getattr(parent, key)
    if isinstance(parent, (nnx.List, nnx.Dict)):
        parent[path[-1]] = new
    else:
        setattr(parent, path[-1], new)


@dataclasses.dataclass(frozen=True)
class ParamCount:
    """Trainable fraction: adapter parameters among all parameters (adapters included, as PEFT counts)."""

    total: int
    adapter: int
    total_bytes: int
    adapter_bytes: int

    @property
    def percent(self) -> float:
        return 100.0 * self.adapter / self.total if self.total else 0.0

    def __str__(self) -> str:
        return (f"adapter params: {self.adapter:,} ({self.adapter_bytes:,} B) || all params: {self.total:,} "
                f"({self.total_bytes:,} B) || adapter%: {self.percent:.4f}")


def _size_bytes(state) -> tuple[int, int]:
    leaves = jax.tree.leaves(state)
    return (sum(math.prod(x.shape) for x in leaves),
            sum(math.prod(x.shape) * jnp.dtype(x.dtype).itemsize for x in leaves))


def param_count(model: nnx.Module, *names: str) -> ParamCount:
    """Adapter parameters of `names` (all adapters when none) against every parameter of the model."""
    total, total_bytes = _size_bytes(nnx.state(model, nnx.Any(nnx.Param, LoRAParam)))
    adapter, adapter_bytes = _size_bytes(nnx.state(model, adapter_filter(*names)))
    return ParamCount(total=total, adapter=adapter, total_bytes=total_bytes, adapter_bytes=adapter_bytes)


def add_lora(model: nnx.Module, name: str = "policy", config: LoRAConfig = LoRAConfig(), *,
             rngs: nnx.Rngs | None = None) -> ParamCount:
    """Add adapter `name` to every projection matching `config.targets`; returns (and logs) the trainable fraction.

    The model is changed in place. Projections that already carry adapters get
    one more. Without `rngs`, `a` is drawn from a seed derived from `name`, so
    `policy` and `reward` start from different (but reproducible) matrices.
    Raises `LoRAError` for a bad name, a pattern that matches no projection, or
    a rank larger than a matched projection's dimensions.
    """
    if not isinstance(name, str) or not name.isidentifier():
        raise LoRAError(f"adapter name must be a Python identifier (it becomes a parameter path key), got {name!r}")
    if name in adapter_names(model):
        raise LoRAError(f"adapter {name!r} already exists on this model; adapters: {adapter_names(model)}")
    pattern = re.compile(config.regex)
    projections = _projections(model)
    targets = [(p, m) for p, m in projections if pattern.search(_path_str(p))]
    if not targets:
        examples = ", ".join(_path_str(p) for p, _ in projections[:7])
        raise LoRAError(
            f"LoRA targets {config.targets!r} (regex {config.regex!r}) match no projection of this model. "
            f"Projections look like: {examples}. Presets: {', '.join(TARGET_PRESETS)}."
        )
    for p, m in targets:
        d_in, d_out = m.kernel.get_value().shape
        if config.rank > min(d_in, d_out):
            raise LoRAError(
                f"LoRA rank {config.rank} is larger than parameter {_path_str(p)}.kernel of shape "
                f"[{d_in}, {d_out}]; use rank <= {min(d_in, d_out)} or leave this projection out of targets"
            )

    rngs = rngs if rngs is not None else nnx.Rngs(zlib.crc32(name.encode()))
    for p, m in targets:
        if not isinstance(m, LoRALinear):
            m = LoRALinear(m)
            _replace(model, p, m)
        d_in, d_out = m.kernel.get_value().shape
        axes = m.kernel.get_metadata().get("logical_axes", (None, None))
        a_IxR = jax.random.normal(rngs.params(), (d_in, config.rank), jnp.float32) / math.sqrt(d_in)
        b_RxO = jnp.zeros((config.rank, d_out), jnp.float32)
        dtype = jnp.dtype(config.param_dtype)
        m.lora[name] = LoRAAdapter(a_IxR.astype(dtype), b_RxO.astype(dtype),
                                   alpha=config.alpha, axes=axes)
        m.active = m.active + (name,)
    count = param_count(model, name)
    log.info("LoRA %r on %d projections (rank %d, alpha %g): %s", name, len(targets), config.rank,
             config.alpha, count)
    return count


# -- partitions and switching ------------------------------------------------------------
def adapter_filter(*names: str):
    """An nnx filter for the `LoRAParam`s of the named adapters (all adapters when no name is given).

    e.g. `graphdef, policy, rest = nnx.split(model, adapter_filter("policy"), ...)`.
    """
    if not names:
        return LoRAParam
    wanted = frozenset(names)

    def is_adapter(path, value) -> bool:
        return isinstance(value, LoRAParam) and len(path) >= 2 and path[-2] in wanted

    return is_adapter


@contextlib.contextmanager
def use_adapters(model: nnx.Module, *names: str):
    """Run `model` with only the named adapters on; `use_adapters(model)` runs the base alone.

    The choice is a static attribute, read at trace time: call it inside `jit` on
    a model rebuilt there (`nnx.merge(graphdef, adapters, frozen)`), or outside jit.
    """
    known = adapter_names(model)
    unknown = [n for n in names if n not in known]
    if unknown:
        raise LoRAError(f"use_adapters: no adapter named {unknown} on this model; adapters: {known}")
    modules = [m for _, m in lora_modules(model)]
    for m in modules:
        off = [n for n in m.merged if n not in names]
        if off:
            raise LoRAError(f"use_adapters: adapter {off[0]!r} is merged into the base weights and cannot be "
                            f"switched off; call unmerge_adapter(model, {off[0]!r}) first")
    saved = [(m, m.active) for m in modules]
    try:
        try:
            for m in modules:
                m.active = tuple(n for n in names if n in m.lora)
        except flax.errors.TraceContextError as e:
            raise LoRAError(
                "use_adapters: this model was created outside the current jax transform, so its adapter "
                "switch cannot be set here. Split it (nnx.split) and rebuild it inside the jitted function "
                "with nnx.merge, use nnx.jit, or call use_adapters outside jit."
            ) from e
        yield model
    finally:
        for m, active in saved:
            if m.active != active:
                m.active = active


# -- merging -------------------------------------------------------------------------------
def _merge(model: nnx.Module, name: str, sign: float) -> None:
    if name not in adapter_names(model):
        raise LoRAError(f"no adapter named {name!r} on this model; adapters: {adapter_names(model)}")
    for _, m in lora_modules(model):
        if name not in m.lora:
            continue
        w = m.kernel.get_value()
        m.kernel.set_value((w.astype(jnp.float32) + sign * m.lora[name].delta_kernel()).astype(w.dtype))
        m.merged = m.merged + (name,) if sign > 0 else tuple(n for n in m.merged if n != name)


def merge_adapter(model: nnx.Module, name: str) -> None:
    """Add adapter `name` into the base kernels in place: W <- W + (alpha/r) a @ b (skipped in forward after)."""
    if any(name in m.merged for _, m in lora_modules(model)):
        raise LoRAError(f"adapter {name!r} is already merged")
    _merge(model, name, +1.0)


def unmerge_adapter(model: nnx.Module, name: str) -> None:
    """Undo `merge_adapter`: W <- W - (alpha/r) a @ b (exact up to rounding in the kernel dtype)."""
    if not any(name in m.merged for _, m in lora_modules(model)):
        raise LoRAError(f"adapter {name!r} is not merged")
    _merge(model, name, -1.0)


def merged_kernels(model: nnx.Module, *names: str) -> dict[tuple, jax.Array]:
    """Kernel path -> W + sum over `names` of (alpha/r) a @ b, in the kernel dtype; the model is not changed.

    Adapters already merged in place are in W and are not added twice.
    """
    unknown = [n for n in names if n not in adapter_names(model)]
    if unknown:
        raise LoRAError(f"no adapter named {unknown} on this model; adapters: {adapter_names(model)}")
    out = {}
    for path, m in lora_modules(model):
        todo = [n for n in names if n in m.lora and n not in m.merged]
        if todo:
            w = m.kernel.get_value()
            w32 = w.astype(jnp.float32) + sum(m.lora[n].delta_kernel() for n in todo)
            out[path + ("kernel",)] = w32.astype(w.dtype)
    return out


def merged_model(model: Transformer, *names: str) -> Transformer:
    """A plain `Transformer` (no adapters) whose kernels have the named adapters merged in.

    With no names it is the base model. Unchanged weights are shared, not copied.
    """
    kernels = merged_kernels(model, *names)
    abstract = nnx.eval_shape(lambda: Transformer(model.config, dtype=model.dtype, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    ours = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
    flat = nnx.to_flat_state(state)
    for path, var in flat:
        var.set_value(kernels[path] if path in kernels else ours[path].get_value())
    return nnx.merge(graphdef, nnx.from_flat_state(flat))


__all__ = [
    "TARGET_PRESETS", "LoRAError", "LoRAParam", "LoRAConfig", "LoRAAdapter", "LoRALinear", "ParamCount",
    "add_lora", "adapter_filter", "adapter_names", "lora_modules", "merge_adapter", "merged_kernels",
    "merged_model", "param_count", "unmerge_adapter", "use_adapters",
]
