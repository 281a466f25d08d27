"""Mixed precision: fp32 master weights for what trains, cast to the model dtype for the forward and backward.

A bf16 run (`dtype="bfloat16"`) builds every weight in bf16. Frozen weights (a LoRA backbone, the RL
anchor, a reward model the policy is scored by) are only read, so bf16 costs them no more than rounding
in the forward pass. Weights that Adam updates in place in bf16 would lose every update below half a
unit in the last place: bf16 keeps 8 bits of mantissa, so a weight near 1.0 does not move for an update
under 2^-8. So the weights that train are kept as:

- master weights: each trainable `nnx.Param` stored below fp32 is held in fp32 in the train state,
  and so in checkpoints and exports;
- a compute copy: the step casts the masters to their model dtype inside jit (`Precision.cast`);
  gradients with respect to that copy flow back through the cast to the masters, in fp32;
- fp32 Adam moments, created by Optax like the masters they follow.

This is the usual mixed-precision recipe (Micikevicius et al. 2018, arXiv 1710.03740). LoRA needs none of
it: adapters (`lora.LoRAParam`, `LoRAConfig.param_dtype`) and the reward head are built fp32, so a LoRA
run's trainable state has no low-precision `nnx.Param`, `master_weights` returns it as it is and the
cast is the identity. Adapters built bf16 on request (`param_dtype="bfloat16"`) stay bf16 as asked.

    graphdef, trainable, frozen = nnx.split(model, filter_, ...)
    trainable, precision = master_weights(trainable)   # fp32 masters; `precision` remembers the model dtypes
    ... train_step(trainable, opt_state, frozen, batch, graphdef=graphdef, tx=tx, loss_fn=f, precision=precision)
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx

MASTER_DTYPE = jnp.dtype(jnp.float32)


def _is_variable(x) -> bool:
    return isinstance(x, nnx.Variable)


def _with_dtype(v: nnx.Variable, dtype) -> nnx.Variable:
    """`v` with its value in `dtype` (arrays and tracers cast; ShapeDtypeStructs re-typed)."""
    x = v.get_value()
    if isinstance(x, jax.ShapeDtypeStruct):
        return v.replace(jax.ShapeDtypeStruct(x.shape, dtype, sharding=x.sharding))
    return v.replace(x.astype(dtype))


@dataclasses.dataclass(frozen=True)
class Precision:
    """Which trainable leaves are fp32 masters, and the dtype each computes in: ((key path, dtype), ...).

    Empty (the default, and every LoRA run): the trainable state is what the model computes with.
    """

    compute: tuple[tuple[tuple, jnp.dtype], ...] = ()

    @property
    def mixed(self) -> bool:
        return bool(self.compute)

    def cast(self, trainable):
        """The compute copy of `trainable` (masters cast to their model dtype); `trainable` itself when not mixed."""
        if not self.compute:
            return trainable
        dtypes = dict(self.compute)
        return jax.tree_util.tree_map_with_path(
            lambda path, v: _with_dtype(v, dtypes[path]) if path in dtypes else v, trainable, is_leaf=_is_variable)

    def _sizes(self, trainable) -> list[tuple[int, jnp.dtype]]:
        dtypes = dict(self.compute)
        return [(math.prod(v.get_value().shape), dtypes[path])
                for path, v in jax.tree_util.tree_leaves_with_path(trainable, is_leaf=_is_variable) if path in dtypes]

    def compute_bytes(self, trainable) -> int:
        """Bytes of the compute copy the step makes of the masters (0 when not mixed)."""
        return sum(n * jnp.dtype(d).itemsize for n, d in self._sizes(trainable))

    def describe(self, trainable) -> str:
        """'N weights (M parameters) trained as fp32 masters of a bfloat16 compute copy', or '' when not mixed."""
        if not self.compute:
            return ""
        sizes = self._sizes(trainable)
        names = sorted({jnp.dtype(d).name for _, d in self.compute})
        return (f"{len(sizes)} weights ({sum(n for n, _ in sizes):,} parameters) trained as fp32 masters of a "
                f"{'/'.join(names)} compute copy")


def master_weights(trainable) -> tuple[object, Precision]:
    """(fp32 masters of `trainable`, the `Precision` that casts them back for the step).

    Every `nnx.Param` leaf with a floating dtype narrower than fp32 becomes fp32 (exact: bf16 and fp16
    widen without rounding); everything else (fp32 weights, LoRA adapters, the reward head, integer or
    quantised leaves) is returned as it is. Works on arrays and on abstract (`jax.eval_shape`) states.
    """
    compute = []

    def widen(path, v):
        if not isinstance(v, nnx.Param):
            return v
        dtype = jnp.dtype(v.get_value().dtype)
        if not jnp.issubdtype(dtype, jnp.floating) or dtype.itemsize >= MASTER_DTYPE.itemsize:
            return v
        compute.append((path, dtype))
        return _with_dtype(v, MASTER_DTYPE)

    masters = jax.tree_util.tree_map_with_path(widen, trainable, is_leaf=_is_variable)
    return masters, Precision(tuple(compute))


__all__ = ["MASTER_DTYPE", "Precision", "master_weights"]
