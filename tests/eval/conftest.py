"""One small gold-reward benchmark run per session, shared by the benchmark, win-rate and report tests."""

import pytest

# Small enough for CI on 2 CPU cores (about 90 s): SFT -> LoRA and full proxy RMs -> LoRA ReMax.
SMALL = dict(sft_steps=150, rm_steps=120, rl_steps=100, policy_tunings=("lora",), algorithms=("remax",),
             eval_samples=4)


@pytest.fixture(scope="session")
def gold_run(tmp_path_factory):
    """(workdir, result) of `run_gold_benchmark` at the SMALL scale."""
    from pe_rlhf.eval.gold import GoldBenchmarkConfig, run_gold_benchmark

    workdir = str(tmp_path_factory.mktemp("gold"))
    return workdir, run_gold_benchmark(workdir, GoldBenchmarkConfig(**SMALL))
