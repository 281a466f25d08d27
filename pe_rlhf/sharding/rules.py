"""Sharding as data: a table from logical axis names to mesh axes.

Every parameter carries `logical_axes` metadata (`embed`, `heads`, `kv`, `mlp`,
`vocab`, `head_dim`; adapters add `lora_rank`), and activations / the KV cache
use `batch`, `seq`, `cache_seq`. A rule table maps each name to a mesh axis, a
tuple of mesh axes, or None (replicated):

    DEFAULT_RULES = (("batch", ("data", "fsdp")), ("embed", "fsdp"), ("heads", "tensor"), ...)

A name may appear more than once: the first entry whose mesh axes are not yet
used by an earlier dimension of the same array wins, and a name whose every
entry collides is replicated (the rule of flax's logical partitioning). So an
activation ('batch', 'seq', 'embed') shards batch over ('data', 'fsdp') and
leaves embed whole.

Choices, made once here:
- a variable without `logical_axes`, or with a name missing from the table, is
  an error naming the parameter path and the axis (scalars need no axes);
- a parameter dimension that its mesh axes do not divide (e.g. one KV head over
  tensor=2) is replicated with a `ShardingFallbackWarning`: the model still runs,
  and the warning says which parameter lost its sharding;
- a batch whose batch dimension the data axes do not divide is an error: that is
  a configuration mistake, not a shape to work around.

Activations are placed the same way inside a step traced under a mesh (`jax.set_mesh`):
the model calls `constrain(x, ('batch', 'seq', 'embed'))` on its residual stream, its
queries, keys and values and its MLP intermediates. Without those constraints XLA keeps the
FSDP-sharded weights where they are and holds every row of the batch on every chip; with
them the rows stay split over ('data', 'fsdp') and each weight is gathered for its layer,
as FSDP means. `activation_rules(None)` turns them off (the rule table is a context variable,
so a step built with other rules constrains its activations by those).
"""

from __future__ import annotations

import contextlib
import contextvars
import math
import warnings
from collections.abc import Sequence
from typing import Any

import jax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MeshAxes = str | tuple[str, ...] | None
Rules = Sequence[tuple[str, MeshAxes]]

# FSDP shards `embed` over 'fsdp'; tensor parallelism shards heads / kv / mlp / vocab
# over 'tensor'; the batch is split over every data-parallel device ('data' x 'fsdp').
DEFAULT_RULES: tuple[tuple[str, MeshAxes], ...] = (
    ("batch", ("data", "fsdp")),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv", "tensor"),
    ("mlp", "tensor"),
    ("head_dim", None),
    ("lora_rank", None),
    ("seq", None),
    ("cache_seq", None),
)

# Logical axes of the KV cache arrays (see models.kv_cache.KVCache).
CACHE_KV_AXES = ("batch", "cache_seq", "kv", "head_dim")  # k, v: [B, S, K, H]
CACHE_MASK_AXES = ("batch", "cache_seq")


class ShardingRuleError(ValueError):
    """A rule table that leaves an array unplaced, or a batch that cannot be split."""


class ShardingFallbackWarning(UserWarning):
    """A dimension its mesh axes do not divide was replicated instead."""


def _as_tuple(mesh_axes: MeshAxes) -> tuple[str, ...]:
    if mesh_axes is None:
        return ()
    return (mesh_axes,) if isinstance(mesh_axes, str) else tuple(mesh_axes)


def logical_to_spec(axes: Sequence[str | None], rules: Rules = DEFAULT_RULES, *, where: str = "array") -> PartitionSpec:
    """PartitionSpec for an array whose dimensions are named `axes` (None: replicated)."""
    used: set[str] = set()
    spec = []
    for name in axes:
        if name is None:
            spec.append(None)
            continue
        candidates = [mesh_axes for logical, mesh_axes in rules if logical == name]
        if not candidates:
            known = ", ".join(dict.fromkeys(logical for logical, _ in rules))
            raise ShardingRuleError(
                f"{where}: logical axis {name!r} (of axes {tuple(axes)}) has no sharding rule; the rules name "
                f"{known}. Add ({name!r}, <mesh axis | tuple of mesh axes | None>) to the rule table."
            )
        choice = next((m for m in candidates if not used & set(_as_tuple(m))), None)
        used |= set(_as_tuple(choice))
        spec.append(choice)
    return PartitionSpec(*spec)


_ACTIVATION_RULES: contextvars.ContextVar[Rules | None] = contextvars.ContextVar("activation_rules",
                                                                              default=DEFAULT_RULES)


_ACTIVATIONS_FREE: contextvars.ContextVar[bool] = contextvars.ContextVar("activations_free", default=False)


@contextlib.contextmanager
def activation_rules(rules: Rules | None):
    """Within the block, `constrain` places activations by `rules`; None leaves them to XLA."""
    token = _ACTIVATION_RULES.set(None if rules is None else tuple(rules))
    try:
        yield
    finally:
        _ACTIVATION_RULES.reset(token)


