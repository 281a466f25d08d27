"""Peak memory of an SFT step with the vocabulary projection's cross-entropy fused (tokamax) or not.

    python experiments/benchmark_cross_entropy.py --topology v5p:2x2x1 --presets gemma3-1b llama3-8b \
        --rows 8 --seq-len 2048 --response-len 512 --out results/cross_entropy_v5p.json

For each preset and each vocabulary window (every position, `--response-len` positions per row as
`train_sft` runs it with `DataConfig.max_response_len`), the same LoRA SFT step (`step_builders.build_sft_step`,
bf16 frozen weights, rank-8 adapters on attention, per-block remat, the splash attention kernel) is compiled
ahead of time for `--topology` with `ModelConfig.cross_entropy_impl` "logits" (the [rows, positions, V]
float32 logits in HBM) and "mosaic_tpu" (tokamax's `linear_softmax_cross_entropy_loss`: no logits in HBM),
and XLA's compiled peak per chip is printed and written as JSON. Nothing runs on a TPU.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

IMPLS = ("logits", "mosaic_tpu")


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--topology", default="v5p:2x2x1", help="TPU slice to compile for, e.g. v5e:2x2, v5p:2x2x1")
    p.add_argument("--presets", nargs="+", default=["gemma3-1b"])
    p.add_argument("--rows", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--response-len", type=int, default=512, help="the response window; 0: every position only")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--out", help="JSON file for the rows")
    args = p.parse_args(argv)

    import jax

    from pe_rlhf.models.config import preset
    from pe_rlhf.models.lora import LoRAConfig
    from pe_rlhf.profiling.measure import measure_step
    from pe_rlhf.profiling.step_builders import build_sft_step
    from pe_rlhf.train.config import TuningConfig

    tuning = TuningConfig(mode="lora", remat=True,
                          lora=LoRAConfig(rank=args.rank, alpha=2.0 * args.rank, targets="attention"))
    windows = [None] + ([args.response_len] if args.response_len else [])
    rows = []
    for name in args.presets:
        cfg = dataclasses.replace(preset(name), attention_impl="mosaic_tpu")
        for window in windows:
            for impl in IMPLS:
                spec = build_sft_step(cfg, tuning, rows=args.rows, seq_len=args.seq_len, response_len=window,
                                      frozen_dtype="bfloat16", cross_entropy_impl=impl)
                with jax.default_matmul_precision("default"):
                    report = measure_step(spec, topology=args.topology)
                row = {"preset": name, "vocab": cfg.vocab_size, "rows": args.rows, "seq_len": args.seq_len,
                       "positions": window or args.seq_len - 1, "cross_entropy": impl, "topology": args.topology,
                       "peak_bytes": report.peak_bytes, "compile_s": report.compile_s, "error": report.compiler_error}
                rows.append(row)
                peak = "n/a" if row["peak_bytes"] is None else f"{row['peak_bytes'] / 2**30:.2f} GiB"
                print(f"{name:12s} positions {row['positions']:5d}  {impl:10s}  peak {peak}", flush=True)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=1)
    return rows


if __name__ == "__main__":
    main()
