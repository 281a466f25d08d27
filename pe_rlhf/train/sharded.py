"""Every train step on a mesh: shardings from logical axes, explicit in/out shardings, donated state.

The steps in `supervised_steps.py` and `policy.py` are pure functions of
`(trainable, opt_state, frozen, *rest)` and name no device. `ShardedStep` is the
one place where they meet a mesh:

- trainable and frozen parameters are placed by their `logical_axes` through the
  rule table (`sharding.rules`); LoRA adapters carry ('embed', 'lora_rank') and the like;
- Optax state: moments (mu, nu, accumulated gradients...) are `nnx.Variable`s with
  the parameters' metadata, because Optax maps over the nnx.State, so they shard
  exactly like their parameters; scalars (count, skipped-step counters) are replicated;
- the batch is split along dimension 0 over the data-parallel axes ('batch' rule);
  carried scalars (ReMax/REINFORCE baseline), the PRNG key and the metrics are replicated.

It checks the mesh and every placement before tracing (a mesh that does not fit the
devices, a rule table that leaves a parameter unplaced, a batch the data axes do not
divide are errors here), compiles once for the example arguments, and runs the
compiled program with the trainable and optimizer state donated.

    step = sharded_train_step(MeshConfig(data=2, fsdp=4), graphdef=g, tx=tx, loss_fn=loss, trainable=tr,
                              opt_state=jax.eval_shape(tx.init, tr), frozen=fr, batch=example)
    tr, _, fr = step.place(tr, None, fr)
    opt = step.init_opt_state(tx, tr)         # Adam moments created where they live
    print(step.memory())                      # per-device memory at run start
    tr, opt, metrics = step(tr, opt, fr, batch)
"""

from __future__ import annotations

import dataclasses
import functools
import math
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from pe_rlhf.sharding.memory import MemoryReport, compiled_memory, format_bytes
from pe_rlhf.sharding.mesh import MeshConfig, make_mesh
from pe_rlhf.sharding.rules import (
    DEFAULT_RULES,
    Rules,
    ShardingFallbackWarning,
    ShardingRuleError,
    activation_rules,
    batch_shardings,
    named_sharding,
    state_shardings,
)
from pe_rlhf.train.policy import RLConfig, rl_step
from pe_rlhf.train.precision import Precision
from pe_rlhf.train.supervised_steps import train_step

# How each argument after (trainable, opt_state, frozen) is placed.
BATCH, REPLICATED = "batch", "replicated"


def _is_variable(x) -> bool:
    return isinstance(x, nnx.Variable)


def _shape(x) -> tuple[int, ...]:
    return tuple((x.get_value() if _is_variable(x) else x).shape)


def opt_state_shardings(opt_state: Any, mesh: Mesh, rules: Rules = DEFAULT_RULES) -> Any:
    """NamedShardings laid out like an Optax state over an nnx.State of trainable parameters.

    Moments are Variables carrying their parameter's `logical_axes`, so they get the parameter's
    sharding; scalars are replicated; any other array (an optimizer that drops the Variable
    wrappers) is replicated with a `ShardingFallbackWarning` naming it.
    """
    replicated = NamedSharding(mesh, PartitionSpec())

    def place(path, leaf):
        where = f"optimizer state{jax.tree_util.keystr(path)}"
        if _is_variable(leaf) and isinstance(leaf.get_value(), optax.MaskedNode):
            return leaf  # a parameter another branch of optax.multi_transform owns: no array here
        if _is_variable(leaf):
            axes = leaf.get_metadata().get("logical_axes")
            shape = _shape(leaf)
            if axes is None and not shape:
                return leaf.replace(replicated)
            if axes is None or len(axes) != len(shape):
                raise ShardingRuleError(
                    f"{where} ({type(leaf).__name__}, shape {shape}) has logical_axes {axes}, which do not name "
                    f"its {len(shape)} dimensions; its parameter needs nnx.Param(..., logical_axes=(...))")
            return leaf.replace(named_sharding(mesh, axes, shape, rules, where=where))
        if len(_shape(leaf)) == 0:
            return replicated
        warnings.warn(f"{where} (shape {_shape(leaf)}) carries no logical axes; replicating it",
                      ShardingFallbackWarning, stacklevel=2)
        return replicated

    return jax.tree_util.tree_map_with_path(place, opt_state, is_leaf=_is_variable)


