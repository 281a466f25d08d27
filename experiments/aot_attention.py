"""Peak HBM of one LoRA reward-model step compiled for a TPU topology, with today's attention and the
fused splash kernel (`ModelConfig.attention_impl` "xla" and "mosaic_tpu"); ahead of time, from a CPU host.

    python experiments/aot_attention.py --topology v5e:2x2 --seq 2048 --pairs 4
    python experiments/aot_attention.py --topology v5p:2x2x1 --packed --seq 8192 --rows 4 --prompt 2048 --response 512

A small decoder (2 layers, hidden 256, 4 heads and 2 key/value heads of 64) so that attention's share of
the step is visible; `--family gemma3` alternates a sliding-window and a global layer; `--preset` takes a
real model instead (with `--frozen-dtype bfloat16 --remat --quantize nf4` as the real-size plans use).

`--packed` compiles the packed step (`data.packing`, rows of `--seq` tokens, pairs of `--prompt` +
2 x `--response` tokens) three ways: each pair `[prompt | chosen | rejected]` (the prompt shared; only the
XLA path can keep the two responses apart), and `[prompt | chosen][prompt | rejected]`
(`DataConfig.pack_share_prompt=False`: plain causal segments) on the XLA path and on the splash kernel.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pe_rlhf.data import packing  # noqa: E402
from pe_rlhf.models.config import ModelConfig, preset  # noqa: E402
from pe_rlhf.models.lora import LoRAConfig  # noqa: E402
from pe_rlhf.profiling.measure import measure_step  # noqa: E402
from pe_rlhf.profiling.step_builders import build_packed_rm_step, build_rm_step  # noqa: E402
from pe_rlhf.train.config import TuningConfig  # noqa: E402


def small_config(family: str) -> ModelConfig:
    cfg = ModelConfig(vocab_size=1024, hidden_size=256, intermediate_size=512, num_layers=2, num_heads=4,
                      num_kv_heads=2, head_dim=64, max_position_embeddings=8192)
    if family == "gemma3":
        cfg = cfg.replace(family="gemma3", sliding_window=128, layer_types=("sliding_attention", "full_attention"),
                          qk_norm=True, tie_word_embeddings=True)
    return cfg


def packed_variants(args) -> list[tuple[str, str, int, int, bool]]:
    """(layout, attention_impl, pairs per row, span, share_prompt) of the three packed steps."""
    out = []
    for share in (True, False):
        per_pair = packing.packed_length(_pair(args.prompt, args.response), share)
        pairs = args.seq // per_pair
        if pairs < 1:
            raise SystemExit(f"--seq {args.seq} holds no pair of {per_pair} tokens (share_prompt={share})")
        span = packing.span(args.prompt, args.response, 2, share)
        for impl in (("xla",) if share else ("xla", "mosaic_tpu")):
            out.append(("shared prompt" if share else "prompt per response", impl, pairs, span, share))
    return out


def _pair(prompt: int, response: int):
    from pe_rlhf.data import TokenizedPair
    return TokenizedPair([1] * prompt, [1] * response, [1] * response)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--topology", default="v5e:2x2")
    p.add_argument("--seq", type=int, default=2048, help="tokens per sequence (--packed: per row)")
    p.add_argument("--pairs", type=int, default=4)
    p.add_argument("--family", default="llama", choices=["llama", "gemma3"])
    p.add_argument("--preset", default=None, help="a real model (e.g. gemma3-1b) instead of the small decoder")
    p.add_argument("--frozen-dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--quantize", default=None, choices=[None, "int8", "int4", "nf4"])
    p.add_argument("--remat", action="store_true", help="recompute each decoder block in the backward pass")
    p.add_argument("--packed", action="store_true", help="the packed step, three layouts (see above)")
    p.add_argument("--rows", type=int, default=4, help="--packed: rows per batch (a multiple of the chips)")
    p.add_argument("--prompt", type=int, default=2048, help="--packed: prompt tokens of a pair")
    p.add_argument("--response", type=int, default=512, help="--packed: tokens of each response")
    args = p.parse_args(argv)
    base = preset(args.preset) if args.preset else small_config(args.family)
    tuning = TuningConfig(mode="lora", lora=LoRAConfig(rank=8, alpha=16.0, targets="attention"), remat=args.remat)
    common = dict(frozen_dtype=args.frozen_dtype, quantize=args.quantize)
    if args.packed:
        steps = [(f"{layout} | {impl} | {pairs}", build_packed_rm_step(
                     base, tuning, rows=args.rows, length=args.seq, pairs_per_row=pairs, span=span,
                     share_prompt=share, attention_impl=impl, **common))
                 for layout, impl, pairs, span, share in packed_variants(args)]
        print(f"{args.preset or 'small ' + args.family}, {args.rows} rows x {args.seq} tokens, pairs of "
              f"{args.prompt} + 2 x {args.response}, on {args.topology}")
        print("| layout | attention_impl | pairs per row | peak HBM per device (MiB) | temporaries (MiB) | compile (s) |")
        print("|---|---|---:|---:|---:|---:|")
    else:
        steps = [(impl, build_rm_step(base, tuning, pairs=args.pairs, seq_len=args.seq, attention_impl=impl, **common))
                 for impl in ("xla", "mosaic_tpu")]
        print("| attention_impl | peak HBM per device (MiB) | temporaries (MiB) | compile (s) |")
        print("|---|---:|---:|---:|")
    for label, spec in steps:
        t0 = time.perf_counter()
        m = measure_step(spec, topology=args.topology).memory
        if m is None:
            print(f"| {label} | does not fit | | {time.perf_counter() - t0:.0f} |", flush=True)
            continue
        print(f"| {label} | {m.peak_bytes / 2**20:.1f} | {m.temp_bytes / 2**20:.1f} | {time.perf_counter() - t0:.0f} |",
              flush=True)


if __name__ == "__main__":
    main()
