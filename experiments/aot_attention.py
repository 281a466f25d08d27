"""Peak HBM of one LoRA reward-model step compiled for a TPU topology, with today's attention and the
fused splash kernel (`ModelConfig.attention_impl` "xla" and "mosaic_tpu"); ahead of time, from a CPU host.

    python experiments/aot_attention.py --topology v5e:2x2 --seq 2048 --pairs 4

A small decoder (2 layers, hidden 256, 4 heads and 2 key/value heads of 64) so that attention's share of
the step is visible; `--family gemma3` alternates a sliding-window and a global layer.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pe_rlhf.models.config import ModelConfig  # noqa: E402
from pe_rlhf.profiling.measure import measure_step  # noqa: E402
from pe_rlhf.profiling.step_builders import build_rm_step  # noqa: E402


def small_config(family: str) -> ModelConfig:
    cfg = ModelConfig(vocab_size=1024, hidden_size=256, intermediate_size=512, num_layers=2, num_heads=4,
                      num_kv_heads=2, head_dim=64, max_position_embeddings=8192)
    if family == "gemma3":
        cfg = cfg.replace(family="gemma3", sliding_window=128, layer_types=("sliding_attention", "full_attention"),
                          qk_norm=True, tie_word_embeddings=True)
    return cfg


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--topology", default="v5e:2x2")
    p.add_argument("--seq", type=int, default=2048, help="tokens per sequence")
    p.add_argument("--pairs", type=int, default=4)
    p.add_argument("--family", default="llama", choices=["llama", "gemma3"])
    args = p.parse_args(argv)
    base = small_config(args.family)
    print("| attention_impl | peak HBM per device (MiB) | temporaries (MiB) | compile (s) |")
    print("|---|---:|---:|---:|")
    for impl in ("xla", "mosaic_tpu"):
        t0 = time.perf_counter()
        report = measure_step(build_rm_step(base.replace(attention_impl=impl), pairs=args.pairs, seq_len=args.seq),
                              topology=args.topology)
        m = report.memory
        print(f"| {impl} | {m.peak_bytes / 2**20:.1f} | {m.temp_bytes / 2**20:.1f} | {time.perf_counter() - t0:.0f} |",
              flush=True)


if __name__ == "__main__":
    main()
