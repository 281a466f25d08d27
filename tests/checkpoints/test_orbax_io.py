"""Run checkpoints restore quietly into the live module's shardings (no Orbax "different topology" warning)."""

import logging
import warnings

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from pe_rlhf.checkpoints.orbax_io import RunCheckpointer


class Head(nnx.Module):
    def __init__(self, seed: int):
        self.head = nnx.Linear(8, 2, rngs=nnx.Rngs(seed))


def test_restore_module_uses_the_live_shardings_and_warns_nothing(tmp_path, caplog):
    saved = Head(seed=0)
    ckpt = RunCheckpointer(str(tmp_path / "checkpoints"), every=1)
    ckpt.save(3, {"trainable": nnx.state(saved, nnx.Param)}, {"step": 3})
    ckpt.close()

    # The restoring process lays the kernel over a 4 x 2 mesh: the saved (one-device) layout does not apply.
    live = Head(seed=1)
    mesh = Mesh(np.array(jax.devices()[:8]).reshape(4, 2), ("data", "model"))
    kernel_sharding = NamedSharding(mesh, PartitionSpec("data", "model"))
    live.head.kernel.value = jax.device_put(live.head.kernel.value, kernel_sharding)
    ckpt = RunCheckpointer(str(tmp_path / "checkpoints"))
    with warnings.catch_warnings(record=True) as caught, caplog.at_level(logging.WARNING):
        warnings.simplefilter("always")
        step = ckpt.restore_module(live, nnx.Param)
    ckpt.close()
    messages = [str(w.message) for w in caught] + [r.getMessage() for r in caplog.records]
    assert not [m for m in messages if "different topology" in m or "Sharding info not provided" in m], messages
    assert step == 3
    np.testing.assert_array_equal(live.head.kernel.value, saved.head.kernel.value)
    np.testing.assert_array_equal(live.head.bias.value, saved.head.bias.value)
    assert live.head.kernel.value.sharding == kernel_sharding
