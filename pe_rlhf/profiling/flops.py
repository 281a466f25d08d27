"""Model FLOPs of a step, counted from its shapes, and the share of an accelerator's peak they use (MFU).

Counted as matmul parameters x tokens, the convention of Kaplan et al. (2020) and PaLM's MFU (Chowdhery
et al. 2022, appendix B) without its attention term: a token's forward pass through a weight matrix of
n entries is 2n FLOPs, its backward pass 4n when the weight trains (input and weight gradients) and 2n
when it is frozen (input gradients only: a LoRA backbone; the rank-r adapters are left out, under 1%).
Attention scores (q k^T, p v), norms and elementwise work are not counted; neither is recomputation
(remat, the chunked log-probs' `jax.checkpoint`). `body` is the decoder blocks' projections; `head`
the vocabulary projection (V x D), counted only at positions whose logits are computed.

XLA's own count (`measure.compiled_flops`) counts a while loop's or scan's body once, so for the
sampler and RL steps (decode loop, PPO epochs) it is far below what runs; these counts do not have
that gap.
"""

from __future__ import annotations

from pe_rlhf.models.config import ModelConfig

# Dense (no sparsity) bf16 tensor-core peak per device, FLOP/s, by a substring of `jax.Device.device_kind`,
# most specific first. Sources: NVIDIA H100 Tensor Core GPU datasheet (SXM 1,979 / PCIe 1,513 / NVL 1,671
# TFLOP/s bf16 *with* 2:4 sparsity, halved here); NVIDIA H200 datasheet (SXM 1,979, NVL 1,671 with
# sparsity); NVIDIA A100 datasheet (312 dense). fp32 matmuls run as TF32 by default on these GPUs, whose
# dense peak is half the bf16 one; MFU is reported against the bf16 peak for every step.
PEAK_BF16_FLOPS = (
    ("H200 NVL", 835.5e12, "NVIDIA H200 datasheet: 1,671 TFLOP/s bf16 with sparsity, 835.5 dense"),
    ("H200", 989.4e12, "NVIDIA H200 datasheet (SXM): 1,979 TFLOP/s bf16 with sparsity, 989.4 dense"),
    ("H100 NVL", 835.5e12, "NVIDIA H100 datasheet: 1,671 TFLOP/s bf16 with sparsity, 835.5 dense"),
    ("H100 PCIe", 756.5e12, "NVIDIA H100 datasheet: 1,513 TFLOP/s bf16 with sparsity, 756.5 dense"),
    ("H100", 989.4e12, "NVIDIA H100 datasheet (SXM): 1,979 TFLOP/s bf16 with sparsity, 989.4 dense"),
    ("A100", 312e12, "NVIDIA A100 datasheet: 312 TFLOP/s bf16 dense"),
)


def peak_bf16_flops(device_kind: str) -> tuple[float | None, str]:
    """(dense bf16 peak FLOP/s, its source) for a device kind such as 'NVIDIA H100 80GB HBM3'; (None, why)
    for a device not in `PEAK_BF16_FLOPS`."""
    for name, flops, source in PEAK_BF16_FLOPS:
        if name.lower() in device_kind.lower():
            return flops, source
    return None, f"no peak known for device kind {device_kind!r} (pe_rlhf.profiling.flops.PEAK_BF16_FLOPS)"


def matmul_params(cfg: ModelConfig) -> tuple[int, int]:
    """(body, head): weights of the decoder blocks' projections (q, k, v, o; gated MLP), and of the
    vocabulary projection. Biases and norms are left out."""
    attn = cfg.hidden_size * cfg.head_dim * (2 * cfg.num_heads + 2 * cfg.num_kv_heads)
    mlp = 3 * cfg.hidden_size * cfg.intermediate_size
    return cfg.num_layers * (attn + mlp), cfg.vocab_size * cfg.hidden_size


def _pass(tokens: int, logits: int, body: int, head: int, backward: str | None) -> int:
    """One pass over `tokens` positions, the head at `logits` of them; backward None | 'full' | 'frozen'."""
    factor = {None: 2, "full": 6, "frozen": 4}[backward]
    return factor * (tokens * body + logits * head)


def rm_step_flops(cfg: ModelConfig, *, pairs: int, seq_len: int, full: bool) -> int:
    """A Bradley-Terry step on `pairs` x 2 rows of `seq_len`: 6 N tokens (full) or 4 N tokens (LoRA).
    A scalar head reads the hidden state: no vocabulary projection."""
    body, head = matmul_params(cfg)
    return _pass(2 * pairs * seq_len, 0, body, head, "full" if full else "frozen")


def sample_flops(cfg: ModelConfig, *, rows: int, prompt_len: int, new_tokens: int) -> int:
    """The sampler: a prefill (logits at the last position) and `new_tokens` decode steps with logits."""
    body, head = matmul_params(cfg)
    return _pass(rows * prompt_len, rows, body, head, None) + _pass(rows * new_tokens, rows * new_tokens,
                                                                      body, head, None)


def rl_step_flops(cfg: ModelConfig, *, algorithm: str, prompts: int, prompt_len: int, new_tokens: int,
                  full: bool, ppo_epochs: int = 4) -> int:
    """One `train.policy.rl_step`, pass by pass as it runs (one sample per prompt; ReMax adds a greedy row):
    ROLLOUT (sampler, reward model on every row), the anchor's log-probs on every row, (PPO: the value
    model's old values), then the update: the policy's log-probs forward and backward on the sampled rows
    (PPO: `ppo_epochs` times, with the value model's forward and backward)."""
    body, head = matmul_params(cfg)
    rows = 2 * prompts if algorithm == "remax" else prompts
    length = prompt_len + new_tokens
    backward = "full" if full else "frozen"
    flops = sample_flops(cfg, rows=rows, prompt_len=prompt_len, new_tokens=new_tokens)
    flops += _pass(rows * length, 0, body, head, None)  # reward
    flops += _pass(rows * length, rows * new_tokens, body, head, None)  # anchor log-probs
    policy = _pass(prompts * length, prompts * new_tokens, body, head, backward)
    if algorithm != "ppo":
        return flops + policy
    flops += _pass(prompts * length, 0, body, head, None)  # old values
    value = _pass(prompts * length, 0, body, head, backward)
    return flops + ppo_epochs * (policy + value)


def mfu(flops: float | None, seconds: float | None, peak_flops: float | None) -> float | None:
    """flops / seconds / peak: the share of the device's peak a step's counted FLOPs use."""
    if not flops or not seconds or not peak_flops:
        return None
    return flops / seconds / peak_flops