def _mesh(mesh: Mesh | MeshConfig | None) -> Mesh:
    """A Mesh as given, built from a MeshConfig, or (None) the first device alone."""
    if mesh is None:
        return make_mesh(MeshConfig(data=1), jax.devices()[:1])
    return mesh if isinstance(mesh, Mesh) else make_mesh(mesh)


def _global_batch(batch):
    """The global batch's shapes from one process's batch: `batch_size` rows per process (data.BatchIterator)."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct((x.shape[0] * jax.process_count(), *x.shape[1:]), x.dtype)
                        if len(x.shape) else jax.ShapeDtypeStruct((), x.dtype), batch)


def _put(tree, shardings):
    """`tree` on `shardings`, moving only the leaves that are not there yet."""
    return jax.tree.map(lambda x, sh: x if isinstance(x, jax.Array) and x.sharding == sh else jax.device_put(x, sh),
                        tree, shardings)


def _abstract(tree, shardings):
    """ShapeDtypeStructs with shardings, laid out like `tree` (Variable wrappers kept)."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def _slice_len(s: slice, dim: int) -> int:
    return len(range(*s.indices(dim)))


def _itemsize(dtype) -> int:
    return 8 if jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key) else jnp.dtype(dtype).itemsize  # threefry key: 2 x u32


def bytes_by_device(tree) -> dict[int, int]:
    """Bytes of `tree` each local device holds (leaves: placed arrays or ShapeDtypeStructs with shardings)."""
    held: dict[int, int] = {}
    for x in jax.tree.leaves(tree):
        itemsize = _itemsize(x.dtype)
        for device, index in x.sharding.addressable_devices_indices_map(x.shape).items():
            held[device.id] = held.get(device.id, 0) + itemsize * math.prod(
                _slice_len(s, n) for s, n in zip(index, x.shape))
    return held


@dataclasses.dataclass(frozen=True)
class StepMemory:
    """Per-device memory of a sharded step at run start.

    `compiled` is XLA's buffer assignment for one device of the compiled step (every
    device runs the same program); `state_bytes` is what each local device holds of
    trainable + optimizer + frozen state (by device id), `total_state_bytes` the
    same state unsharded; `limit_bytes` the smallest memory limit among the local
    devices where the backend reports one (not on CPU).
    """

    mesh_shape: dict[str, int]
    compiled: MemoryReport
    state_bytes: dict[int, int]
    total_state_bytes: int
    limit_bytes: int | None = None

    @property
    def fits(self) -> bool | None:
        return None if self.limit_bytes is None else self.compiled.peak_bytes <= self.limit_bytes

    def __str__(self) -> str:
        mesh = " ".join(f"{k}={v}" for k, v in self.mesh_shape.items())
        held = sorted(self.state_bytes.values())
        state = format_bytes(held[-1]) if held[0] == held[-1] else f"{format_bytes(held[0])}-{format_bytes(held[-1])}"
        limit = "" if self.limit_bytes is None else (
            f"; limit {format_bytes(self.limit_bytes)} ({'fits' if self.fits else 'DOES NOT FIT'})")
        c = self.compiled
        return (f"mesh {mesh}, {len(held)} local devices: state {state} per device (of "
                f"{format_bytes(self.total_state_bytes)} unsharded); step peak {format_bytes(c.peak_bytes)} per "
                f"device = arguments {format_bytes(c.argument_bytes)} + outputs {format_bytes(c.output_bytes)} "
                f"+ temporaries {format_bytes(c.temp_bytes)} - aliased {format_bytes(c.alias_bytes)}{limit}")


def _device_limit() -> int | None:
    limits = []
    for d in jax.local_devices():
        stats = d.memory_stats()
        if not stats or "bytes_limit" not in stats:
            return None
        limits.append(int(stats["bytes_limit"]))
    return min(limits) if limits else None


@dataclasses.dataclass(frozen=True)
class StepShardings:
    """The NamedShardings of a step's arguments (trees shaped like the arguments)."""

    trainable: Any
    opt_state: Any
    frozen: Any
    rest: tuple  # one tree per argument after `frozen`


