"""The optimizer: a schedule as long as the run; the reward head's own learning rate; updates skipped for a
non-finite loss or gradient."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from pe_rlhf.models.heads import RewardModel
from pe_rlhf.models.tiny import tiny_model
import pytest

from pe_rlhf.train.optim import (OptimizerConfig, guard_nonfinite, guarded_update, learning_rate_schedule,
                                 make_optimizer, nonfinite_updates)


def test_the_schedule_decays_over_the_run_unless_total_steps_is_set():
    run = learning_rate_schedule(OptimizerConfig(learning_rate=1.0, warmup_steps=2), num_steps=12)
    assert [float(run(s)) for s in (0, 1, 2, 7, 12)] == pytest.approx([0.0, 0.5, 1.0, 0.5, 0.0])
    linear = learning_rate_schedule(OptimizerConfig(learning_rate=1.0, schedule="linear"), num_steps=4)
    assert [float(linear(s)) for s in range(5)] == pytest.approx([1.0, 0.75, 0.5, 0.25, 0.0])
    longer = learning_rate_schedule(OptimizerConfig(learning_rate=1.0, total_steps=20), num_steps=10)
    assert float(longer(10)) == pytest.approx(0.5)  # set: half-way through its own 20 at the run's end
    constant = learning_rate_schedule(OptimizerConfig(learning_rate=1.0, schedule="constant", warmup_steps=2))
    assert [float(constant(s)) for s in (0, 1, 2, 500)] == pytest.approx([0.0, 0.5, 1.0, 1.0])  # no length needed
    with pytest.raises(ValueError, match=r"total_steps=None\): the schedule decays over the run.*pass num_steps"):
        make_optimizer(OptimizerConfig())


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


def test_an_update_is_skipped_when_its_loss_or_its_gradient_norm_is_not_finite():
    tx = guard_nonfinite(make_optimizer(OptimizerConfig(learning_rate=0.5, schedule="constant")))
    params = {"w": jnp.array([1.0, 2.0])}
    opt_state = tx.init(params)
    cases = [(jnp.nan, [0.1, 0.1]),  # a NaN loss with a finite gradient (0 * inf in a loss term)
             (jnp.inf, [0.1, 0.1]),
             (1.0, [3e19, 3e19]),  # finite entries whose norm overflows float32
             (1.0, [jnp.nan, 0.1])]
    for k, (loss, g) in enumerate(cases, start=1):
        new, opt_state = guarded_update(tx, {"w": jnp.array(g)}, opt_state, params, jnp.float32(loss))
        np.testing.assert_array_equal(np.asarray(new["w"]), [1.0, 2.0])
        assert nonfinite_updates(opt_state) == (k, k)
    new, opt_state = guarded_update(tx, {"w": jnp.array([0.1, -0.1])}, opt_state, params, jnp.float32(1.0))
    np.testing.assert_allclose(np.asarray(new["w"]), [0.5, 2.5], rtol=1e-5)  # Adam's first step: lr * sign
    assert nonfinite_updates(opt_state) == (0, 4)
