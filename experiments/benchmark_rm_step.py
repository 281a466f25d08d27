"""Benchmark one Bradley-Terry reward-model step on Gemma 3 270M: LoRA beside full fine-tuning.

    python experiments/benchmark_rm_step.py --out /tmp/rm_step.json

Each mode runs in its own subprocess so the process peak RSS is that mode's alone.
A mode builds the real model (fp32), tokenises the first `--pairs` HH-harmless pairs
to at most `--seq_len` tokens (prompt 3/4, response 1/4 of the budget), lays them out
(`--layouts`: `padded`, chosen and rejected each padded to `--seq_len` in 2 x pairs rows;
`packed`, `[prompt | chosen | rejected]` per pair with the prompt once, all pairs in one
row of the next multiple of 64 tokens, as `DataConfig.pack_length` trains) and
jits the same donated step that `train_reward_model` runs (`train.sharded.sharded_train_step`). It reports:
- the median wall time of `--iters` steps after one untimed compiling call
  (`profiling.time_step`; the step state is carried from call to call, as in training);
- the compiled step's per-device peak from XLA's memory analysis (arguments +
  outputs + temporaries - donated aliases);
- the process peak RSS (`resource.getrusage`), which also covers loading the GGUF;
- the step's FLOP/s beside the machine's rate for one lone dot of the step's MLP shape
  ([token slots, hidden] x [hidden, intermediate], `profiling.dot_rate`), measured in the same
  process: how much of the machine the step uses, and a slower machine told from a slower step.
The issue's target: LoRA (rank 8, attention) <= 3.5 s median at 4 pairs x 256 tokens on
the 2-core CPU, where TRL's RewardTrainer with PEFT takes 7.1 s (11.5 s fully tuned).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("JAX_PLATFORMS", "cpu")  # the CPU benchmark; keeps an installed libtpu from probing

TARGET_LORA_S = 3.5
TRL_S = {"lora": 7.1, "full": 11.5}


def _peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def _batch(tokenizer, pairs: int, seq_len: int, layout: str):
    """(batch, loss_fn, real tokens) of the first `pairs` HH-harmless pairs in `layout`."""
    import functools

    from pe_rlhf import data as D
    from pe_rlhf.data import packing
    from pe_rlhf.data.named import named_dataset
    from pe_rlhf.train import supervised_steps

    prompt_len = seq_len * 3 // 4
    options = D.TokenizeOptions(max_prompt_len=prompt_len, max_response_len=seq_len - prompt_len)
    examples = list(named_dataset("hh_harmless").examples[: pairs * 2])
    tokenized = D.tokenize_preferences(examples, tokenizer, options)[0][:pairs]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    if layout == "padded":
        real = sum(2 * len(p.prompt) + len(p.chosen) + len(p.rejected) for p in tokenized)
        return D.batch_preferences(tokenized, seq_len=seq_len, pad_id=pad), supervised_steps.pairwise_reward_loss, real
    real = sum(packing.packed_length(p) for p in tokenized)
    length = -(-real // packing.CHUNK) * packing.CHUNK
    batch = packing.pack(tokenized, packing.PackOptions(rows=1, length=length, items_per_row=pairs), pad_id=pad)
    span = packing.span(prompt_len, seq_len - prompt_len, 2)
    return batch, functools.partial(supervised_steps.packed_pairwise_reward_loss, span=span), real


def measure(mode: str, layout: str, *, model: str, pairs: int, seq_len: int, iters: int, rank: int,
            trace_dir: str | None = None) -> dict:
    """One mode, in this process: compile, memory analysis, timing, RSS."""
    import jax
    from flax import nnx

    from pe_rlhf.checkpoints.load import load_backbone
    from pe_rlhf.models.lora import LoRAConfig
    from pe_rlhf.profiling import dot_rate, time_step
    from pe_rlhf.sharding.memory import compiled_memory
    from pe_rlhf.train.sharded import sharded_train_step
    from pe_rlhf.train.optim import OptimizerConfig, make_optimizer
    from pe_rlhf.train.supervised import TuningConfig, reward_model, trainable_filter

    t0 = time.perf_counter()
    tuning = TuningConfig(mode=mode, lora=LoRAConfig(rank=rank, alpha=2.0 * rank, targets="attention"))
    backbone, tokenizer = load_backbone(model, "float32")
    model_cfg = backbone.config
    rm = reward_model(backbone, tuning, "reward")
    load_s = time.perf_counter() - t0
    rss_after_load = _peak_rss_bytes()

    batch, loss_fn, real_tokens = _batch(tokenizer, pairs, seq_len, layout)
    batch = jax.device_put(batch)
    graphdef, trainable, frozen = nnx.split(rm, trainable_filter(tuning, "reward"), ...)
    del rm, backbone
    tx = make_optimizer(OptimizerConfig(learning_rate=1e-4, total_steps=1000))
    t0 = time.perf_counter()
    # the donated training step, built exactly as train_reward_model builds it (one device)
    stepper = sharded_train_step(None, graphdef=graphdef, tx=tx, loss_fn=loss_fn,
                                 trainable=trainable, opt_state=jax.eval_shape(tx.init, trainable), frozen=frozen,
                                 batch=batch)
    compiled = stepper.compiled
    compile_s = time.perf_counter() - t0
    memory = compiled_memory(compiled)
    trainable, _, frozen = stepper.place(trainable, None, frozen)
    opt_state = stepper.init_opt_state(tx, trainable)

    state = {"trainable": trainable, "opt_state": opt_state}

    def step():
        # Carries the donated state from call to call, exactly as the training loop does.
        state["trainable"], state["opt_state"], metrics = compiled(state["trainable"], state["opt_state"], frozen,
                                                                   batch)
        return metrics

    timing = time_step(step, (), warmup=1, iters=iters)
    peak_rss = _peak_rss_bytes()  # before any tracing, whose buffers are not the step's
    # the machine's rate for a lone dot of the step's MLP shape, measured now: the step's share of it
    slots = int(sum(x.size for k, x in batch.items() if k.endswith(("tokens_BxT", "tokens_RxN"))))
    dot_flops = dot_rate(slots, model_cfg.hidden_size, model_cfg.intermediate_size)
    ops = None
    if trace_dir:  # two more steps under the profiler, summarised by XLA operation
        from pe_rlhf.profiling import trace
        from pe_rlhf.profiling.ops import format_summary, op_time_summary

        log_dir = os.path.join(trace_dir, f"{mode}_{layout}")
        with trace(log_dir):
            for _ in range(2):
                jax.block_until_ready(step())
        ops = op_time_summary(log_dir, steps=2)
        print(f"{mode} {layout}: {format_summary(ops)}")
    count = lambda tree: int(sum(x.size for x in jax.tree.leaves(tree)))
    step_flops = compiled.cost_analysis().get("flops", float("nan"))
    return {
        "mode": mode, "layout": layout, "real_tokens": real_tokens,
        "token_slots": slots,
        "step_tflop": step_flops / 1e12,
        "step_gflops_per_s": step_flops / timing.median_s / 1e9, "lone_dot_gflops_per_s": dot_flops / 1e9,
        "model": model, "pairs": pairs, "seq_len": seq_len, "lora_rank": rank if mode == "lora" else None,
        "trainable_params": count(state["trainable"]), "frozen_params": count(frozen),
        "median_step_s": timing.median_s, "step_s": list(timing.all_s), "compile_s": compile_s, "load_s": load_s,
        "compiled_memory": memory.as_dict(), "peak_rss_bytes": peak_rss,
        "rss_after_load_bytes": rss_after_load, "backend": jax.default_backend(),
        "devices": len(jax.devices()), "cpu_count": os.cpu_count(), "loadavg_at_end": os.getloadavg(),
        "op_time": ops,
    }


def table(results: list[dict]) -> str:
    from pe_rlhf.sharding.memory import format_bytes

    lines = ["| mode | layout | token slots (real) | XLA TFLOP | trainable params | median step (s) | all steps (s) "
             "| TRL (s) | step GFLOP/s (lone MLP dot) | compiled peak | peak RSS |",
             "|---|---|---|---:|---:|---:|---|---:|---:|---:|---:|"]
    for r in results:
        lines.append(f"| {r['mode']} | {r['layout']} | {r['token_slots']} ({r['real_tokens']}) | "
                     f"{r['step_tflop']:.3f} | {r['trainable_params']:,} | {r['median_step_s']:.2f} | "
                     f"{', '.join(f'{t:.2f}' for t in r['step_s'])} | {TRL_S.get(r['mode'], float('nan'))} | "
                     f"{r['step_gflops_per_s']:.0f} ({r['lone_dot_gflops_per_s']:.0f}) | "
                     f"{format_bytes(r['compiled_memory']['peak_bytes'])} | {format_bytes(r['peak_rss_bytes'])} |")
    return "\n".join(lines)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--modes", nargs="+", default=["lora", "full"], choices=["lora", "full"])
    p.add_argument("--layouts", nargs="+", default=["packed", "padded"], choices=["packed", "padded"])
    p.add_argument("--model", default="gemma3-270m", help="load_backbone source ('tiny' for a quick check)")
    p.add_argument("--pairs", type=int, default=4)
    p.add_argument("--seq_len", type=int, default=256)
    p.add_argument("--iters", type=int, default=5, help="timed steps after the compiling one (>= 5 for the record)")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--out", default=None, help="write all results here as JSON")
    p.add_argument("--trace", default=None, metavar="DIR",
                   help="after timing, trace two more steps under DIR/<mode>_<layout> and print where the time "
                        "goes by XLA operation (needs `pip install xprof`)")
    p.add_argument("--child_out", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    from pe_rlhf.sharding.distributed import quiet_tpu_probe

    quiet_tpu_probe()  # no libtpu errors at start-up on a machine without a TPU (children inherit it)
    common = dict(model=args.model, pairs=args.pairs, seq_len=args.seq_len, iters=args.iters, rank=args.rank,
                  trace_dir=args.trace)
    if args.child_out:  # one mode, in the subprocess the parent started
        with open(args.child_out, "w") as f:
            json.dump(measure(args.modes[0], args.layouts[0], **common), f)
        return None
    results = []
    for mode, layout in [(m, lay) for lay in args.layouts for m in args.modes]:
        with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as tmp:
            child_out = tmp.name
        cmd = [sys.executable, os.path.abspath(__file__), "--modes", mode, "--layouts", layout, "--model", args.model, "--pairs",
               str(args.pairs), "--seq_len", str(args.seq_len), "--iters", str(args.iters), "--rank", str(args.rank),
               "--child_out", child_out] + (["--trace", args.trace] if args.trace else [])
        proc = subprocess.run(cmd)
        if proc.returncode != 0:
            raise SystemExit(f"benchmark of mode {mode!r}, layout {layout!r} failed (exit {proc.returncode}); command: {' '.join(cmd)}")
        with open(child_out) as f:
            results.append(json.load(f))
        os.unlink(child_out)
    print(f"\nBradley-Terry step, {args.model}, fp32, {args.pairs} pairs x {args.seq_len} tokens:\n")
    print(table(results))
    for r in results:
        if r["mode"] == "lora" and args.model == "gemma3-270m":
            ok = r["median_step_s"] <= TARGET_LORA_S
            print(f"LoRA ({r['layout']}) target <= {TARGET_LORA_S} s: {'met' if ok else 'MISSED'} "
                  f"({r['median_step_s']:.2f} s)")
    by = {(r["mode"], r["layout"]): r["median_step_s"] for r in results}
    for layout in args.layouts:
        if ("lora", layout) in by and ("full", layout) in by:
            print(f"full / LoRA step time ({layout}): {by[('full', layout)] / by[('lora', layout)]:.2f}x")
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump({"args": vars(args), "results": results}, f, indent=2)
    return results


if __name__ == "__main__":
    main()
