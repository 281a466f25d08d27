"""Orbax checkpoints of a training run: trainable params, optimizer state, step, data position, RNG.

Only what trains is saved by default (the adapters and head in LoRA mode), so checkpoints are
megabytes; the frozen backbone is reloaded from its own checkpoint. Every process calls
`save`/`restore` together on multi-host runs (Orbax coordinates the writes).
"""

from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp


class RunCheckpointer:
    """Save every `every` steps, keep the last `keep`; restore the latest into a live template."""

    def __init__(self, directory: str, *, every: int = 100, keep: int = 3):
        self.directory = os.path.abspath(directory)
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=keep, save_interval_steps=every, create=True),
        )

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: Any, meta: dict, *, force: bool = False) -> bool:
        """`state`: a pytree of arrays (trainable, opt_state, rng); `meta`: JSON (data position...)."""
        saved = self.manager.save(
            step,
            args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
            force=force,
        )
        return bool(saved)

    def restore(self, template: Any, step: int | None = None) -> tuple[int, Any, dict]:
        """(step, state shaped like `template`, meta) of `step` or the latest checkpoint."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"{self.directory}: no checkpoint to restore")
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, template)
        restored = self.manager.restore(
            step,
            args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()),
        )
        # Orbax hands back containers of its own choosing (tuples for NamedTuples); put the leaves
        # back into the template's exact structure so optimizer states keep their types.
        leaves = jax.tree.leaves(restored["state"])
        state = jax.tree.unflatten(jax.tree.structure(template), leaves)
        return step, state, dict(restored["meta"])

    def restore_module(self, module, filter_, *, what: str = "run") -> int:
        """Load the latest checkpoint's `trainable` partition into `module`'s `filter_` variables, in place.

        The partition must have been saved from a module of the same structure (a reward-model or RL
        run's adapters and heads, or all parameters for a fully tuned one). Returns the step.
        """
        import orbax.checkpoint as ocp
        from flax import nnx

        step = self.latest_step()
        if step is None:
            raise FileNotFoundError(f"{self.directory}: no checkpoint; did the {what} run finish?")
        template = nnx.state(module, filter_)
        abstract = {"trainable": jax.tree.map(ocp.utils.to_shape_dtype_struct, template)}
        # Restore args with the live module's shardings: without them Orbax reads the saved ones, warning
        # that this is "unsafe when restoring on a different topology", on every RL start and resume.
        restored = self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
            abstract, restore_args=ocp.checkpoint_utils.construct_restore_args(abstract), partial_restore=True)))
        leaves = jax.tree.leaves(restored["state"]["trainable"])
        nnx.update(module, jax.tree.unflatten(jax.tree.structure(template), leaves))
        return step

    def wait(self):
        self.manager.wait_until_finished()

    def close(self):
        self.manager.wait_until_finished()
        self.manager.close()
