"""Our decoder against the transformers reference on tiny random checkpoints, one per family.

Each checkpoint goes through `save_pretrained` and `pe_rlhf.checkpoints.from_pretrained`, so the
config reading, the name table and the kernel orientation are all under test, not just the math.
"""

import os

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from pe_rlhf.checkpoints.hf import state_dict
from pe_rlhf.checkpoints import from_pretrained
from tests.models.helpers import FAMILIES, hf_config, hf_logits, left_padded_batch, random_hf_model

# Row 0 is full; rows 1 and 2 are left-padded. T=10 is longer than gemma3's sliding window of 4.
LENGTHS, T = [10, 7, 2], 10
SHARDED = {"llama", "qwen3"}  # saved with max_shard_size="20KB": loaded through model.safetensors.index.json


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def checkpoint(request, tmp_path_factory):
    """(model_type, HF reference model, checkpoint directory, our model loaded from it)."""
    model_type = request.param
    ref = random_hf_model(hf_config(model_type), seed=len(model_type))
    directory = str(tmp_path_factory.mktemp(model_type))
    ref.save_pretrained(directory, **({"max_shard_size": "20KB"} if model_type in SHARDED else {}))
    model, tokenizer = from_pretrained(directory)
    assert tokenizer is None  # save_pretrained of a bare model writes no tokenizer
    return model_type, ref, directory, model


def _ours_logits(model, ids, mask):
    return np.asarray(model(jnp.asarray(ids), input_mask_BxT=jnp.asarray(mask)))


def test_checkpoint_layout(checkpoint):
    model_type, _, directory, _ = checkpoint
    files = sorted(f for f in os.listdir(directory) if f.endswith(".safetensors"))
    if model_type in SHARDED:
        assert os.path.exists(os.path.join(directory, "model.safetensors.index.json"))
        assert len(files) > 3, files  # so loading really walks several shards
    else:
        assert files == ["model.safetensors"]


def test_logits_match_reference(checkpoint):
    model_type, ref, _, model = checkpoint
    ids, mask = left_padded_batch(seed=1, lengths=LENGTHS, total=T)
    expected = hf_logits(ref, ids, mask)
    got = _ours_logits(model, ids, mask)
    assert got.shape == expected.shape == (len(LENGTHS), T, 128)
    real = mask.astype(bool)
    err = np.abs(got - expected)[real].max()
    assert err < 1e-4, (model_type, err)
    # The comparison is not vacuous: logits differ across positions by far more than the tolerance.
    assert np.abs(expected[real] - expected[real].mean(0)).max() > 1e-2


def test_family_switches_were_read(checkpoint):
    """The config switches each family exercises reach our ModelConfig (GQA, rope, bias, norms, window)."""
    model_type, ref, _, model = checkpoint
    cfg = model.config
    assert (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.num_layers) == (4, 2, 16, 3)
    if model_type == "llama":
        assert (cfg.rope.kind, cfg.rope.factor, cfg.rope.original_max_position_embeddings) == ("llama3", 8.0, 64)
    if model_type == "qwen2":
        assert cfg.qkv_bias and not cfg.o_bias
        bias = model.layers[1].attn.k_proj.bias[...]
        np.testing.assert_array_equal(np.asarray(bias), ref.model.layers[1].self_attn.k_proj.bias.detach().numpy())
    assert cfg.qk_norm == (model_type in ("qwen3", "gemma3_text"))
    if model_type == "gemma3_text":
        assert cfg.sliding_window == 4
        assert [cfg.layer_is_sliding(i) for i in range(3)] == [True, True, False]
        assert (cfg.local_rope.theta, cfg.rope.theta) == (100.0, 1_000_000.0)
    else:
        assert cfg.sliding_window is None


def test_tied_and_untied_embeddings(checkpoint):
    model_type, ref, _, model = checkpoint
    tied = ref.config.tie_word_embeddings
    assert model.config.tie_word_embeddings == tied
    embedding = ref.model.embed_tokens.weight.detach().numpy()
    np.testing.assert_array_equal(np.asarray(model.embedding[...]), embedding)
    if tied:
        assert model.lm_head is None
    else:
        head = ref.lm_head.weight.detach().numpy()
        assert np.abs(head - embedding).max() > 1e-2  # a separate head, not a copy
        np.testing.assert_array_equal(np.asarray(model.lm_head.kernel[...]), head.T)


def test_every_parameter_round_trips(checkpoint):
    """state_dict(model) gives back the reference state dict exactly, under HF names and orientation."""
    _, ref, _, model = checkpoint
    ours = state_dict(model)
    theirs = {k: v.detach().numpy() for k, v in ref.state_dict().items()}
    if ref.config.tie_word_embeddings:
        theirs.pop("lm_head.weight", None)
    assert set(ours) == set(theirs)
    for name, value in theirs.items():
        np.testing.assert_array_equal(ours[name], value, err_msg=name)


@pytest.mark.parametrize("model_type", ["llama", "gemma3_text"])
def test_bfloat16_parameters(model_type, tmp_path):
    ref = random_hf_model(hf_config(model_type), seed=3)
    ref.save_pretrained(tmp_path)
    model32, _ = from_pretrained(str(tmp_path))
    model16, _ = from_pretrained(str(tmp_path), dtype=jnp.bfloat16)

    dtypes = {str(v.get_value().dtype) for _, v in nnx.to_flat_state(nnx.state(model16, nnx.Param))}
    assert dtypes == {"bfloat16"}
    # Each parameter is the float32 one rounded to bfloat16 (same rounding as torch's cast).
    params16 = state_dict(model16)
    for name, value in ref.state_dict().items():
        if name in params16:
            expected = value.detach().to(torch.bfloat16).float().numpy()
            np.testing.assert_array_equal(params16[name].astype(np.float32), expected, err_msg=name)

    ids, mask = left_padded_batch(seed=2, lengths=LENGTHS, total=T)
    real = mask.astype(bool)
    logits32 = _ours_logits(model32, ids, mask)
    logits16 = _ours_logits(model16, ids, mask)
    assert logits16.dtype == np.float32
    err = np.abs(logits16 - logits32)[real].max()
    scale = np.abs(logits32[real]).max()
    # bfloat16 keeps 8 mantissa bits (relative step 2^-8 ~ 0.4%): a few steps across 3 layers.
    assert err < 0.03 * scale, (err, scale)
    assert err > 0  # the computation really ran in bfloat16
    assert (logits16.argmax(-1) == logits32.argmax(-1))[real].mean() >= 0.75
