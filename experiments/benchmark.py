"""What PE-RLHF promises, measured: peak memory (and, locally, step time) over a grid of steps.

    # ahead of time for a TPU slice (memory only; needs the libtpu wheel, no TPU)
    python experiments/benchmark.py --topology v5e:2x2 --presets gemma3-270m gemma3-1b \
        --tunings full lora1 lora4 lora8 lora16 lora32 --stages rm reinforce remax ppo --remat --out results/v5e
    # on this machine's devices (CPU: compiled memory, and step time with --time-iters)
    python experiments/benchmark.py --local --presets gemma3-270m --rm-pairs 4 --rm-len 256 --time-iters 3 ...
    # a tiny grid for tests: every preset becomes a tiny model of its family
    python experiments/benchmark.py --local --preset-override tiny ...
    # the report (JSON, table, plots) of whatever part of a grid is already in results/v5e, compiling nothing
    python experiments/benchmark.py --topology v5e:2x2 --remat --frozen-dtype float32 bfloat16 --no-compile ...
    # QLoRA with the fused kernel: frozen projections in nf4, the splash attention kernel
    python experiments/benchmark.py --topology v5p:2x2x1 --presets llama3-8b --stages rm --tunings lora8 \
        --frozen-dtype bfloat16 --quantize none nf4 --attention xla mosaic_tpu --remat --out results/v5p

The grid is presets x tunings (full | lora<rank>) x stages (rm | reinforce | remax | ppo) x frozen dtypes x
frozen formats (`--quantize`: none | int8 | int4 | nf4) x attention paths (`--attention`); RL stages use
`--rl-tunings` when given. A fully tuned RM has no frozen weights, so its quantised cells are skipped; full RL
quantises its frozen anchor and reward model. Steps are built by `pe_rlhf.profiling.step_builders` from shapes alone.
Each finished row is appended to `<out>/rows.jsonl` at once (a rerun skips rows already there; one
directory holds one topology and one set of shapes); at the end the script writes `<out>/results.json`,
`<out>/table.md`, three plots (peak by LoRA rank; LoRA / full by model size; ReMax / PPO), and prints the
ratios side by side: LoRA RM / full RM, PE-ReMax / full PPO, ReMax / PPO at equal tuning. A LoRA row is
compared with the full row of the same remat setting and model dtype (float32 where none was measured),
unquantised and on the XLA attention path, whatever the LoRA row's options (`benchmark_report.BASELINE`);
a full row in bfloat16 trains fp32 master weights of a bf16 compute copy, as training does (`train.precision`).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import traceback

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # benchmark_report.py, beside this file

from benchmark_report import (  # noqa: E402
    BASELINE, QUANTIZE, TARGETS, _dtype, _gib, _name, attention_of, markdown, plots, quantize_of, ratios,
)

STAGES = ("rm", "reinforce", "remax", "ppo")
ATTENTION = ("auto", "xla", "mosaic_tpu", "cudnn")


def parse_tuning(text: str):
    """'full' or 'lora<rank>' (e.g. lora8) -> a TuningConfig (LoRA on the attention projections, alpha = 2 x rank)."""
    from pe_rlhf.models.lora import LoRAConfig
    from pe_rlhf.train.config import TuningConfig

    if text == "full":
        return TuningConfig(mode="full")
    if text.startswith("lora") and text[4:].isdigit():
        rank = int(text[4:])
        return TuningConfig(mode="lora", lora=LoRAConfig(rank=rank, alpha=2.0 * rank, targets="attention"))
    raise SystemExit(f"--tunings: {text!r} is not 'full' or 'lora<rank>' (e.g. lora8)")


def model_config(name: str, override: str | None, index: int):
    """The preset's shape, or with --preset-override tiny a tiny model of the same family (width grows with index)."""
    from pe_rlhf.models.config import preset
    from pe_rlhf.models.tiny import tiny_config

    cfg = preset(name)
    if override is None:
        return cfg
    if override != "tiny":
        raise SystemExit(f"--preset-override {override!r}: only 'tiny' is supported")
    return tiny_config(cfg.family, vocab_size=512, hidden_size=64 * (index + 1), intermediate_size=128 * (index + 1))


