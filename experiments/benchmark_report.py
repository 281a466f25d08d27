"""The report of `experiments/benchmark.py`: rows read back, ratios against the fully tuned baseline, table, plots.

A row is one compiled step: preset, stage, tuning, model dtype, the frozen weights' format (`quantize`:
none | int8 | int4 | nf4) and the attention path (`attention`: xla | mosaic_tpu | cudnn; rows written before
these were recorded are 'none' and 'xla', as they were compiled). Every LoRA RM and PE-ReMax row is
compared with ONE fully tuned row, `BASELINE`: same preset, remat and model dtype (float32 where that dtype
has no full row), unquantised, the XLA attention path. ReMax / PPO pairs are at equal tuning and options.
"""

from __future__ import annotations

import os

# The speed and memory targets (benchmarks, not tests).
TARGETS = {"lora_rm_memory": 0.40, "lora_rm_speedup": 1.5, "pe_remax_memory": 0.50, "pe_remax_speedup": 1.8}
BASELINE = ("the fully tuned step of the same preset, remat and model dtype (float32 where that dtype has no "
            "full row), frozen weights unquantised, XLA attention")


FULL_STAGE = {"rm": "rm", "remax": "ppo"}  # the fully tuned step a LoRA step is compared with
QUANTIZE = ("none", "int8", "int4", "nf4")  # frozen formats (benchmark.py --quantize), by stored bytes


def _gib(n) -> str:
    return "n/a" if n is None else f"{n / 2**30:.2f}"


def _dtype(row) -> str:
    return row.get("frozen_dtype") or "float32"


def quantize_of(row) -> str:
    return row.get("quantize") or "none"


def attention_of(row) -> str:
    return row.get("attention") or "xla"


def options(row) -> str:
    """' xla', ' bf16 nf4 mosaic_tpu': the model dtype (when bfloat16), frozen format (when quantised), attention."""
    quantized = "" if quantize_of(row) == "none" else f" {quantize_of(row)}"
    return ("" if _dtype(row) == "float32" else " bf16") + quantized + f" {attention_of(row)}"


def _name(row) -> str:
    """'lora-r8-remat xla', or 'lora-r8-remat bf16 nf4 mosaic_tpu': tuning, dtype, frozen format, attention."""
    return row["tuning"] + options(row)


def _find(rows, preset, tuning, stage, frozen_dtype="float32", quantize="none", attention="xla"):
    return next((r for r in rows if r["preset"] == preset and r["tuning"] == tuning and r["stage"] == stage
                 and _dtype(r) == frozen_dtype and quantize_of(r) == quantize and attention_of(r) == attention
                 and r.get("peak_bytes") is not None), None)


def baseline(rows, row, stage):
    """The fully tuned row `row` is compared with (`BASELINE`): same preset and remat, step `stage`, the same
    dtype where one was measured, else float32; unquantised, on the XLA attention path."""
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
                                     r["rank"], quantize_of(r) != "none", quantize_of(r), attention_of(r)))
        for r in lora:
            full_stage = FULL_STAGE.get(r["stage"])
            full = full_stage and baseline(rows, r, full_stage)
            if full:
                add(p, f"{'RM' if r['stage'] == 'rm' else 'ReMax'} {_name(r)} / {full_stage.upper()} {_name(full)}",
                    r, full)
        for r in sorted((r for r in mine if r["stage"] == "remax"), key=_name):
            ppo = _find(rows, p, r["tuning"], "ppo", _dtype(r), quantize_of(r), attention_of(r))
            if ppo:
                add(p, f"ReMax {_name(r)} / PPO {_name(ppo)}", r, ppo)
    return [r for r in out if r["memory"] is not None or r["speedup"] is not None]


