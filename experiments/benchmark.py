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

The grid is presets x tunings (full | lora<rank>) x stages (rm | reinforce | remax | ppo) x frozen dtypes;
RL stages use `--rl-tunings` when given. Steps are built by `pe_rlhf.profiling.step_builders` from shapes alone.
Each finished row is appended to `<out>/rows.jsonl` at once (a rerun skips rows already there; one
directory holds one topology and one set of shapes); at the end the script writes `<out>/results.json`,
`<out>/table.md`, three plots (peak by LoRA rank; LoRA / full by model size; ReMax / PPO), and prints the
ratios side by side: LoRA RM / full RM, PE-ReMax / full PPO, ReMax / PPO at equal tuning. A LoRA row is
compared with the full row of the same remat setting and model dtype (float32 where none was measured);
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

STAGES = ("rm", "reinforce", "remax", "ppo")
# Targets of issue 7 (benchmarks, not tests).
TARGETS = {"lora_rm_memory": 0.40, "lora_rm_speedup": 1.5, "pe_remax_memory": 0.50, "pe_remax_speedup": 1.8}


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


def run_row(args, preset_name: str, cfg, tuning, frozen_dtype: str, stage: str) -> dict:
    from pe_rlhf.profiling import step_builders

    if stage == "rm":
        spec = step_builders.build_rm_step(cfg, tuning, pairs=args.rm_pairs, seq_len=args.rm_len,
                                           frozen_dtype=frozen_dtype)
    else:
        spec = step_builders.build_rl_step(cfg, tuning, algorithm=stage, prompts=args.rl_prompts,
                                           prompt_len=args.prompt_len, new_tokens=args.new_tokens,
                                           ppo_epochs=args.ppo_epochs, frozen_dtype=frozen_dtype)
    timed = args.local and args.time_iters > 0 and (args.time_presets is None or preset_name in args.time_presets)
    report = step_builders.measure_step(spec, topology=args.topology, time_iters=args.time_iters if timed else 0)
    return dict(report.as_dict(), preset=preset_name, tuning=_label(tuning), stage=stage,
                rank=None if tuning.mode == "full" else tuning.lora.rank, frozen_dtype=frozen_dtype,
                setup=row_setup(args, stage))


def _label(tuning) -> str:
    from pe_rlhf.profiling.step_builders import tuning_label

    return tuning_label(tuning)


def _key(row) -> tuple:
    return row["preset"], row["tuning"], row["stage"], _dtype(row)


def grid(args) -> list[tuple]:
    """(preset index, preset, TuningConfig, frozen dtype, stage) for presets x stages x tunings x frozen dtypes.

    The dtype is the model's: in LoRA rows the frozen backbone's; in full rows the frozen models' (RL's anchor
    and reward model) and the compute copy of the fp32 master weights that train (`train.precision`), so a
    bf16 LoRA row is compared with a bf16 full row built as training builds it.
    """
    import dataclasses

    out = []
    for i, name in enumerate(args.presets):
        for stage in args.stages:
            for text in args.rl_tunings if stage != "rm" and args.rl_tunings else args.tunings:
                for dtype in args.frozen_dtype:
                    tuning = dataclasses.replace(parse_tuning(text), remat=args.remat)
                    if (i, name, tuning, dtype, stage) not in out:
                        out.append((i, name, tuning, dtype, stage))
    return out


# -- reading the results --------------------------------------------------------------------------
def _gib(n) -> str:
    return "n/a" if n is None else f"{n / 2**30:.2f}"


def _dtype(row) -> str:
    return row.get("frozen_dtype") or "float32"


def _name(row) -> str:
    """'lora-r8-remat', or 'lora-r8-remat bf16' where the frozen weights are bfloat16."""
    return row["tuning"] + ("" if _dtype(row) == "float32" else " bf16")


def _find(rows, preset, tuning, stage, frozen_dtype="float32"):
    return next((r for r in rows if r["preset"] == preset and r["tuning"] == tuning and r["stage"] == stage
                 and _dtype(r) == frozen_dtype and r.get("peak_bytes") is not None), None)


def baseline(rows, row, stage):
    """The fully tuned row `row` is compared with: same preset and remat, step `stage`, the same dtype where
    one was measured, else float32 (rows recorded before full bf16 rows were built as mixed precision)."""
    full = "full-remat" if row["tuning"].endswith("-remat") else "full"
    return (_find(rows, row["preset"], full, stage, _dtype(row))
            or _find(rows, row["preset"], full, stage, "float32"))