@contextlib.contextmanager
def free_activations():
    """Within the block `constrain` does nothing (activations left to XLA) while `gathered` still places
    weights by the rules in force: a decode step (one token per row, with a KV cache) runs so
    (`Transformer.hidden`)."""
    token = _ACTIVATIONS_FREE.set(True)
    try:
        yield
    finally:
        _ACTIVATIONS_FREE.reset(token)


def constrain(x: jax.Array, axes: Sequence[str | None]) -> jax.Array:
    """`x` (an activation whose dimensions are the logical `axes`) held as the activation rules place it.

    Only under a mesh of more than one device (`jax.set_mesh`, as `ShardedStep` and the AOT plans
    trace); elsewhere `x` comes back unchanged. A dimension whose mesh axes do not divide it, or that
    names axes the mesh lacks, is left to XLA (unconstrained), so odd shapes (one KV head, a batch
    of one in decoding) still compile. Values never change, only where they live.
    """
    if _ACTIVATIONS_FREE.get():
        return x
    return _placed(x, axes, drop=(), where="activation")


def gathered(x: jax.Array, axes: Sequence[str | None]) -> jax.Array:
    """A stored weight `x` (dimensions named `axes`) as a layer computes with it: gathered over the mesh
    axes that split the batch (FSDP's axes: the rule for 'batch'), still split over the others (tensor).

    For a frozen weight stored quantised (`models.quant`) this gathers the stored codes, which the layer
    then dequantises locally: a quarter of the bytes of gathering the dequantised bf16 kernel, and no
    full-size kernel held beyond its own layer. Like `constrain`, only under a mesh of more than one
    device with activation rules in force (not turned off by `free_activations`).
    """
    rules = _ACTIVATION_RULES.get()
    if rules is None:
        return x
    return _placed(x, axes, drop=set(_batch_axes(rules)), where="weight")


def _batch_axes(rules: Rules) -> list[str]:
    """The mesh axes the rules split the batch over (FSDP's and data parallelism's), in rule order."""
    return list(dict.fromkeys(a for logical, mesh_axes in rules if logical == "batch" for a in _as_tuple(mesh_axes)))


def vocab_split(logits: jax.Array) -> jax.Array:
    """Logits [..., V] placed with the vocabulary split over every mesh axis the rules give the batch and the
    vocabulary, the other dimensions whole: the vocabulary projection is then computed vocabulary-parallel.

    Without it the projection under FSDP gathers the whole embedding (or lm_head) on every chip, the
    largest weight of Gemma (262k x 1152 in bf16: 604 MB for gemma3-1b) and the largest temporary of an
    RL step's log-probs. With it XLA moves the weight's shards once (all-to-all) and gathers the few
    hidden rows; log-sum-exp and the picked token's logit reduce across chips. Under a mesh with rules in
    force only (decoding included); a vocabulary those axes do not divide is left to XLA.
    """
    rules = _ACTIVATION_RULES.get()
    mesh = jax.sharding.get_abstract_mesh()
    if rules is None or mesh.empty or mesh.size == 1:
        return logits
    names = _batch_axes(rules)
    names += [a for a in _as_tuple(logical_to_spec(("vocab",), rules, where="logits")[0]) if a not in names]
    names = [a for a in names if a in mesh.shape and mesh.shape[a] > 1]
    if not names or logits.shape[-1] % math.prod(mesh.shape[a] for a in names):
        return logits
    return jax.lax.with_sharding_constraint(logits, PartitionSpec(*([None] * (logits.ndim - 1)), tuple(names)))


def _placed(x, axes, *, drop, where: str):
    """`x` constrained to the rules' spec for `axes`, without the mesh axes in `drop`; a dimension its mesh
    axes do not divide, or that names axes the mesh lacks, is left to XLA."""
    rules = _ACTIVATION_RULES.get()
    mesh = jax.sharding.get_abstract_mesh()
    if rules is None or mesh.empty or mesh.size == 1:
        return x
    entries = []
    for dim, entry in zip(x.shape, logical_to_spec(axes, rules, where=where)):
        names = tuple(a for a in _as_tuple(entry) if a not in drop)
        if any(a not in mesh.shape for a in names) or dim % math.prod(mesh.shape[a] for a in names):
            entries.append(PartitionSpec.UNCONSTRAINED)
        else:
            entries.append(names[0] if len(names) == 1 else (names or None))
    return jax.lax.with_sharding_constraint(x, PartitionSpec(*entries))


def fit_spec(spec: PartitionSpec, shape: Sequence[int], mesh: Mesh, *, where: str = "array") -> PartitionSpec:
    """`spec` with each dimension its mesh axes do not divide replicated (with a warning)."""
    entries = tuple(spec) + (None,) * (len(shape) - len(spec))
    fitted = []
    for i, (dim, entry) in enumerate(zip(shape, entries)):
        mesh_axes = _as_tuple(entry)
        missing = [a for a in mesh_axes if a not in mesh.shape]
        if missing:
            raise ShardingRuleError(
                f"{where}: the rules place dimension {i} on mesh axes {missing}, which the mesh "
                f"(axes {tuple(mesh.shape)}) does not have"
            )
        ways = math.prod(mesh.shape[a] for a in mesh_axes)
        if dim % ways:
            warnings.warn(
                f"{where}: dimension {i} (size {dim}) is not divisible by mesh axes {mesh_axes} "
                f"({ways} devices); replicating that dimension",
                ShardingFallbackWarning,
                stacklevel=3,
            )
            fitted.append(None)
        else:
            fitted.append(entry)
    return PartitionSpec(*fitted)