def markdown(rows: list[dict], ratio_rows: list[dict], header: str) -> str:
    lines = [header, "", "| preset | stage | tuning | frozen | quantize | attention | peak GiB/device | args | temp | "
             "aliased | fits | step s | frozen GiB | trainable GiB | opt GiB |",
             "|---|---|---|---|---|---|---:|---:|---:|---:|---|---:|---:|---:|---:|"]
    for r in rows:
        m = r.get("memory") or {}
        a = r["arg_bytes"]
        step = "" if r.get("median_step_s") is None else f"{r['median_step_s']:.3f}"
        fits = "" if r.get("fits") is None else ("yes" if r["fits"] else "NO")
        peak = _gib(r.get("peak_bytes")) + ("*" if r.get("memory") is None and r.get("peak_bytes") else "")
        lines.append(f"| {r['preset']} | {r['stage']} | {r['tuning']} | {_dtype(r)} | {quantize_of(r)} | "
                     f"{attention_of(r)} | {peak} | "
                     f"{_gib(m.get('argument_bytes'))} | {_gib(m.get('temp_bytes'))} | {_gib(m.get('alias_bytes'))} | "
                     f"{fits} | {step} | {_gib(a['frozen'])} | {_gib(a['trainable'])} | {_gib(a['opt_state'])} |")
    lines += ["", "Per-device peak = arguments + outputs + temporaries - aliased (XLA memory analysis); "
              "frozen / trainable / opt columns are global (unsharded) sizes. * = from the compiler's "
              "out-of-memory message.", "",
              f"Ratios: LoRA RM / full RM and PE-ReMax / full PPO are over {BASELINE}; ReMax / PPO at equal "
              "tuning and options.", "",
              "| preset | comparison | memory ratio | speed-up |", "|---|---|---:|---:|"]
    for r in ratio_rows:
        mem = "" if r["memory"] is None else f"{r['memory']:.3f}"
        spd = "" if r["speedup"] is None else f"{r['speedup']:.2f}x"
        lines.append(f"| {r['preset']} | {r['comparison']} | {mem} | {spd} |")
    return "\n".join(lines) + "\n"


def _variant(row) -> str:
    """' remat bf16 nf4 mosaic_tpu', ' xla' and the like, for a legend."""
    return (" remat" if row["tuning"].endswith("-remat") else "") + options(row)


def plots(rows: list[dict], ratio_rows: list[dict], sizes: dict[str, int], out: str) -> list[str]:
    """peak_by_rank.png, lora_full_ratio_by_size.png, remax_ppo_ratio.png and ratio_by_format.png (each LoRA
    step over its baseline, by frozen format and attention path; dashed: the QLoRA targets at 2,048 / 1,024 +
    512 tokens, RM 0.20 and PE-ReMax 0.12) under `out`; returns their paths."""
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
        full = baseline(rows, group[0], FULL_STAGE[stage])
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
            ratio = _ratio(r, baseline(rows, r, FULL_STAGE[r["stage"]]), "peak_bytes")
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
    # 4. each LoRA step's ratio to its baseline by frozen format and attention path, per model and step
    fig, axes = plt.subplots(1, 2, figsize=(9.6, 4.2), sharey=True)
    for ax, stage, title, target in ((axes[0], "rm", "LoRA RM / full RM", 0.20),
                                     (axes[1], "remax", "PE-ReMax / full PPO", 0.12)):
        cells, fmt_rank = {}, {}
        for r in lora:
            if r["stage"] == stage and r.get("memory") is not None:
                ratio = _ratio(r, baseline(rows, r, FULL_STAGE[stage]), "peak_bytes")
                if ratio is not None:
                    variant = f"r{r['rank']}{_variant(r)}"
                    cells[(r["preset"], variant)] = ratio
                    fmt_rank[variant] = QUANTIZE.index(quantize_of(r))
        presets = sorted({p for p, _ in cells}, key=lambda p: sizes.get(p, 0))
        variants = sorted(fmt_rank, key=lambda v: (fmt_rank[v], v))  # unquantised, then by stored bytes
        width = 0.8 / max(len(variants), 1)
        for i, v in enumerate(variants):
            xs = [j + (i - (len(variants) - 1) / 2) * width for j, p in enumerate(presets) if (p, v) in cells]
            ys = [cells[(p, v)] for p in presets if (p, v) in cells]
            ax.bar_label(ax.bar(xs, ys, width=width, label=v.strip()), fmt="%.3f", fontsize=6)
        ax.axhline(target, color="r", ls="--", lw=1, label=f"{target:.2f}")
        ax.set_xticks(range(len(presets)), presets, fontsize=7)
        ax.set_title(title, fontsize=9)
        if cells:
            ax.legend(fontsize=6)
        else:
            ax.text(0.5, 0.5, "no rows", ha="center", transform=ax.transAxes)
    axes[0].set_ylabel("peak / baseline's peak (per device)")
    paths.append(_save(fig, out, "ratio_by_format.png"))
    return paths


def _save(fig, out, name) -> str:
    import matplotlib.pyplot as plt

    path = os.path.join(out, name)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


__all__ = ["BASELINE", "FULL_STAGE", "QUANTIZE", "TARGETS", "attention_of", "baseline", "markdown", "options", "plots", "quantize_of", "ratios"]