def _ratio(a, b, field):
    if a is None or b is None or a.get(field) is None or b.get(field) is None or not b[field]:
        return None
    return a[field] / b[field]


def ratios(rows: list[dict], presets: list[str]) -> list[dict]:
    """Per preset: LoRA RM / full RM (each rank), PE-ReMax / full PPO, ReMax / PPO at equal tuning; memory and time."""
    out = []

    def add(preset, comparison, a, b):
        if b.get("memory") is None:  # b did not fit: its peak is the usage the compiler's message gives
            comparison += " (denominator from the OOM message)"
        out.append({"preset": preset, "comparison": comparison, "memory": _ratio(a, b, "peak_bytes"),
                    "speedup": _ratio(b, a, "median_step_s")})

    for p in presets:
        mine = [r for r in rows if r["preset"] == p and r.get("peak_bytes") is not None]
        lora = sorted((r for r in mine if r["rank"] is not None),
                      key=lambda r: (r["stage"] != "rm", r["tuning"].endswith("-remat"), _dtype(r) != "float32",
                                     r["rank"]))
        for r in lora:
            full_stage = {"rm": "rm", "remax": "ppo"}.get(r["stage"])
            full = full_stage and baseline(rows, r, full_stage)
            if full:
                add(p, f"{'RM' if r['stage'] == 'rm' else 'ReMax'} {_name(r)} / {full_stage.upper()} {_name(full)}",
                    r, full)
        for r in sorted((r for r in mine if r["stage"] == "remax"), key=_name):
            ppo = _find(rows, p, r["tuning"], "ppo", _dtype(r))
            if ppo:
                add(p, f"ReMax {_name(r)} / PPO {_name(ppo)}", r, ppo)
    return [r for r in out if r["memory"] is not None or r["speedup"] is not None]


def markdown(rows: list[dict], ratio_rows: list[dict], header: str) -> str:
    lines = [header, "", "| preset | stage | tuning | frozen | peak GiB/device | args | temp | aliased | fits | "
             "step s | frozen GiB | trainable GiB | opt GiB |",
             "|---|---|---|---|---:|---:|---:|---:|---|---:|---:|---:|---:|"]
    for r in rows:
        m = r.get("memory") or {}
        a = r["arg_bytes"]
        step = "" if r.get("median_step_s") is None else f"{r['median_step_s']:.3f}"
        fits = "" if r.get("fits") is None else ("yes" if r["fits"] else "NO")
        peak = _gib(r.get("peak_bytes")) + ("*" if r.get("memory") is None and r.get("peak_bytes") else "")
        lines.append(f"| {r['preset']} | {r['stage']} | {r['tuning']} | {_dtype(r)} | {peak} | "
                     f"{_gib(m.get('argument_bytes'))} | {_gib(m.get('temp_bytes'))} | {_gib(m.get('alias_bytes'))} | "
                     f"{fits} | {step} | {_gib(a['frozen'])} | {_gib(a['trainable'])} | {_gib(a['opt_state'])} |")
    lines += ["", "Per-device peak = arguments + outputs + temporaries - aliased (XLA memory analysis); "
              "frozen / trainable / opt columns are global (unsharded) sizes. * = from the compiler's "
              "out-of-memory message.", "", "| preset | comparison | memory ratio | speed-up |", "|---|---|---:|---:|"]
    for r in ratio_rows:
        mem = "" if r["memory"] is None else f"{r['memory']:.3f}"
        spd = "" if r["speedup"] is None else f"{r['speedup']:.2f}x"
        lines.append(f"| {r['preset']} | {r['comparison']} | {mem} | {spd} |")
    return "\n".join(lines) + "\n"


def _variant(row) -> str:
    """' remat', ' bf16', ' remat bf16' or '' for a legend."""
    return (" remat" if row["tuning"].endswith("-remat") else "") + ("" if _dtype(row) == "float32" else " bf16")