def param_count(cfg) -> int:
    import jax
    from flax import nnx

    from pe_rlhf.models.transformer import Transformer

    model = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))
    return int(sum(math.prod(x.shape) for x in jax.tree.leaves(nnx.state(model, nnx.Param))))


def row_setup(args, stage: str) -> dict:
    """What a row's numbers depend on besides its preset and tuning: where it was compiled and its shapes."""
    where = args.topology or "local"
    if stage == "rm":
        return {"where": where, "rm_pairs": args.rm_pairs, "rm_len": args.rm_len}
    shapes = {"rl_prompts": args.rl_prompts, "prompt_len": args.prompt_len, "new_tokens": args.new_tokens}
    return {"where": where, **shapes, **({"ppo_epochs": args.ppo_epochs} if stage == "ppo" else {})}


def attention_path(impl: str, cfg) -> str:
    """The attention a row runs: `impl`, with 'auto' resolved for the backend compiling it (a TPU topology
    compiled from a CPU host: 'xla'). The sampler's cached decoding runs 'xla' in every row."""
    from pe_rlhf.models.attention import resolve_attention_impl

    return resolve_attention_impl(impl, cfg.attn_logit_softcap)


def run_row(args, preset_name: str, cfg, tuning, frozen_dtype: str, stage: str, quantize: str,
            attention: str) -> dict:
    from pe_rlhf.profiling import step_builders
    from pe_rlhf.profiling.measure import measure_step

    options = dict(frozen_dtype=frozen_dtype, quantize=None if quantize == "none" else quantize,
                   attention_impl=attention)
    if stage == "rm":
        spec = step_builders.build_rm_step(cfg, tuning, pairs=args.rm_pairs, seq_len=args.rm_len, **options)
    else:
        spec = step_builders.build_rl_step(cfg, tuning, algorithm=stage, prompts=args.rl_prompts,
                                           prompt_len=args.prompt_len, new_tokens=args.new_tokens,
                                           ppo_epochs=args.ppo_epochs, **options)
    timed = args.local and args.time_iters > 0 and (args.time_presets is None or preset_name in args.time_presets)
    report = measure_step(spec, topology=args.topology, time_iters=args.time_iters if timed else 0)
    return dict(report.as_dict(), preset=preset_name, tuning=_label(tuning), stage=stage,
                rank=None if tuning.mode == "full" else tuning.lora.rank, frozen_dtype=frozen_dtype,
                quantize=quantize, attention=attention, setup=row_setup(args, stage))


def _label(tuning) -> str:
    from pe_rlhf.profiling.step_builders import tuning_label

    return tuning_label(tuning)


def _key(row) -> tuple:
    return row["preset"], row["tuning"], row["stage"], _dtype(row), quantize_of(row), attention_of(row)