def step_shardings(mesh: Mesh, *, trainable, opt_state, frozen, rest: Sequence[Any], placement: Sequence[str],
                   rules: Rules = DEFAULT_RULES) -> StepShardings:
    """Where a step's arguments live on `mesh`: trainable and frozen parameters by their logical axes (a
    parameter no rule can place is an error), optimizer moments like their parameters, each of `rest` split
    along dimension 0 over the data axes (BATCH; a global batch) or replicated (REPLICATED)."""
    replicated = NamedSharding(mesh, PartitionSpec())
    return StepShardings(
        trainable=state_shardings(trainable, mesh, rules),
        opt_state=opt_state_shardings(opt_state, mesh, rules),
        frozen=state_shardings(frozen, mesh, rules),
        rest=tuple(batch_shardings(x, mesh, rules) if p == BATCH else jax.tree.map(lambda _: replicated, x)
                   for x, p in zip(rest, placement)),
    )


class ShardedStep:
    """`fn(trainable, opt_state, frozen, *rest) -> (trainable, opt_state, *carried, metrics)` on a mesh.

    `mesh` is a Mesh, a MeshConfig (checked against the devices here) or None (the first device
    alone). `trainable`, `opt_state`, `frozen` and `rest` are examples, real arrays or abstract
    (`nnx.eval_shape` / `jax.eval_shape`): only shapes, dtypes and metadata are read.
    `placement` says how each of `rest` is placed (BATCH or REPLICATED); a BATCH example
    is one process's batch (`batch_size` rows per host, as `data.BatchIterator` yields),
    and the step runs on the global batch of every process's rows. `num_outputs` is the
    length of the tuple `fn` returns (every output after the optimizer state is
    replicated). Trainable and optimizer state are donated.

    The step is compiled once, for the examples' shapes (`compiled`); a call with other
    shapes is an error from the compiled program, not a silent recompilation.
    """

    def __init__(self, fn: Callable, *, mesh: Mesh | MeshConfig | None, trainable, opt_state, frozen,
                 rest: Sequence[Any], placement: Sequence[str], num_outputs: int,
                 rules: Rules = DEFAULT_RULES, donate: bool = True):
        if len(rest) != len(placement) or any(p not in (BATCH, REPLICATED) for p in placement):
            raise ValueError(f"ShardedStep: placement {tuple(placement)} must name {BATCH!r} or {REPLICATED!r} "
                             f"for each of the {len(rest)} arguments after frozen")
        self.mesh = _mesh(mesh)  # MeshError before anything else
        self.rules = tuple(rules)
        self.placement = tuple(placement)
        self.replicated = NamedSharding(self.mesh, PartitionSpec())
        rest = tuple(_global_batch(x) if p == BATCH else x for x, p in zip(rest, placement))
        self.shardings = step_shardings(self.mesh, trainable=trainable, opt_state=opt_state, frozen=frozen, rest=rest,
                                        placement=self.placement, rules=self.rules)
        s = self.shardings
        in_shardings = (s.trainable, s.opt_state, s.frozen, *s.rest)
        out_shardings = (s.trainable, s.opt_state) + (self.replicated,) * (num_outputs - 2)
        self.jitted = jax.jit(fn, in_shardings=in_shardings, out_shardings=out_shardings,
                              donate_argnums=(0, 1) if donate else ())
        self._abstract_args = tuple(_abstract(x, sh) for x, sh in zip((trainable, opt_state, frozen, *rest),
                                                                      in_shardings))

    @functools.cached_property
    def compiled(self) -> jax.stages.Compiled:
        """The step compiled for the example arguments' shapes (once; calls reuse it)."""
        # traced under the mesh: activations are placed by the rules (sharding.rules.constrain) and fused
        # kernels run per device (models.attention), as in the AOT plans
        with jax.set_mesh(self.mesh), activation_rules(self.rules):
            return self.jitted.lower(*self._abstract_args).compile()

    def place(self, trainable, opt_state, frozen):
        """(trainable, opt_state, frozen) on the mesh, `jax.device_put` by the computed shardings.

        An argument given as None stays None (e.g. an optimizer state `init_opt_state` will create).
        """
        s = self.shardings
        return tuple(None if x is None else jax.device_put(x, sh)
                     for x, sh in zip((trainable, opt_state, frozen), (s.trainable, s.opt_state, s.frozen)))

    def init_opt_state(self, tx: optax.GradientTransformation, trainable):
        """`tx.init(trainable)` computed on the mesh, each moment created where it lives."""
        return jax.jit(tx.init, in_shardings=(self.shardings.trainable,), out_shardings=self.shardings.opt_state)(
            trainable)

    def place_batch(self, batch, index: int | None = None):
        """This process's rows of a batch as global arrays on the mesh (jax.make_array_from_process_local_data).

        `index` is the batch's position among the arguments after frozen (default: the first batch).
        """
        sharding = self.shardings.rest[self.placement.index(BATCH) if index is None else index]
        got, want = jax.tree.structure(batch), jax.tree.structure(sharding)
        if got != want:
            raise ValueError(f"ShardedStep: the batch is laid out as {got} but the step was built for an example "
                             f"laid out as {want}; build the step from a batch of the same kind (the same keys)")
        return jax.tree.map(lambda x, sh: x if isinstance(x, jax.Array) and x.sharding == sh else
                            jax.make_array_from_process_local_data(sh, np.asarray(x)), batch, sharding)

    def __call__(self, trainable, opt_state, frozen, *rest):
        """One step. Trainable, optimizer and frozen state must be `place`d; batches may be this process's
        NumPy rows or global arrays on the mesh; carried scalars and the PRNG key are replicated here."""
        rest = tuple(self.place_batch(x, i) if p == BATCH else _put(x, self.shardings.rest[i])
                     for i, (x, p) in enumerate(zip(rest, self.placement)))
        return self.compiled(trainable, opt_state, frozen, *rest)

    def memory(self) -> StepMemory:
        """Per-device memory of the compiled step and of the state each local device holds."""
        state = self._abstract_args[:3]
        total = sum(math.prod(x.shape) * _itemsize(x.dtype) for x in jax.tree.leaves(state))
        return StepMemory(mesh_shape=dict(self.mesh.shape), compiled=compiled_memory(self.compiled),
                          state_bytes=bytes_by_device(state), total_state_bytes=int(total),
                          limit_bytes=_device_limit())


