"""What PE-RLHF promises, measured: peak memory (and, locally, step time) over a grid of steps.

    # ahead of time for a TPU slice (memory only; needs the libtpu wheel, no TPU)
    python experiments/benchmark.py --topology v5e:2x2 --presets gemma3-270m gemma3-1b \
        --tunings full lora1 lora4 lora8 lora16 lora32 --stages rm reinforce remax ppo --out results/v5e
    # on this machine's devices (CPU: compiled memory, and step time with --time-iters)
    python experiments/benchmark.py --local --presets gemma3-270m --rm-pairs 4 --rm-len 256 --time-iters 3 ...
    # a tiny grid for tests: every preset becomes a tiny model of its family
    python experiments/benchmark.py --local --preset-override tiny ...

The grid is presets x tunings (full | lora<rank>) x stages (rm | reinforce | remax | ppo); RL stages use
`--rl-tunings` when given. Steps are built by `pe_rlhf.profiling.steps` from shapes alone. Each finished
row is appended to `<out>/rows.jsonl` at once (a rerun skips rows already there); at the end the script
writes `<out>/results.json`, `<out>/table.md`, three plots, and prints the ratios side by side:
LoRA RM / full RM, PE-ReMax / full PPO, ReMax / PPO at equal tuning.
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

STAGES = ("rm", "reinforce", "remax", "ppo")
# Targets of issue 7 (benchmarks, not tests).
TARGETS = {"lora_rm_memory": 0.40, "lora_rm_speedup": 1.5, "pe_remax_memory": 0.50, "pe_remax_speedup": 1.8}


def parse_tuning(text: str):
    """'full' or 'lora<rank>' (e.g. lora8) -> steps.Tuning."""
    from pe_rlhf.profiling.steps import Tuning

    if text == "full":
        return Tuning(mode="full")
    if text.startswith("lora") and text[4:].isdigit():
        return Tuning(mode="lora", rank=int(text[4:]))
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


def run_row(args, preset_name: str, cfg, tuning, stage: str) -> dict:
    from pe_rlhf.profiling import steps

    if stage == "rm":
        spec = steps.build_rm_step(cfg, tuning, pairs=args.rm_pairs, seq_len=args.rm_len)
    else:
        spec = steps.build_rl_step(cfg, tuning, algorithm=stage, prompts=args.rl_prompts,
                                   prompt_len=args.prompt_len, new_tokens=args.new_tokens, ppo_epochs=args.ppo_epochs)
    timed = args.local and args.time_iters > 0 and (args.time_presets is None or preset_name in args.time_presets)
    report = steps.measure_step(spec, topology=args.topology, time_iters=args.time_iters if timed else 0)
    return dict(report.as_dict(), preset=preset_name, tuning=tuning.label, stage=stage,
                rank=None if tuning.mode == "full" else tuning.rank, frozen_dtype=tuning.frozen_dtype)


def _key(row) -> tuple:
    return row["preset"], row["tuning"], row["stage"], row.get("frozen_dtype", "float32")


def grid(args) -> list[tuple]:
    rows = []
    for i, name in enumerate(args.presets):
        for stage in args.stages:
            tunings = args.rl_tunings if stage != "rm" and args.rl_tunings else args.tunings
            rows += [(i, name, t, stage) for t in tunings]
    return rows


# -- reading the results --------------------------------------------------------------------------
def _gib(n) -> str:
    return "n/a" if n is None else f"{n / 2**30:.2f}"


def _find(rows, preset, tuning, stage):
    return next((r for r in rows if r["preset"] == preset and r["tuning"] == tuning and r["stage"] == stage
                 and r.get("peak_bytes") is not None), None)


def _ratio(a, b, field):
    if a is None or b is None or a.get(field) is None or b.get(field) is None or not b[field]:
        return None
    return a[field] / b[field]


def ratios(rows: list[dict], presets: list[str]) -> list[dict]:
    """Per preset: LoRA RM / full RM (each rank), PE-ReMax / full PPO, ReMax / PPO at equal tuning; memory and time."""
    out = []
    for p in presets:
        full = "full-remat" if any(r["tuning"].endswith("-remat") for r in rows) else "full"
        full_rm = _find(rows, p, full, "rm")
        ranks = {r["tuning"]: r["rank"] for r in rows if r["preset"] == p and r["rank"] is not None}
        for r in sorted(ranks, key=ranks.get):
            lora_rm = _find(rows, p, r, "rm")
            out.append({"preset": p, "comparison": f"RM {r} / RM {full}",
                        "memory": _ratio(lora_rm, full_rm, "peak_bytes"),
                        "speedup": _ratio(full_rm, lora_rm, "median_step_s")})
            pe_remax, full_ppo = _find(rows, p, r, "remax"), _find(rows, p, full, "ppo")
            if pe_remax or full_ppo:
                out.append({"preset": p, "comparison": f"ReMax {r} / PPO {full}",
                            "memory": _ratio(pe_remax, full_ppo, "peak_bytes"),
                            "speedup": _ratio(full_ppo, pe_remax, "median_step_s")})
        for t in sorted({r["tuning"] for r in rows if r["preset"] == p and r["stage"] == "remax"}):
            remax, ppo = _find(rows, p, t, "remax"), _find(rows, p, t, "ppo")
            if remax and ppo:
                out.append({"preset": p, "comparison": f"ReMax {t} / PPO {t}",
                            "memory": _ratio(remax, ppo, "peak_bytes"), "speedup": _ratio(ppo, remax, "median_step_s")})
    return [r for r in out if r["memory"] is not None or r["speedup"] is not None]


def markdown(rows: list[dict], ratio_rows: list[dict], header: str) -> str:
    lines = [header, "", "| preset | stage | tuning | peak GiB/device | args | temp | aliased | fits | step s | "
             "frozen GiB | trainable GiB | opt GiB |", "|---|---|---|---:|---:|---:|---:|---|---:|---:|---:|---:|"]
    for r in rows:
        m = r.get("memory") or {}
        a = r["arg_bytes"]
        step = "" if r.get("median_step_s") is None else f"{r['median_step_s']:.3f}"
        fits = "" if r.get("fits") is None else ("yes" if r["fits"] else "NO")
        peak = _gib(r.get("peak_bytes")) + ("*" if r.get("memory") is None and r.get("peak_bytes") else "")
        lines.append(f"| {r['preset']} | {r['stage']} | {r['tuning']} | {peak} | {_gib(m.get('argument_bytes'))} | "
                     f"{_gib(m.get('temp_bytes'))} | {_gib(m.get('alias_bytes'))} | {fits} | {step} | "
                     f"{_gib(a['frozen'])} | {_gib(a['trainable'])} | {_gib(a['opt_state'])} |")
    lines += ["", "Per-device peak = arguments + outputs + temporaries - aliased (XLA memory analysis); "
              "frozen / trainable / opt columns are global (unsharded) sizes. * = from the compiler's "
              "out-of-memory message.", "", "| preset | comparison | memory ratio | speed-up |", "|---|---|---:|---:|"]
    for r in ratio_rows:
        mem = "" if r["memory"] is None else f"{r['memory']:.3f}"
        spd = "" if r["speedup"] is None else f"{r['speedup']:.2f}x"
        lines.append(f"| {r['preset']} | {r['comparison']} | {mem} | {spd} |")
    return "\n".join(lines) + "\n"


def plots(rows: list[dict], sizes: dict[str, int], out: str) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    presets = list(sizes)
    # 1. peak by rank (RM and PE-ReMax), full as a dashed line
    fig, ax = plt.subplots(figsize=(6, 4))
    for p in presets:
        for stage, style in (("rm", "o-"), ("remax", "s--")):
            pts = sorted((r["rank"], r["peak_bytes"]) for r in rows if r["preset"] == p and r["stage"] == stage
                         and r["rank"] is not None and r.get("peak_bytes") is not None)
            if pts:
                line, = ax.plot([x for x, _ in pts], [y / 2**30 for _, y in pts], style, label=f"{p} {stage} LoRA")
                full = _find(rows, p, "full", stage)
                if full:
                    ax.axhline(full["peak_bytes"] / 2**30, color=line.get_color(), ls=":", lw=1)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("LoRA rank (dotted: full fine-tuning)")
    ax.set_ylabel("peak GiB per device")
    ax.legend(fontsize=7)
    paths.append(_save(fig, out, "peak_by_rank.png"))
    # 2. LoRA / full ratio by model size
    fig, ax = plt.subplots(figsize=(6, 4))
    ranks = sorted({r["rank"] for r in rows if r["rank"] is not None})
    for rank in ranks:
        for stage, full_stage, label in (("rm", "rm", "RM"), ("remax", "ppo", "PE-ReMax / full PPO")):
            pts = [(sizes[p], _ratio(_find(rows, p, f"lora-r{rank}", stage), _find(rows, p, "full", full_stage),
                                     "peak_bytes")) for p in presets]
            pts = [(x, y) for x, y in pts if y is not None]
            if pts:
                ax.plot([x / 1e9 for x, _ in pts], [y for _, y in pts], "o-" if stage == "rm" else "s--",
                        label=f"{label} r{rank}")
    ax.set_xscale("log")
    ax.set_xlabel("parameters (billions)")
    ax.set_ylabel("LoRA peak / full peak")
    ax.legend(fontsize=7)
    paths.append(_save(fig, out, "lora_full_ratio_by_size.png"))
    # 3. ReMax / PPO at equal tuning
    fig, ax = plt.subplots(figsize=(6, 4))
    labels, values = [], []
    for p in presets:
        for t in sorted({r["tuning"] for r in rows if r["preset"] == p and r["stage"] == "remax"}):
            v = _ratio(_find(rows, p, t, "remax"), _find(rows, p, t, "ppo"), "peak_bytes")
            if v is not None:
                labels.append(f"{p}\n{t}")
                values.append(v)
    ax.bar(range(len(values)), values)
    ax.set_xticks(range(len(values)), labels, fontsize=7)
    ax.axhline(1.0, color="k", lw=0.5)
    ax.set_ylabel("ReMax peak / PPO peak")
    paths.append(_save(fig, out, "remax_ppo_ratio.png"))
    return paths


def _save(fig, out, name) -> str:
    path = os.path.join(out, name)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


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
    p.add_argument("--frozen-dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--remat", action="store_true", help="rematerialise each decoder block (every tuning)")
    p.add_argument("--rm-pairs", type=int, default=8)
    p.add_argument("--rm-len", type=int, default=512)
    p.add_argument("--rl-prompts", type=int, default=8)
    p.add_argument("--prompt-len", type=int, default=256)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--ppo-epochs", type=int, default=4)
    p.add_argument("--time-iters", type=int, default=0, help="timed steps per row (--local only; 0: no timing)")
    p.add_argument("--time-presets", nargs="+", default=None, help="presets to time (default: all with --local)")
    p.add_argument("--out", required=True, help="output directory")
    args = p.parse_args(argv)
    if args.topology and args.time_iters:
        p.error("--time-iters needs --local: a TPU topology is compiled ahead of time, never run")
    return args


def main(argv=None):
    args = parse_args(argv)
    os.environ.setdefault("JAX_PLATFORMS", "cpu")  # compile-only TPU use must not probe for a TPU
    import dataclasses

    import jax

    options = dict(frozen_dtype=args.frozen_dtype, remat=args.remat)
    args.tunings = [dataclasses.replace(parse_tuning(t), **options) for t in args.tunings]
    if args.rl_tunings:
        args.rl_tunings = [dataclasses.replace(parse_tuning(t), **options) for t in args.rl_tunings]
    os.makedirs(args.out, exist_ok=True)
    rows_path = os.path.join(args.out, "rows.jsonl")
    done = {}
    if os.path.exists(rows_path):
        with open(rows_path) as f:
            for line in f:
                row = json.loads(line)
                if not row.get("error"):  # a failed row is tried again
                    done[_key(row)] = row
    configs = {name: model_config(name, args.preset_override, i) for i, name in enumerate(args.presets)}
    for i, name, tuning, stage in grid(args):
        key = (name, tuning.label, stage, tuning.frozen_dtype)
        if key in done:
            continue
        print(f"[benchmark] {name} {stage} {tuning.label} on {args.topology or 'local'} ...", flush=True)
        try:
            row = run_row(args, name, configs[name], tuning, stage)
        except Exception as e:  # one failing row must not lose the others; it is recorded with its error
            traceback.print_exc()
            row = {"preset": name, "tuning": tuning.label, "stage": stage, "frozen_dtype": tuning.frozen_dtype,
                   "rank": None if tuning.mode == "full" else tuning.rank, "peak_bytes": None, "memory": None,
                   "error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}",
                   "arg_bytes": {"frozen": 0, "trainable": 0, "opt_state": 0}}
        print(f"[benchmark]   peak {_gib(row.get('peak_bytes'))} GiB, compile {row.get('compile_s', 0):.1f} s"
              + ("" if row.get("median_step_s") is None else f", step {row['median_step_s']:.3f} s"), flush=True)
        with open(rows_path, "a") as f:
            f.write(json.dumps(row) + "\n")
        done[key] = row

    wanted = {(n, t.label, s, t.frozen_dtype) for _, n, t, s in grid(args)}
    rows = [r for k, r in done.items() if k in wanted]
    sizes = {name: param_count(cfg) for name, cfg in configs.items()}
    ratio_rows = ratios(rows, args.presets)
    machine = f"{os.cpu_count()}-core CPU ({platform.machine()}), jax {jax.__version__}, backend {jax.default_backend()}"
    where = (f"TPU {args.topology} (XLA's compiled memory analysis from libtpu AOT compilation; no TPU was used)"
             if args.topology else f"local {jax.default_backend()} ({os.cpu_count()} cores)")
    header = (f"Benchmark on {where}. RM: {args.rm_pairs} pairs x {args.rm_len} tokens; RL: {args.rl_prompts} "
              f"prompts x {args.prompt_len} + {args.new_tokens} new tokens (PPO {args.ppo_epochs} epochs); "
              f"frozen weights {args.frozen_dtype}.")
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump({"args": {k: (v if not isinstance(v, list) or not v or isinstance(v[0], str) else
                                [t.label for t in v]) for k, v in vars(args).items()},
                   "machine": machine, "param_counts": sizes, "rows": rows, "ratios": ratio_rows,
                   "targets": TARGETS}, f, indent=2)
    table = markdown(rows, ratio_rows, header)
    with open(os.path.join(args.out, "table.md"), "w") as f:
        f.write(table)
    plots(rows, sizes, args.out)

    print("\n" + header)
    print(f"{'preset':14s} {'comparison':28s} {'memory ratio':>13s} {'speed-up':>9s}")
    for r in ratio_rows:
        mem = "" if r["memory"] is None else f"{r['memory']:.3f}"
        spd = "" if r["speedup"] is None else f"{r['speedup']:.2f}x"
        print(f"{r['preset']:14s} {r['comparison']:28s} {mem:>13s} {spd:>9s}")
    print(f"targets: LoRA RM <= {TARGETS['lora_rm_memory']:.0%} of full and >= {TARGETS['lora_rm_speedup']}x; "
          f"PE-ReMax <= {TARGETS['pe_remax_memory']:.0%} of full PPO and >= {TARGETS['pe_remax_speedup']}x")
    return rows, ratio_rows


if __name__ == "__main__":
    main()