def grid(args, configs: dict) -> list[tuple]:
    """(preset index, preset, TuningConfig, frozen dtype, stage, quantize, attention) over presets x stages x
    tunings x frozen dtypes x `--quantize` x `--attention` ('auto' resolved: `attention_path`).

    The dtype is the model's: in LoRA rows the frozen backbone's; in full rows the frozen models' (RL's anchor
    and reward model) and the compute copy of the fp32 master weights that train (`train.precision`), so a
    bf16 LoRA row is compared with a bf16 full row built as training builds it. A full RM with a quantised
    format is left out: all its weights train.
    """
    import dataclasses

    out = []
    for i, name in enumerate(args.presets):
        for stage in args.stages:
            for text in args.rl_tunings if stage != "rm" and args.rl_tunings else args.tunings:
                for dtype in args.frozen_dtype:
                    for fmt in args.quantize:
                        for impl in args.attention:
                            tuning = dataclasses.replace(parse_tuning(text), remat=args.remat)
                            if stage == "rm" and tuning.mode == "full" and fmt != "none":
                                continue
                            cell = (i, name, tuning, dtype, stage, fmt, attention_path(impl, configs[name]))
                            if cell not in out:
                                out.append(cell)
    return out


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--local", action="store_true", help="compile (and time) on this machine's default device")
    where.add_argument("--topology", help="TPU slice compiled ahead of time, e.g. v5e:2x2 (memory only)")
    p.add_argument("--presets", nargs="+", default=["gemma3-270m", "gemma3-1b", "gemma3-4b", "llama3-8b"])
    p.add_argument("--preset-override", default=None, help="'tiny': a tiny model of each preset's family (tests)")
    p.add_argument("--tunings", nargs="+", default=["full", "lora1", "lora4", "lora8", "lora16", "lora32"])
    p.add_argument("--rl-tunings", nargs="+", default=None, help="tunings for RL stages (default: --tunings)")
    p.add_argument("--stages", nargs="+", default=list(STAGES), choices=STAGES)
    p.add_argument("--frozen-dtype", nargs="+", default=["float32"], choices=["float32", "bfloat16"],
                   help="model dtype(s): the frozen weights (the LoRA backbone, the full RL anchor and reward "
                        "model) and, when fully tuning, the compute copy of the fp32 master weights")
    p.add_argument("--quantize", nargs="+", default=["none"], choices=QUANTIZE,
                   help="format(s) of the frozen projections: the LoRA backbone's, full RL's anchor and reward "
                        "model's (models.quant); a full RM has none and is measured unquantised only")
    p.add_argument("--attention", nargs="+", default=["auto"], choices=ATTENTION,
                   help="ModelConfig.attention_impl of every model (auto: mosaic_tpu on a TPU, cudnn on a GPU, "
                        "xla on a CPU and for a topology compiled ahead of time from this host)")
    p.add_argument("--remat", action="store_true", help="rematerialise each decoder block (every tuning)")
    p.add_argument("--rm-pairs", type=int, default=8)
    p.add_argument("--rm-len", type=int, default=512)
    p.add_argument("--rl-prompts", type=int, default=8)
    p.add_argument("--prompt-len", type=int, default=256)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--ppo-epochs", type=int, default=4)
    p.add_argument("--time-iters", type=int, default=0, help="timed steps per row (--local only; 0: no timing)")
    p.add_argument("--time-presets", nargs="+", default=None, help="presets to time (default: all with --local)")
    p.add_argument("--no-compile", action="store_true",
                   help="compile nothing: report the rows of this grid already in <out>/rows.jsonl")
    p.add_argument("--out", required=True, help="output directory")
    args = p.parse_args(argv)
    if args.topology and args.time_iters:
        p.error("--time-iters needs --local: a TPU topology is compiled ahead of time, never run")
    for text in args.tunings + (args.rl_tunings or []):
        if text != "full" and not (text.startswith("lora") and text[4:].isdigit()):
            p.error(f"--tunings: {text!r} is not 'full' or 'lora<rank>' (e.g. lora8)")
    return args


def read_rows(path: str, args) -> dict:
    """Rows already measured in `path` (rows.jsonl), by key; failed rows are left out so they are tried again.

    One directory holds one place and one set of shapes: a row measured elsewhere or at other shapes is an error.
    """
    done = {}
    if not os.path.exists(path):
        return done
    with open(path) as f:
        for lineno, line in enumerate(f, 1):
            row = json.loads(line)
            if "setup" in row and row["setup"] != row_setup(args, row["stage"]):
                raise SystemExit(f"{path}:{lineno}: {row['preset']} {row['stage']} {_name(row)} was measured with "
                                 f"{row['setup']}, this run asks for {row_setup(args, row['stage'])}; "
                                 "give another --out (one directory holds one topology and one set of shapes)")
            if not row.get("error"):
                done[_key(row)] = row
    return done


