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

    y = x @ W (+ bias) + (x @ a @ b) * scale      a [in, r], b [r, out], scale = alpha / rank

Two options change the update (`LoRAConfig`): rsLoRA (`rslora=True`, Kalajdzievski 2023,
arXiv 2312.03732) takes scale = alpha / sqrt(rank); DoRA (`dora=True`, Liu et al. 2024,
arXiv 2402.09353) adds a trainable magnitude m [out] and runs the kernel

    W' = m * V / ||V||_c      V = W + scale * a @ b, ||.||_c the norm of each output column (over `in`)

with ||V||_c held constant for gradients (the paper's section 4.3), as PEFT does; m starts at ||W||_c,
so a fresh DoRA adapter also leaves the outputs unchanged. A DoRA adapter rescales the whole kernel,
so on each projection it runs and merges alone: with any other adapter on or merged there,
`use_adapters`, the forward pass and the merging functions (`pe_rlhf.models.merging`) raise `LoRAError`.

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

from pe_rlhf.config_checks import boolean, check_fields, choice, integer, number, text
from pe_rlhf.models import quant
from pe_rlhf.models.transformer import Linear, kernel_for

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


class DoRAMergedRatio(nnx.Variable):
    """m / ||V||_c of a merged DoRA adapter, kept (frozen, untrained) so that unmerging can divide it out."""


def lora_scale(alpha: float, rank: int, rslora: bool = False) -> float:
    """alpha / rank (LoRA), or alpha / sqrt(rank) (rsLoRA, Kalajdzievski 2023, arXiv 2312.03732)."""
    return alpha / math.sqrt(rank) if rslora else alpha / rank


@dataclasses.dataclass(frozen=True)
class LoRAConfig:
    """Options of one adapter.

    Defaults: the PE-RLHF paper (arXiv 2403.10704) puts LoRA on the attention
    projections; rank 8 and alpha 16 (scale 2) are common LoRA settings.
    `targets` is a preset name (attention | mlp | all_linear) or a regex searched
    in projection paths such as "layers.3.attn.q_proj". `a` starts as
    N(0, 1/in_features) (fan-in scaled), `b` as zeros, so a fresh adapter leaves
    the outputs unchanged. `rslora` scales by alpha / sqrt(rank) instead of alpha / rank
    (Kalajdzievski 2023, arXiv 2312.03732); `dora` adds a trainable magnitude per output
    unit (Liu et al. 2024, arXiv 2402.09353; see the module docstring). Both default off,
    as in PEFT.
    """

    rank: int = 8
    alpha: float = 16.0
    targets: str = "attention"
    param_dtype: str = "float32"  # adapters (and so their optimizer state) stay fp32 under a bf16 base
    rslora: bool = False
    dora: bool = False

    def __post_init__(self):
        check_fields(self, LoRAError, rank=integer(ge=1), alpha=number(gt=0), targets=text(),
                     param_dtype=choice("float32", "bfloat16", "float16"), rslora=boolean(), dora=boolean())
        try:
            re.compile(self.regex)
        except re.error as e:
            raise LoRAError(f"LoRAConfig.targets {self.targets!r} is not a valid regex: {e}") from e

    @property
    def regex(self) -> str:
        return TARGET_PRESETS.get(self.targets, self.targets)

    @property
    def scale(self) -> float:
        return lora_scale(self.alpha, self.rank, self.rslora)


class LoRAAdapter(nnx.Module):
    """One low-rank update: delta(x) = (x @ a @ b) * scale, computed in the adapter dtype.

    scale is alpha / rank, or alpha / sqrt(rank) with `rslora`. With a `magnitude` m [out] it
    is a DoRA adapter: the projection runs W' = m * V / ||V||_c, V = W + scale * a @ b
    (`adapted_kernel`); `delta_kernel` is then the update to V, not to the kernel.
    Logical axes: a is (kernel's in axis, 'lora_rank'), b is ('lora_rank', kernel's out axis),
    m is (kernel's out axis,).
    """

    def __init__(self, a_IxR, b_RxO, *, alpha: float, axes: tuple, rslora: bool = False, magnitude=None):
        self.a = LoRAParam(a_IxR, logical_axes=(axes[0], "lora_rank"))
        self.b = LoRAParam(b_RxO, logical_axes=("lora_rank", axes[1]))
        self.magnitude = None if magnitude is None else LoRAParam(magnitude, logical_axes=(axes[1],))
        self.alpha = float(alpha)
        self.rslora = bool(rslora)
        self.merged_ratio: DoRAMergedRatio | None = nnx.data(None)  # set while a DoRA adapter is merged

    @property
    def rank(self) -> int:
        return self.a.get_value().shape[1]

    @property
    def scale(self) -> float:
        return lora_scale(self.alpha, self.rank, self.rslora)

    @property
    def dora(self) -> bool:
        return self.magnitude is not None

    def __call__(self, x):
        a = self.a[...]
        return ((x.astype(a.dtype) @ a) @ self.b[...]) * self.scale

    def delta_kernel(self):
        """The update to the [in, out] kernel, scale * a @ b, in float32 (for DoRA: the update to V)."""
        a, b = self.a[...].astype(jnp.float32), self.b[...].astype(jnp.float32)
        return (a @ b) * self.scale

    def dora_ratio(self, kernel_IxO):
        """DoRA's column factor m / ||W + scale * a @ b||_c [out] in float32, the norm held constant for gradients.

        As PEFT, the norm is rounded to the magnitude's dtype before dividing (so a fresh adapter's
        ratio is exactly 1). A zero column of V (0 / 0 in PEFT) gets ratio m, which leaves it zero.
        """
        v_IxO = kernel_IxO.astype(jnp.float32) + self.delta_kernel()
        m_O = self.magnitude[...]
        norm_O = jax.lax.stop_gradient(jnp.linalg.norm(v_IxO, axis=0).astype(m_O.dtype).astype(jnp.float32))
        return m_O.astype(jnp.float32) / jnp.where(norm_O == 0, 1.0, norm_O)

    def adapted_kernel(self, kernel_IxO):
        """The kernel this adapter runs on base kernel W, in float32: W + scale a @ b, or m * V / ||V||_c (DoRA)."""
        v_IxO = kernel_IxO.astype(jnp.float32) + self.delta_kernel()
        return self.dora_ratio(kernel_IxO) * v_IxO if self.dora else v_IxO


class LoRALinear(Linear):
    """A `Linear` with named adapters beside its base kernel and bias (same parameter paths).

    `active` names the adapters that run (static, set by `use_adapters`);
    `merged` names those already added into `kernel` by `merging.merge_adapter`, which
    are then skipped in the forward pass. A DoRA adapter adds, as PEFT's forward,

        (r - 1) * (x @ W) + r * (x @ a @ b) * scale      r = m / ||V||_c

    to x @ W + bias, which is x @ W' + bias with the bias untouched.
    """

    def __init__(self, base: Linear):  # noqa: super().__init__ would build new weights
        self.kernel = base.kernel
        self.bias = base.bias
        self.lora = nnx.Dict()
        self.active: tuple[str, ...] = ()
        self.merged: tuple[str, ...] = ()

    def __call__(self, x):
        check_dora_alone(self, self.active, "forward pass")
        w, x = kernel_for(self.kernel, x)
        xw = x @ w
        y = xw if self.bias is None else xw + self.bias[...]
        for name in self.active:
            if name not in self.merged:
                adapter = self.lora[name]
                delta = adapter(x)
                if adapter.dora:
                    ratio_O = adapter.dora_ratio(w)
                    delta = (ratio_O - 1.0) * xw.astype(jnp.float32) + ratio_O * delta.astype(jnp.float32)
                y = y + delta.astype(y.dtype)
        return y


def check_dora_alone(m: LoRALinear, names, what: str, where: str = "this projection") -> None:
    """Raise `LoRAError` if a DoRA adapter would run or be merged beside another adapter on `m`.

    `names` are the adapters asked for; those merged into `m.kernel` count too. DoRA rescales the
    whole adapted kernel by m / ||V||_c, so with a second update on the same kernel the result depends
    on the order (PEFT folds earlier adapters' outputs into DoRA's rescaled base); no order is chosen.
    """
    together = tuple(dict.fromkeys((*m.merged, *(n for n in names if n in m.lora))))
    dora = [n for n in together if m.lora[n].dora]
    if dora and len(together) > 1:
        others = [n for n in together if n != dora[0]]
        raise LoRAError(
            f"{what}: adapter {dora[0]!r} is a DoRA adapter and cannot run or be merged together with {others} on "
            f"{where} (DoRA rescales the whole kernel, so composing it with another update is not defined); use "
            f"one adapter at a time, e.g. `with use_adapters(model, {dora[0]!r}):`, and unmerge the others first")


# -- finding and wrapping projections ---------------------------------------------------
def path_str(path) -> str:
    """A parameter or module path as text, e.g. 'layers.3.attn.q_proj'."""
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
    """Trainable fraction: adapter parameters among all parameters (adapters included, as PEFT counts).

    A quantised kernel counts its weights (in x out) in `total` and its stored bytes (codes + scales)
    in `total_bytes`; `frozen_bytes` is everything but the adapters.
    """

    total: int
    adapter: int
    total_bytes: int
    adapter_bytes: int

    @property
    def frozen_bytes(self) -> int:
        return self.total_bytes - self.adapter_bytes

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
    total += sum(math.prod(m.kernel.shape) for _, m in quant.quantized_projections(model))
    total_bytes += _size_bytes(nnx.state(model, quant.QuantizedWeight))[1]
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
    targets = [(p, m) for p, m in projections if pattern.search(path_str(p))]
    if not targets:
        examples = ", ".join(path_str(p) for p, _ in projections[:7])
        raise LoRAError(
            f"LoRA targets {config.targets!r} (regex {config.regex!r}) match no projection of this model. "
            f"Projections look like: {examples}. Presets: {', '.join(TARGET_PRESETS)}."
        )
    for p, m in targets:
        d_in, d_out = m.kernel.get_value().shape
        if config.rank > min(d_in, d_out):
            raise LoRAError(
                f"LoRA rank {config.rank} is larger than parameter {path_str(p)}.kernel of shape "
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
        magnitude_O = None
        if config.dora:  # m = ||W||_c, so that m / ||W + 0||_c = 1: the outputs start unchanged
            magnitude_O = jnp.linalg.norm(m.kernel.get_value().astype(jnp.float32), axis=0).astype(dtype)
        m.lora[name] = LoRAAdapter(a_IxR.astype(dtype), b_RxO.astype(dtype), alpha=config.alpha, axes=axes,
                                   rslora=config.rslora, magnitude=magnitude_O)
        m.active = m.active + (name,)
    count = param_count(model, name)
    log.info("LoRA %r on %d projections (rank %d, alpha %g%s%s): %s", name, len(targets), config.rank,
             config.alpha, ", rsLoRA" if config.rslora else "", ", DoRA" if config.dora else "", count)
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
    pairs = lora_modules(model)
    modules = [m for _, m in pairs]
    for path, m in pairs:
        off = [n for n in m.merged if n not in names]
        if off:
            raise LoRAError(f"use_adapters: adapter {off[0]!r} is merged into the base weights and cannot be "
                            f"switched off; call unmerge_adapter(model, {off[0]!r}) first")
        check_dora_alone(m, names, "use_adapters", path_str(path))
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


__all__ = [
    "TARGET_PRESETS", "DoRAMergedRatio", "LoRAError", "LoRAParam", "LoRAConfig", "LoRAAdapter", "LoRALinear",
    "ParamCount", "add_lora", "adapter_filter", "adapter_names", "check_dora_alone", "lora_modules", "lora_scale",
    "param_count", "path_str", "use_adapters",
]