def plots(rows: list[dict], ratio_rows: list[dict], sizes: dict[str, int], out: str) -> list[str]:
    """peak_by_rank.png, lora_full_ratio_by_size.png, remax_ppo_ratio.png under `out`; returns their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    measured = [r for r in rows if r.get("peak_bytes") is not None]
    lora = [r for r in measured if r["rank"] is not None]
    # 1. peak by rank (RM and PE-ReMax), the fully tuned step it is compared with as a dotted line
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    series = {}
    for r in lora:
        if r["stage"] in ("rm", "remax"):
            series.setdefault((r["preset"], r["stage"], _variant(r)), []).append(r)
    peaks = []
    for (p, stage, variant), group in sorted(series.items(), key=lambda kv: (sizes.get(kv[0][0], 0), kv[0][1:])):
        group.sort(key=lambda r: r["rank"])
        ys = [r["peak_bytes"] / 2**30 for r in group]
        line, = ax.plot([r["rank"] for r in group], ys, "o-" if stage == "rm" else "s--",
                        label=f"{p} {'RM' if stage == 'rm' else 'PE-ReMax'} LoRA{variant}")
        peaks += ys
        full = baseline(rows, group[0], "rm" if stage == "rm" else "ppo")
        if full:
            ax.axhline(full["peak_bytes"] / 2**30, color=line.get_color(), ls=":", lw=1.2)
            peaks.append(full["peak_bytes"] / 2**30)
    if peaks:
        ax.set_xscale("log", base=2)
        ranks = sorted({r["rank"] for r in lora})
        ax.set_xticks(ranks, [str(k) for k in ranks])
        if max(peaks) > 8 * min(peaks):
            ax.set_yscale("log")
        else:
            ax.set_ylim(0, 1.1 * max(peaks))
        ax.legend(fontsize=7)
    else:
        ax.text(0.5, 0.5, "no LoRA rows", ha="center", transform=ax.transAxes)
    ax.set_xlabel("LoRA rank")
    ax.set_ylabel("peak GiB per device")
    ax.set_title("Peak memory by LoRA rank (dotted: the fully tuned step: full RM; full PPO for PE-ReMax)",
                 fontsize=8)
    paths.append(_save(fig, out, "peak_by_rank.png"))
    # 2. LoRA / full ratio by model size, against the target and the PE-RLHF paper's RM range
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    series = {}
    for r in lora:
        if r["stage"] in ("rm", "remax"):
            ratio = _ratio(r, baseline(rows, r, "rm" if r["stage"] == "rm" else "ppo"), "peak_bytes")
            if ratio is not None and r["preset"] in sizes:
                series.setdefault((r["stage"], r["rank"], _variant(r)), []).append((sizes[r["preset"]], ratio))
    for (stage, rank, variant), pts in sorted(series.items()):
        pts.sort()
        ax.plot([x / 1e9 for x, _ in pts], [y for _, y in pts], "o-" if stage == "rm" else "s--",
                label=f"{'RM' if stage == 'rm' else 'PE-ReMax / full PPO'} r{rank}{variant}")
    ax.axhspan(0.43, 0.74, color="0.85", label="PE-RLHF paper: LoRA RM 43-74%")
    ax.axhline(TARGETS["lora_rm_memory"], color="r", ls="--", lw=1, label=f"target RM {TARGETS['lora_rm_memory']:.2f}")
    if any(stage == "remax" for stage, _, _ in series):
        ax.axhline(TARGETS["pe_remax_memory"], color="m", ls="--", lw=1,
                   label=f"target PE-ReMax {TARGETS['pe_remax_memory']:.2f}")
    ax.set_xscale("log")
    shown = sorted({sizes[r["preset"]] for r in lora if r["preset"] in sizes})
    names = {size: p for p, size in sizes.items()}
    ax.set_xticks([x / 1e9 for x in shown], [f"{x / 1e9:.2g}B\n{names[x]}" for x in shown], fontsize=7)
    ax.minorticks_off()
    ax.set_ylim(0, 1.05)
    ax.set_xlabel("parameters (billions)")
    ax.set_ylabel("LoRA peak / full peak (per device)")
    ax.legend(fontsize=7)
    paths.append(_save(fig, out, "lora_full_ratio_by_size.png"))
    # 3. ReMax / PPO: PE-ReMax against full PPO, and at equal tuning
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    bars = [r for r in ratio_rows if r["comparison"].startswith("ReMax") and r["memory"] is not None]
    drawn = ax.bar(range(len(bars)), [r["memory"] for r in bars], width=0.5)
    ax.bar_label(drawn, fmt="%.3f", fontsize=7)
    ax.set_xlim(-0.75, max(len(bars), 3) - 0.25)
    ax.set_xticks(range(len(bars)), [f"{r['preset']}\n{r['comparison'].replace(' / ', chr(10) + '/ ')}"
                                     for r in bars], fontsize=6)
    ax.axhline(1.0, color="k", lw=0.5)
    ax.axhline(TARGETS["pe_remax_memory"], color="m", ls="--", lw=1, label="target PE-ReMax / full PPO 0.50")
    ax.set_ylabel("ReMax peak / PPO peak (per device)")
    ax.legend(fontsize=7)
    if not bars:
        ax.text(0.5, 0.5, "no ReMax / PPO pairs", ha="center", transform=ax.transAxes)
    paths.append(_save(fig, out, "remax_ppo_ratio.png"))
    return paths


def _save(fig, out, name) -> str:
    import matplotlib.pyplot as plt

    path = os.path.join(out, name)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
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
    p.add_argument("--frozen-dtype", nargs="+", default=["float32"], choices=["float32", "bfloat16"],
                   help="model dtype(s): the frozen weights (the LoRA backbone, the full RL anchor and reward "
                        "model) and, when fully tuning, the compute copy of the fp32 master weights")
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

    cells = grid(args)
    os.makedirs(args.out, exist_ok=True)
    rows_path = os.path.join(args.out, "rows.jsonl")
    done = read_rows(rows_path, args)
    configs = {name: model_config(name, args.preset_override, i) for i, name in enumerate(args.presets)}
    for i, name, tuning, frozen, stage in cells:
        key = (name, _label(tuning), stage, frozen)
        if key in done or args.no_compile:
            continue
        print(f"[benchmark] {name} {stage} {_label(tuning)} {frozen} on {args.topology or 'local'} ...", flush=True)
        try:
            row = run_row(args, name, configs[name], tuning, frozen, stage)
        except Exception as e:  # one failing row must not lose the others; it is recorded with its error
            traceback.print_exc()
            row = {"preset": name, "tuning": _label(tuning), "stage": stage, "frozen_dtype": frozen,
                   "rank": None if tuning.mode == "full" else tuning.lora.rank, "peak_bytes": None, "memory": None,
                   "error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}",
                   "arg_bytes": {"frozen": 0, "trainable": 0, "opt_state": 0}, "setup": row_setup(args, stage)}
        print(f"[benchmark]   peak {_gib(row.get('peak_bytes'))} GiB, compile {row.get('compile_s', 0):.1f} s"
              + ("" if row.get("median_step_s") is None else f", step {row['median_step_s']:.3f} s"), flush=True)
        with open(rows_path, "a") as f:
            f.write(json.dumps(row) + "\n")
        done[key] = row

    wanted = {(n, _label(t), s, frozen) for _, n, t, frozen, s in cells}
    rows = [r for k, r in done.items() if k in wanted]
    sizes = {name: param_count(cfg) for name, cfg in configs.items()}
    ratio_rows = ratios(rows, args.presets)
    machine = f"{os.cpu_count()}-core CPU ({platform.machine()}), jax {jax.__version__}, backend {jax.default_backend()}"
    where = (f"TPU {args.topology} (XLA's compiled memory analysis from libtpu AOT compilation; no TPU was used)"
             if args.topology else f"local {jax.default_backend()} ({os.cpu_count()} cores)")
    header = (f"Benchmark on {where}. RM: {args.rm_pairs} pairs x {args.rm_len} tokens; RL: {args.rl_prompts} "
              f"prompts x {args.prompt_len} + {args.new_tokens} new tokens (PPO {args.ppo_epochs} epochs); "
              f"model dtype {' / '.join(args.frozen_dtype)} (frozen weights; full tuning: fp32 masters of that "
              "compute copy); "
              f"{'per-block remat' if args.remat else 'no remat'}.")
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump({"args": vars(args), "machine": machine, "param_counts": sizes, "rows": rows,
                   "ratios": ratio_rows, "targets": TARGETS}, f, indent=2)
    table = markdown(rows, ratio_rows, header)
    with open(os.path.join(args.out, "table.md"), "w") as f:
        f.write(table)
    plots(rows, ratio_rows, sizes, args.out)

    print("\n" + header)
    print(f"{'preset':14s} {'comparison':44s} {'memory ratio':>13s} {'speed-up':>9s}")
    for r in ratio_rows:
        mem = "" if r["memory"] is None else f"{r['memory']:.3f}"
        spd = "" if r["speedup"] is None else f"{r['speedup']:.2f}x"
        print(f"{r['preset']:14s} {r['comparison']:44s} {mem:>13s} {spd:>9s}")
    print(f"targets: LoRA RM <= {TARGETS['lora_rm_memory']:.0%} of full and >= {TARGETS['lora_rm_speedup']}x; "
          f"PE-ReMax <= {TARGETS['pe_remax_memory']:.0%} of full PPO and >= {TARGETS['pe_remax_speedup']}x")
    return rows, ratio_rows


if __name__ == "__main__":
    main()
