"""Step builders with a quantised frozen backbone and a fused attention kernel: argument bytes counted by
hand, AOT compiles for a v5e slice (the splash kernel lowered as Mosaic), and the refusal to quantise what
trains (tiny llama, bf16 frozen weights)."""

import functools
import importlib.util

import jax
import pytest

from pe_rlhf.models import lora
from pe_rlhf.models.quant import QuantizedWeight
from pe_rlhf.models.tiny import tiny_config
from pe_rlhf.profiling.measure import compile_step
from pe_rlhf.profiling.step_builders import build_rl_step, build_rm_step
from pe_rlhf.sharding.memory import compiled_memory
from pe_rlhf.train.config import TuningConfig

pytestmark = pytest.mark.slow  # quantised steps of 256 tokens compiled, for the CPU and for a TPU

needs_libtpu = pytest.mark.skipif(
    importlib.util.find_spec("libtpu") is None,
    reason=f'libtpu is not installed; AOT TPU compilation needs: pip install "jax[tpu]=={jax.__version__}"',
)

CFG = tiny_config("llama")  # V=100, D=64, 2 layers, q/o 64x64, k/v 64x32, gate/up 64x128, down 128x64, tied
LORA4 = TuningConfig(mode="lora", lora=lora.LoRAConfig(rank=4, alpha=8.0))
FULL = TuningConfig(mode="full")
BF16 = 2

# Hand count. Projection weights per layer, and the weights that stay dense (embedding, 2 norms per layer, final).
PROJ = 64 * 64 + 2 * 64 * 32 + 64 * 64 + 2 * 64 * 128 + 128 * 64  # 36,864
DENSE = 100 * 64 + 2 * 2 * 64 + 64  # 6,720
BF16_FROZEN = (DENSE + 2 * PROJ) * BF16  # 160,896
# nf4: half a byte per weight, one bf16 scale per 64 inputs of each output column (down: 128 inputs, 2 blocks)
NF4_SCALES = ((64 + 32 + 32 + 64 + 128 + 128) * 1 + 64 * 2) * BF16  # 1,152 per layer
NF4_FROZEN = DENSE * BF16 + 2 * (PROJ // 2 + NF4_SCALES)  # 52,608
# int8: a byte per weight, one fp32 scale per output column
INT8_FROZEN = DENSE * BF16 + 2 * (PROJ + (64 + 32 + 32 + 64 + 128 + 128 + 64) * 4)  # 91,264
REWARD_ADAPTER_AND_HEAD = (2 * ((64 * 4 + 4 * 64) + 2 * (64 * 4 + 4 * 32) + (64 * 4 + 4 * 64)) + 65) * 4  # fp32


def rm(quantize, attention="mosaic_tpu", tuning=LORA4):
    return build_rm_step(CFG, tuning, pairs=4, seq_len=256, frozen_dtype="bfloat16", quantize=quantize,
                         attention_impl=attention)


def remax(quantize, attention="mosaic_tpu"):
    return build_rl_step(CFG, LORA4, algorithm="remax", prompts=4, prompt_len=128, new_tokens=4,
                         frozen_dtype="bfloat16", quantize=quantize, attention_impl=attention)


@functools.cache
def compiled(kind: str, quantize):
    """The step compiled ahead of time for v5e:2x2 (FSDP over its 4 chips), cached across tests."""
    spec = rm(quantize) if kind == "rm" else remax(quantize)
    with jax.default_matmul_precision("default"):  # as a TPU run would; Mosaic refuses conftest's "highest" in bf16
        return compile_step(spec, topology="v5e:2x2")


def test_frozen_argument_bytes_match_hand_count():
    assert BF16_FROZEN == 160_896 and NF4_FROZEN == 52_608 and INT8_FROZEN == 91_264
    assert rm(None).arg_bytes()["frozen"] == BF16_FROZEN
    assert rm("nf4").arg_bytes()["frozen"] == NF4_FROZEN
    assert rm("int8").arg_bytes()["frozen"] == INT8_FROZEN
    # PE-ReMax: the shared backbone, plus the frozen reward adapter and head (fp32)
    assert remax(None).arg_bytes()["frozen"] == BF16_FROZEN + REWARD_ADAPTER_AND_HEAD
    assert remax("nf4").arg_bytes()["frozen"] == NF4_FROZEN + REWARD_ADAPTER_AND_HEAD
    # what trains is the same whatever stores the frozen weights
    assert rm("nf4").arg_bytes()["trainable"] == rm(None).arg_bytes()["trainable"]
    assert rm("nf4").arg_bytes()["opt_state"] == rm(None).arg_bytes()["opt_state"]
    assert rm("nf4", "xla").name == "rm/lora-r4 nf4 xla" and remax("nf4").name == "remax/lora-r4 nf4 mosaic_tpu"
    assert rm(None, None).name == "rm/lora-r4"  # both options at their defaults: the step as it always was


def test_full_tuning_quantises_only_what_is_frozen():
    with pytest.raises(ValueError, match=r"build_rm_step: quantize='nf4' with tuning mode 'full'.*cannot be stored "
                                         r"quantised.*LoRA tuning"):
        rm("nf4", tuning=FULL)
    with pytest.raises(ValueError, match="build_rm_step: quantize='int8' but tuning.quantize='nf4'"):
        build_rm_step(CFG, TuningConfig(quantize="nf4"), pairs=2, seq_len=16, quantize="int8")
    with pytest.raises(ValueError, match="build_rl_step: quantize='fp8'; choose None or one of int8, int4, nf4"):
        build_rl_step(CFG, LORA4, prompts=2, prompt_len=8, new_tokens=4, quantize="fp8")
    # full PPO: the anchor and the reward model are frozen and quantised; the policy and value model train dense
    dense, nf4 = (build_rl_step(CFG, FULL, algorithm="ppo", prompts=2, prompt_len=8, new_tokens=4,
                                frozen_dtype="bfloat16", quantize=q) for q in (None, "nf4"))
    assert dense.arg_bytes()["trainable"] == nf4.arg_bytes()["trainable"]
    assert dense.arg_bytes()["frozen"] - nf4.arg_bytes()["frozen"] == 2 * (BF16_FROZEN - NF4_FROZEN)  # 216,576
    trainable = nf4.args[0]
    assert not any(isinstance(v, QuantizedWeight) for v in jax.tree.leaves(trainable, is_leaf=lambda x: isinstance(
        x, QuantizedWeight)))


@needs_libtpu
@pytest.mark.parametrize("kind", ["rm", "remax"])
def test_fused_quantised_step_compiles_for_tpu_with_smaller_frozen_arguments(kind):
    """nf4 + splash on v5e:2x2: the Mosaic kernel is in the program, and the per-chip arguments shrink by at
    least the quantised kernels' saving split over the 4 chips (dims the mesh does not divide stay whole)."""
    dense, nf4 = compiled(kind, None), compiled(kind, "nf4")
    for c in (dense, nf4):
        assert "tpu_custom_call" in c.as_text()
    saving = BF16_FROZEN - NF4_FROZEN  # 108,288 B of kernels, global
    args = {q: compiled_memory(c).argument_bytes for q, c in (("bf16", dense), ("nf4", nf4))}
    assert args["bf16"] - args["nf4"] >= saving // 4
    assert compiled_memory(nf4).peak_bytes > 0
