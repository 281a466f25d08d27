"""`stream` (one compiled call per token) gives the tokens `sample` (one while_loop) gives."""

import jax
import numpy as np
import pytest
from flax import nnx

from pe_rlhf.models import ModelConfig, Transformer
from pe_rlhf.sampling import sample, stream

CFG = ModelConfig(family="gemma3", vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=2,
                  num_kv_heads=1, head_dim=16, sliding_window=3, layer_types=("sliding_attention", "full_attention"),
                  qk_norm=True, eos_token_ids=(5,), pad_token_id=0, initializer_range=0.3)
PROMPT = [7, 8, 9, 10, 11]


@pytest.fixture(scope="module")
def model():
    return Transformer(CFG, rngs=nnx.Rngs(2))


def _sampled(model, temperature, seed, eos_ids=()):
    out = sample(model, np.asarray([PROMPT]), rng=jax.random.key(seed), max_new_tokens=12, temperature=temperature,
                 top_p=0.9 if temperature else None, eos_ids=eos_ids)
    return np.asarray(out.tokens_BxN[0])[np.asarray(out.mask_BxN[0])].tolist()


@pytest.mark.parametrize("bucket", [1, 8])  # no padding, and a prompt left-padded to 8
@pytest.mark.parametrize("temperature,seed", [(0.0, 0), (1.0, 3)])
def test_stream_gives_the_tokens_of_sample(model, bucket, temperature, seed):
    got = list(stream(model, PROMPT, rng=jax.random.key(seed), max_new_tokens=12, temperature=temperature,
                      top_p=0.9 if temperature else None, eos_ids=(), bucket=bucket))
    assert got == _sampled(model, temperature, seed)


def test_stream_yields_the_first_eos_and_stops(model):
    free = _sampled(model, 0.0, 0)
    eos = free[3]  # the fourth greedy token, taken as EOS: the stream ends there, as sample's mask does
    got = list(stream(model, PROMPT, max_new_tokens=12, temperature=0.0, eos_ids=(eos,)))
    assert got == free[:free.index(eos) + 1] == _sampled(model, 0.0, 0, eos_ids=(eos,))
