"""experiments/device_check.py --smoke end to end (CPU, tiny model, each step in its own process), its budget,
failure and no-GPU paths, and the FLOP counts it reports, checked by hand."""

import json
import os
import subprocess
import sys

import pytest

from pe_rlhf.models.tiny import tiny_config
from pe_rlhf.profiling import flops

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(REPO, "experiments", "device_check.py")
STEPS = ["rm_lora", "rm_full", "sampler", "remax_lora", "ppo_full"]


def run(*args, timeout=600):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)  # one CPU device, as on a machine of one GPU
    return subprocess.run([sys.executable, SCRIPT, *args], capture_output=True, text=True, env=env, timeout=timeout)


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("device_check") / "device_check.json"
    proc = run("--smoke", "--iters", "2", "--out", str(out))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    with open(out) as f:
        return json.load(f), proc.stdout


@pytest.mark.slow
def test_smoke_records_every_step(smoke):
    result, stdout = smoke
    assert result["device"]["backend"] == "cpu" and result["device"]["peak_bf16_flops"] is None
    assert result["versions"]["jax"] and result["versions"]["jaxlib"]
    assert result["config"]["smoke"] and result["config"]["presets"] == ["gemma3-270m"] and result["finished"]
    rows = {r["step"]: r for r in result["steps"]}
    assert list(rows) == STEPS
    for name, r in rows.items():
        assert r["status"] == "ok", r
        assert r["compile_s"] > 0 and r["median_step_s"] > 0 and r["compiled_peak_bytes"] > 0
        assert r["model_flops"] > 0 and r["dtypes"]["compute"]
        assert r["peak_bytes_in_use"] is None  # the CPU gives no memory_stats
        assert r["mfu_model_flops"] is None  # no peak FLOP/s known for a CPU
    assert rows["rm_lora"]["dtypes"]["frozen"] == "bfloat16" and rows["rm_full"]["dtypes"]["compute"] == "bfloat16 copy"
    assert rows["rm_lora"]["lora_rank"] == 8 and rows["rm_full"]["lora_rank"] is None
    # every step computes in bf16 (full tuning: fp32 masters of a bf16 copy), so all take the library's choice
    assert [rows[s]["attention_impl"] for s in STEPS] == ["auto"] * 5
    # the sampler: every row makes exactly the new tokens (EOS off)
    shapes = result["config"]["shapes"]
    sampler = rows["sampler"]
    assert sampler["tokens_per_s"] == pytest.approx(
        shapes["sampler_prompts"] * shapes["sampler_new_tokens"] / sampler["median_step_s"])
    # the tiny gemma3 of the smoke run: D=64, F=128, 2 layers, 4 heads x 16, 2 KV heads, V=512
    body = 2 * (64 * 16 * (2 * 4 + 2 * 2) + 3 * 64 * 128)
    assert rows["rm_full"]["model_flops"] == 6 * body * 2 * shapes["rm_pairs"] * shapes["rm_len"]
    assert rows["rm_lora"]["model_flops"] == 4 * body * 2 * shapes["rm_pairs"] * shapes["rm_len"]
    # a fully tuned RM does more of everything: XLA's count and the compiled peak say so too
    assert rows["rm_full"]["xla_flops"] > rows["rm_lora"]["xla_flops"] > 0
    assert "rm_lora_over_full" in stdout and "pe_remax_over_full_ppo" in stdout


@pytest.mark.slow
def test_ratios_are_quotients_of_the_recorded_figures(smoke):
    result, _ = smoke
    rows = {r["step"]: r for r in result["steps"]}
    ratios = result["ratios"]["gemma3-270m"]
    for name, (a, b) in {"rm_lora_over_full": ("rm_lora", "rm_full"),
                         "pe_remax_over_full_ppo": ("remax_lora", "ppo_full")}.items():
        q = ratios[name]
        assert (q["numerator"], q["denominator"]) == (a, b)
        assert q["compiled_peak_bytes"] == pytest.approx(rows[a]["compiled_peak_bytes"] / rows[b]["compiled_peak_bytes"])
        assert q["median_step_s"] == pytest.approx(rows[a]["median_step_s"] / rows[b]["median_step_s"])
        assert q["speedup"] == pytest.approx(rows[b]["median_step_s"] / rows[a]["median_step_s"])
        assert q["peak_bytes_in_use"] is None  # no runtime peaks on a CPU
        assert q["compiled_peak_bytes"] < 1  # LoRA below full, PE-ReMax below full PPO


