"""The full-size presets (memory plans and benchmarks build them from shapes alone) have the published sizes."""

import math

import jax
import pytest
from flax import nnx

from pe_rlhf.models import PRESETS, Transformer

# Parameter counts of the released checkpoints (text decoder only; Gemma 3 4B's vision tower is not counted).
PUBLISHED = {
    "gemma3-270m": 268_098_176,
    "gemma3-1b": 999_885_952,
    "llama3-8b": 8_030_261_248,
    "llama3-70b": 70_553_706_496,
    "qwen2.5-0.5b": 494_032_768,
    "qwen3-0.6b": 596_049_920,
}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_preset_has_the_published_parameter_count(name):
    model = nnx.eval_shape(lambda: Transformer(PRESETS[name], rngs=nnx.Rngs(0)))
    assert sum(math.prod(x.shape) for x in jax.tree.leaves(nnx.state(model, nnx.Param))) == PUBLISHED[name]