def named_sharding(mesh: Mesh, axes: Sequence[str | None], shape: Sequence[int] | None = None,
                   rules: Rules = DEFAULT_RULES, *, where: str = "array") -> NamedSharding:
    """NamedSharding for an array with logical `axes`; with `shape`, non-divisible dims are replicated."""
    spec = logical_to_spec(axes, rules, where=where)
    if shape is not None:
        spec = fit_spec(spec, shape, mesh, where=where)
    return NamedSharding(mesh, spec)


def path_str(path: Sequence[Any]) -> str:
    """'layers.0.attn.q_proj.kernel' from a pytree key path or an nnx state path."""
    parts = []
    for key in path:
        for attr in ("key", "name", "idx"):
            if hasattr(key, attr):
                key = getattr(key, attr)
                break
        parts.append(str(key))
    return ".".join(parts)


def _is_variable(x) -> bool:
    return isinstance(x, nnx.Variable)


def state_shardings(state: Any, mesh: Mesh, rules: Rules = DEFAULT_RULES) -> Any:
    """NamedShardings laid out like `state` (an nnx.State, concrete or from nnx.eval_shape).

    Each variable is placed by its `logical_axes` metadata; the result keeps the
    Variable wrappers, so it matches `state` as jit in/out_shardings and in `shard_state`.
    """

    def place(path, var):
        where = f"parameter {path_str(path)}"
        if not _is_variable(var):
            raise ShardingRuleError(f"{where}: expected an nnx.Variable, got {type(var).__name__}")
        shape = var.get_value().shape
        axes = var.get_metadata().get("logical_axes")
        if axes is None:
            if len(shape) == 0:
                return var.replace(NamedSharding(mesh, PartitionSpec()))
            raise ShardingRuleError(
                f"{where} ({type(var).__name__}, shape {tuple(shape)}) has no logical_axes metadata, so no rule "
                f"can place it; create it with nnx.Param(..., logical_axes=(...)) naming one axis per dimension"
            )
        if len(axes) != len(shape):
            raise ShardingRuleError(
                f"{where}: logical_axes {tuple(axes)} name {len(axes)} dimensions but the shape is {tuple(shape)}"
            )
        return var.replace(named_sharding(mesh, axes, shape, rules, where=where))

    return jax.tree_util.tree_map_with_path(place, state, is_leaf=_is_variable)


def shard_state(state: Any, shardings: Any) -> Any:
    """`state` placed on devices as `shardings` (from `state_shardings`) says."""
    return jax.device_put(state, shardings)


def batch_shardings(batch: Any, mesh: Mesh, rules: Rules = DEFAULT_RULES) -> Any:
    """NamedShardings for a pytree of batch arrays: dimension 0 is `batch`, the rest replicated.

    A batch dimension the data-parallel devices do not divide is an error.
    """

    def place(path, x):
        where = f"batch{jax.tree_util.keystr(path)}"
        ndim = len(x.shape)
        if ndim == 0:
            return NamedSharding(mesh, PartitionSpec())
        spec = logical_to_spec(("batch",) + (None,) * (ndim - 1), rules, where=where)
        mesh_axes = _as_tuple(spec[0])
        ways = math.prod(mesh.shape[a] for a in mesh_axes)
        if x.shape[0] % ways:
            raise ShardingRuleError(
                f"{where}: batch dimension {x.shape[0]} is not divisible by the {ways} devices of mesh axes "
                f"{mesh_axes} (mesh {dict(mesh.shape)}); use a global batch size that is a multiple of {ways}"
            )
        return NamedSharding(mesh, spec)

    return jax.tree_util.tree_map_with_path(place, batch)


def cache_shardings(cache: Any, mesh: Mesh, rules: Rules = DEFAULT_RULES) -> Any:
    """Shardings for a `KVCache`: k/v [B, S, K, H] as CACHE_KV_AXES, the mask as CACHE_MASK_AXES."""
    k = tuple(named_sharding(mesh, CACHE_KV_AXES, x.shape, rules, where=f"cache.k[{i}]") for i, x in enumerate(cache.k))
    v = tuple(named_sharding(mesh, CACHE_KV_AXES, x.shape, rules, where=f"cache.v[{i}]") for i, x in enumerate(cache.v))
    mask = named_sharding(mesh, CACHE_MASK_AXES, cache.mask_BxS.shape, rules, where="cache.mask_BxS")
    return cache.replace(k=k, v=v, mask_BxS=mask, end=NamedSharding(mesh, PartitionSpec()))