# -- the steps ------------------------------------------------------------------------------------
def sharded_train_step(mesh: Mesh | MeshConfig | None, *, graphdef, tx: optax.GradientTransformation,
                       loss_fn: Callable, trainable, opt_state, frozen, batch,
                       rules: Rules = DEFAULT_RULES, precision: Precision = Precision()) -> ShardedStep:
    """`supervised_steps.train_step` (reward model, SFT, DPO) on `mesh`:
    `step(trainable, opt_state, frozen, batch) -> (trainable, opt_state, metrics)`. With a mixed `precision`
    (`precision.master_weights`) `trainable` is the fp32 masters, cast to the model dtype inside the step."""

    def step(trainable, opt_state, frozen, batch):
        return train_step(trainable, opt_state, frozen, batch, graphdef=graphdef, tx=tx, loss_fn=loss_fn,
                          precision=precision)

    return ShardedStep(step, mesh=mesh, trainable=trainable, opt_state=opt_state, frozen=frozen, rest=(batch,),
                       placement=(BATCH,), num_outputs=3, rules=rules)


def sharded_rl_step(mesh: Mesh | MeshConfig | None, *, graphdef, tx: optax.GradientTransformation, cfg: RLConfig,
                    trainable, opt_state, frozen, rl_state, batch, reward_fn: Callable | None,
                    eos_ids: tuple[int, ...], pad_id: int, rng=None, rules: Rules = DEFAULT_RULES,
                    precision: Precision = Precision()) -> ShardedStep:
    """`policy.rl_step` (REINFORCE, ReMax, RLOO, GRPO, PPO) on `mesh`:
    `step(trainable, opt_state, frozen, rl_state, batch, rng) -> (trainable, opt_state, rl_state, metrics)`.

    Prompts are split over the data axes; the PRNG key is replicated, so with JAX's partitionable
    threefry (`jax_threefry_partitionable`, on by default) every mesh draws the same random numbers.
    A mixed `precision` is as for `sharded_train_step`.
    """

    def step(trainable, opt_state, frozen, rl_state, batch, rng):
        return rl_step(trainable, opt_state, frozen, rl_state, batch, rng, graphdef=graphdef, tx=tx, cfg=cfg,
                       reward_fn=reward_fn, eos_ids=tuple(eos_ids), pad_id=pad_id, precision=precision)

    rng = jax.eval_shape(lambda: jax.random.key(0)) if rng is None else rng
    return ShardedStep(step, mesh=mesh, trainable=trainable, opt_state=opt_state, frozen=frozen,
                       rest=(rl_state, batch, rng), placement=(REPLICATED, BATCH, REPLICATED), num_outputs=4,
                       rules=rules)


__all__ = ["BATCH", "REPLICATED", "ShardedStep", "StepMemory", "StepShardings", "bytes_by_device",
           "opt_state_shardings", "sharded_rl_step", "sharded_train_step", "step_shardings"]