def main(argv=None):
    args = parse_args(argv)
    os.environ.setdefault("JAX_PLATFORMS", "cpu")  # compile-only TPU use must not probe for a TPU
    import jax

    from pe_rlhf.sharding.distributed import quiet_tpu_probe

    quiet_tpu_probe()  # loading libtpu to compile prints no errors on a machine without a TPU

    configs = {name: model_config(name, args.preset_override, i) for i, name in enumerate(args.presets)}
    cells = grid(args, configs)
    os.makedirs(args.out, exist_ok=True)
    rows_path = os.path.join(args.out, "rows.jsonl")
    done = read_rows(rows_path, args)
    for i, name, tuning, frozen, stage, fmt, impl in cells:
        key = (name, _label(tuning), stage, frozen, fmt, impl)
        if key in done or args.no_compile:
            continue
        print(f"[benchmark] {name} {stage} {_label(tuning)} {frozen} quantize={fmt} attention={impl} on "
              f"{args.topology or 'local'} ...", flush=True)
        try:
            row = run_row(args, name, configs[name], tuning, frozen, stage, fmt, impl)
        except Exception as e:  # one failing row must not lose the others; it is recorded with its error
            traceback.print_exc()
            row = {"preset": name, "tuning": _label(tuning), "stage": stage, "frozen_dtype": frozen,
                   "quantize": fmt, "attention": impl,
                   "rank": None if tuning.mode == "full" else tuning.lora.rank, "peak_bytes": None, "memory": None,
                   "error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}",
                   "arg_bytes": {"frozen": 0, "trainable": 0, "opt_state": 0}, "setup": row_setup(args, stage)}
        print(f"[benchmark]   peak {_gib(row.get('peak_bytes'))} GiB, compile {row.get('compile_s', 0):.1f} s"
              + ("" if row.get("median_step_s") is None else f", step {row['median_step_s']:.3f} s"), flush=True)
        with open(rows_path, "a") as f:
            f.write(json.dumps(row) + "\n")
        done[key] = row

    wanted = {(n, _label(t), s, frozen, fmt, impl) for _, n, t, frozen, s, fmt, impl in cells}
    rows = [r for k, r in done.items() if k in wanted]
    sizes = {name: param_count(cfg) for name, cfg in configs.items()}
    ratio_rows = ratios(rows, args.presets)
    machine = f"{os.cpu_count()}-core CPU ({platform.machine()}), jax {jax.__version__}, backend {jax.default_backend()}"
    where = (f"TPU {args.topology} (XLA's compiled memory analysis from libtpu AOT compilation; no TPU was used)"
             if args.topology else f"local {jax.default_backend()} ({os.cpu_count()} cores)")
    header = (f"Benchmark on {where}. RM: {args.rm_pairs} pairs x {args.rm_len} tokens; RL: {args.rl_prompts} "
              f"prompts x {args.prompt_len} + {args.new_tokens} new tokens (PPO {args.ppo_epochs} epochs); "
              f"model dtype {' / '.join(args.frozen_dtype)} (frozen weights; full tuning: fp32 masters of that "
              f"compute copy); frozen projections {' / '.join(args.quantize)}; attention "
              f"{' / '.join(sorted({c[-1] for c in cells}))}; {'per-block remat' if args.remat else 'no remat'}. "
              f"Baseline of every LoRA / full ratio: {BASELINE}.")
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump({"args": vars(args), "machine": machine, "param_counts": sizes, "rows": rows,
                   "ratios": ratio_rows, "targets": TARGETS}, f, indent=2)
    table = markdown(rows, ratio_rows, header)
    with open(os.path.join(args.out, "table.md"), "w") as f:
        f.write(table)
    plots(rows, ratio_rows, sizes, args.out)

    print("\n" + header)
    print(f"{'preset':14s} {'comparison':72s} {'memory ratio':>13s} {'speed-up':>9s}")
    for r in ratio_rows:
        mem = "" if r["memory"] is None else f"{r['memory']:.3f}"
        spd = "" if r["speedup"] is None else f"{r['speedup']:.2f}x"
        print(f"{r['preset']:14s} {r['comparison']:72s} {mem:>13s} {spd:>9s}")
    print(f"targets: LoRA RM <= {TARGETS['lora_rm_memory']:.0%} of full and >= {TARGETS['lora_rm_speedup']}x; "
          f"PE-ReMax <= {TARGETS['pe_remax_memory']:.0%} of full PPO and >= {TARGETS['pe_remax_speedup']}x")
    return rows, ratio_rows


if __name__ == "__main__":
    main()
