"""The windowed SFT loss (vocabulary projection only where responses are) equals the full one."""


import jax
import numpy as np
import pytest

from pe_rlhf import data as D
from pe_rlhf.models.tiny import tiny_model
from pe_rlhf.train import supervised_steps


@pytest.mark.parametrize("padding", ["right", "left"])
def test_windowed_sft_loss_equals_full(padding):
    model, _ = tiny_model("llama")
    rng = np.random.default_rng(0)
    examples = [D.TokenizedSFT(tuple(rng.integers(3, 90, size=p)), tuple(rng.integers(3, 90, size=r)))
                for p, r in ((5, 7), (11, 3), (2, 12), (9, 1))]
    batch = D.batch_sft(examples, seq_len=24, pad_id=0, padding=padding)
    full, full_metrics = supervised_steps.sft_loss(model, batch)
    windowed, metrics = supervised_steps.sft_loss(model, batch, response_window=12)
    np.testing.assert_allclose(float(windowed), float(full), rtol=1e-5)
    assert float(metrics["tokens"]) == float(full_metrics["tokens"]) == 7 + 3 + 12 + 1
    # and the gradients match
    from flax import nnx
    graphdef, state = nnx.split(model)
    loss = lambda s, **kw: supervised_steps.sft_loss(nnx.merge(graphdef, s), batch, **kw)[0]  # noqa: E731
    grad = lambda **kw: jax.grad(lambda s: loss(s, **kw))(state)  # noqa: E731
    for a, b in zip(jax.tree.leaves(grad()), jax.tree.leaves(grad(response_window=12))):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)
