"""The real Gemma 3 270M (Q4_K_M GGUF): our loader, tokenizer and sampler against transformers' own GGUF path.

Both sides dequantize the same file to float32, so they must agree to float rounding.
"""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from pe_rlhf.checkpoints import from_pretrained

pytestmark = pytest.mark.real_model

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    if n < 2:\n        return n\n",
    "Hello  world,   <b>tags</b>\tand émojis 🎉 — naïve café, 東京は日本の首都です。",
]


@pytest.fixture(scope="module")
def ours(gemma_gguf_path):
    return from_pretrained(gemma_gguf_path)


@pytest.fixture(scope="module")
def reference(gemma_gguf_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    directory, name = os.path.split(gemma_gguf_path)
    model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=name, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(directory, gguf_file=name)


@pytest.fixture(scope="module")
def prompt_ids(reference):
    """Token ids of PROMPTS (BOS first) from the transformers tokenizer."""
    return [reference[1](p).input_ids for p in PROMPTS]


def _left_pad(rows, pad=0):
    t = max(map(len, rows))
    ids = np.full((len(rows), t), pad, np.int32)
    mask = np.zeros((len(rows), t), bool)
    for b, row in enumerate(rows):
        ids[b, t - len(row):] = row
        mask[b, t - len(row):] = True
    return jnp.asarray(ids), jnp.asarray(mask)


def test_config_matches(ours, reference):
    cfg, ref_cfg = ours[0].config, reference[0].config
    assert (cfg.family, cfg.num_layers, cfg.hidden_size, cfg.vocab_size) == ("gemma3", 18, 640, 262_144)
    assert (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim) == (4, 1, 256)
    assert cfg.num_layers == ref_cfg.num_hidden_layers and cfg.sliding_window == ref_cfg.sliding_window == 512
    assert [cfg.layer_is_sliding(i) for i in range(18)] == [t == "sliding_attention" for t in ref_cfg.layer_types]
    assert cfg.tie_word_embeddings and ours[0].lm_head is None


@pytest.mark.parametrize("text", PROMPTS + ["", "   leading and trailing   ", "a\n\n\nb  \u00a0 c"])
def test_tokenizer_matches_transformers(ours, reference, text):
    tokenizer, ref_tokenizer = ours[1], reference[1]
    ids = tokenizer(text).input_ids
    assert ids == ref_tokenizer(text).input_ids
    assert ids[0] == ours[0].config.bos_token_id == 2
    assert tokenizer.decode(ids, skip_special_tokens=True) == ref_tokenizer.decode(ids, skip_special_tokens=True)


def test_tokenizer_keeps_repeated_spaces_and_non_ascii(ours):
    """Gemma's vocabulary has tokens for runs of spaces; text decodes back exactly."""
    tokenizer = ours[1]
    for text in PROMPTS:
        ids = tokenizer(text).input_ids
        assert tokenizer.decode(ids[1:]) == text
    assert len(tokenizer("a    b").input_ids) < len(tokenizer("a b b b b").input_ids)


def test_logits_match_transformers(ours, reference, prompt_ids):
    model, ref = ours[0], reference[0]
    ids_BxT, mask_BxT = _left_pad(prompt_ids)  # one left-padded batch on our side
    logits_BxTxV = np.asarray(model(ids_BxT, input_mask_BxT=mask_BxT))
    t = ids_BxT.shape[1]
    for b, row in enumerate(prompt_ids):
        with torch.no_grad():
            expected_TxV = ref(torch.tensor([row])).logits[0].numpy()
        got_TxV = logits_BxTxV[b, t - len(row):]
        np.testing.assert_array_equal(got_TxV.argmax(-1), expected_TxV.argmax(-1))
        err = np.abs(got_TxV - expected_TxV).max()
        assert err < 1e-3, (b, err)  # measured ~6e-5 for logits of magnitude ~30
        assert np.abs(expected_TxV).max() > 10


def test_greedy_continuation_matches_generate(ours, reference, prompt_ids):
    from pe_rlhf.sampling import sample

    model, ref = ours[0], reference[0]
    rows = prompt_ids[:2]
    ids_BxT, mask_BxT = _left_pad(rows)
    out = sample(model, ids_BxT, mask_BxT, max_new_tokens=20, rng=jax.random.key(0), temperature=0.0,
                 eos_ids=tuple(model.config.eos_token_ids))
    for b, row in enumerate(rows):
        with torch.no_grad():
            generated = ref.generate(torch.tensor([row]), attention_mask=torch.ones(1, len(row), dtype=torch.long),
                                     do_sample=False, max_new_tokens=20)[0, len(row):].tolist()
        n = int(out.length_B[b])
        assert n >= 10, (n, generated)  # long enough to be a real test of the decode loop
        assert np.asarray(out.tokens_BxN[b, :n]).tolist() == generated
        assert np.asarray(out.mask_BxN[b]).tolist() == [True] * n + [False] * (20 - n)


def test_packed_pairs_score_like_padded_ones(ours, shared_data):
    """Real HH pairs, packed `[prompt | chosen | rejected]` with the prompt once, score as padded rows do."""
    from pe_rlhf import data as D
    from pe_rlhf.data import packing as PK
    from pe_rlhf.data.named import named_dataset
    from pe_rlhf.models.heads import RewardModel

    model, tokenizer = ours
    rm = RewardModel(model)
    rm.head.kernel[...] = jnp.asarray(np.random.default_rng(0).normal(size=rm.head.kernel.shape) / 30, jnp.float32)
    examples = list(named_dataset("hh_harmless").examples[:3])
    pairs, _ = D.tokenize_preferences(examples, tokenizer, D.TokenizeOptions(max_prompt_len=96, max_response_len=32))
    packed = rm.score_packed(jax.tree.map(jnp.asarray, PK.pack(pairs, PK.PackOptions(1, 512, 3))), PK.span(96, 32, 2))
    padded = D.batch_preferences(pairs, seq_len=128)
    chosen = rm(jnp.asarray(padded["chosen_tokens_BxT"]), jnp.asarray(padded["chosen_mask_BxT"]))
    rejected = rm(jnp.asarray(padded["rejected_tokens_BxT"]), jnp.asarray(padded["rejected_mask_BxT"]))
    np.testing.assert_allclose(packed[0, :, 0], chosen, atol=2e-4, rtol=1e-4)
    np.testing.assert_allclose(packed[0, :, 1], rejected, atol=2e-4, rtol=1e-4)
    assert np.abs(np.asarray(chosen) - np.asarray(rejected)).max() > 1e-3