@pytest.mark.slow
def test_budget_skips_and_failures_are_recorded(tmp_path):
    out = tmp_path / "skipped.json"
    proc = run("--smoke", "--budget_s", "60", "--min_step_s", "1000", "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(out.read_text())["steps"]
    assert [r["step"] for r in rows] == STEPS and all(r["status"] == "skipped" for r in rows)
    assert "budget left" in rows[0]["error"]

    out = tmp_path / "failed.json"
    proc = run("--smoke", "--steps", "rm_lora", "sampler", "--lora_rank", "0", "--iters", "1", "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    rows = {r["step"]: r for r in result["steps"]}
    assert rows["rm_lora"]["status"] == "error" and "rank=0" in rows["rm_lora"]["error"]
    assert rows["sampler"]["status"] == "ok" and rows["sampler"]["tokens_per_s"] > 0  # the next step still ran
    assert result["ratios"] == {}


@pytest.mark.slow
def test_without_a_gpu_it_says_so_and_fails(tmp_path):
    proc = run("--out", str(tmp_path / "x.json"), timeout=120)
    assert proc.returncode == 3
    assert "no GPU visible to JAX" in proc.stderr and "jax[cuda12]" in proc.stderr
    assert not (tmp_path / "x.json").exists()


def test_flop_counts_by_hand():
    cfg = tiny_config("llama", vocab_size=100, hidden_size=8, intermediate_size=16, num_layers=2, num_heads=2,
                      num_kv_heads=1, head_dim=4)
    body = 2 * (8 * 4 * (2 * 2 + 2 * 1) + 3 * 8 * 16)  # q, o: 8 x 8; k, v: 8 x 4; gate, up, down: 8 x 16
    head = 100 * 8
    assert flops.matmul_params(cfg) == (body, head)
    assert flops.rm_step_flops(cfg, pairs=3, seq_len=5, full=True) == 6 * body * 30
    assert flops.rm_step_flops(cfg, pairs=3, seq_len=5, full=False) == 4 * body * 30
    # 2 rows, 3-token prompts, 4 new tokens: prefill (head at the last position) + 4 decode steps with logits
    sample = 2 * (2 * 3 * body + 2 * head) + 2 * (2 * 4 * (body + head))
    assert flops.sample_flops(cfg, rows=2, prompt_len=3, new_tokens=4) == sample
    # PE-ReMax, 2 prompts: 4 rows sampled, rewarded, anchored; the 2 sampled rows' policy pass, LoRA backward
    remax = (flops.sample_flops(cfg, rows=4, prompt_len=3, new_tokens=4) + 2 * 4 * 7 * body
             + 2 * (4 * 7 * body + 4 * 4 * head) + 4 * (2 * 7 * body + 2 * 4 * head))
    assert flops.rl_step_flops(cfg, algorithm="remax", prompts=2, prompt_len=3, new_tokens=4, full=False) == remax
    # full PPO, 2 prompts, 3 epochs: rollout, reward, anchor, old values; each epoch policy and value, 6x
    ppo = (flops.sample_flops(cfg, rows=2, prompt_len=3, new_tokens=4) + 2 * 2 * 7 * body
           + 2 * (2 * 7 * body + 2 * 4 * head) + 2 * 2 * 7 * body
           + 3 * (6 * (2 * 7 * body + 2 * 4 * head) + 6 * 2 * 7 * body))
    assert flops.rl_step_flops(cfg, algorithm="ppo", prompts=2, prompt_len=3, new_tokens=4, full=True,
                               ppo_epochs=3) == ppo
    assert flops.peak_bf16_flops("NVIDIA H100 80GB HBM3")[0] == flops.peak_bf16_flops("NVIDIA H200")[0] == 989.4e12
    assert flops.peak_bf16_flops("NVIDIA H100 PCIe")[0] == 756.5e12
    assert flops.peak_bf16_flops("cpu")[0] is None
    assert flops.mfu(2e12, 0.5, 8e12) == 0.5 and flops.mfu(None, 0.5, 8e12) is None
