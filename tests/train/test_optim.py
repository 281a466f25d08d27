"""The optimizer: the reward head's own learning rate."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from pe_rlhf.models.heads import RewardModel
from pe_rlhf.models.tiny import tiny_model
from pe_rlhf.train.optim import OptimizerConfig, make_optimizer


def test_head_learning_rate_applies_to_the_head_only():
    """Adam's first step moves every parameter by its learning rate (sign of the gradient): 1e-5 vs 1e-2."""
    backbone, _ = tiny_model("llama")
    graphdef, params = nnx.split(RewardModel(backbone), nnx.Param)
    tx = make_optimizer(OptimizerConfig(learning_rate=1e-5, head_learning_rate=1e-2, schedule="constant",
                                        max_grad_norm=None, eps=1e-12))
    grads = jax.tree.map(lambda x: jnp.ones_like(x), params)
    updates, _ = tx.update(grads, tx.init(params), params)
    flat = dict(nnx.to_flat_state(updates))
    head = [np.abs(np.asarray(v.get_value())) for k, v in flat.items() if k[0] == "head"]
    body = [np.abs(np.asarray(v.get_value())) for k, v in flat.items() if k[0] != "head"]
    assert len(head) == 2 and len(body) > 10
    np.testing.assert_allclose(np.concatenate([h.ravel() for h in head]), 1e-2, rtol=1e-5)
    np.testing.assert_allclose(np.concatenate([b.ravel() for b in body]), 1e-5, rtol=1e-5)
    plain = make_optimizer(OptimizerConfig(learning_rate=1e-5, schedule="constant", max_grad_norm=None))
    same = plain.update(grads, plain.init(params), params)[0]
    np.testing.assert_allclose(np.asarray(jax.tree.leaves(same)[0]), -1e-5, rtol=1e-3)
