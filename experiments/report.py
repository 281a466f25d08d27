"""Plots and a Markdown summary of a workdir: an RM, SFT or RL run, a pipeline, a judged comparison, a gold benchmark.

    python experiments/report.py --workdir=/tmp/quickstart            # writes /tmp/quickstart/report/

Finds every run under the workdir (two levels deep: a pipeline's sft/, reward_model/,
rl/), and writes into `--out` (default WORKDIR/report):
- `<run>_curves.png`: reward, KL, loss, accuracy and gold reward over steps (what the run logged);
- `win_rates.png`: wins, ties and losses of every judged comparison (`judge_policies` outputs);
- `report.md`: the numbers, the figures, a few responses the policy wrote;
- `report.json`: the series behind the figures.
The gold reward over steps is the mean of `--gold(prompt, response)` over the RL run's
`samples_<step>.jsonl`; `--gold auto` uses the toy task's rule when every prompt is a toy prompt.
"""

from __future__ import annotations

import argparse
import glob
import importlib
import json
import os
import re
import sys
from typing import Callable

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

MARKERS = ("metrics.jsonl", "judgements.jsonl", "gold_benchmark.json", "run_info.json")
SKIP_DIRS = ("checkpoints", "tensorboard", "export", "report")
PANELS = (
    ("reward", ("train/reward_mean", "train/baseline_reward", "eval/reward", "eval/greedy_reward")),
    ("KL to the anchor", ("train/kl", "train/kl_k3")),
    ("loss", ("train/loss",)),
    ("accuracy", ("train/accuracy", "eval/pairwise_accuracy", "eval/accuracy")),
)


# -- reading ----------------------------------------------------------------------------------------
def read_jsonl(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def read_json(path: str) -> dict | None:
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def find_runs(workdir: str, depth: int = 2) -> list[str]:
    """The workdir and its sub-directories (up to `depth` levels) that hold a run's outputs."""
    found = []

    def visit(d, level):
        if any(os.path.exists(os.path.join(d, m)) for m in MARKERS) or (level == 0 and
                                                                       os.path.exists(os.path.join(d, "summary.json"))):
            found.append(d)
        if level < depth:
            for name in sorted(os.listdir(d)):
                sub = os.path.join(d, name)
                if os.path.isdir(sub) and name not in SKIP_DIRS:
                    visit(sub, level + 1)

    visit(workdir, 0)
    return found


def series(rows: list[dict], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of one metric, skipping rows without it (and non-finite values logged as null)."""
    pts = [(r["step"], r[key]) for r in rows if r.get(key) is not None]
    return [s for s, _ in pts], [float(v) for _, v in pts]


def sample_files(run_dir: str) -> list[tuple[int, str]]:
    """(step, path) of the RL run's samples_<step>.jsonl, by step."""
    out = []
    for path in glob.glob(os.path.join(run_dir, "samples_*.jsonl")):
        m = re.fullmatch(r"samples_(\d+)\.jsonl", os.path.basename(path))
        if m:
            out.append((int(m.group(1)), path))
    return sorted(out)


def gold_series(run_dir: str, gold: Callable[[str, str], float]) -> tuple[list[int], list[float]]:
    """Mean gold reward of the responses in each samples_<step>.jsonl."""
    steps, values = [], []
    for step, path in sample_files(run_dir):
        rows = read_jsonl(path)
        if rows:
            steps.append(step)
            values.append(sum(gold(r["prompt"], r["response"]) for r in rows) / len(rows))
    return steps, values


def resolve_gold(spec: str, workdir: str) -> Callable[[str, str], float] | None:
    """`none`, `module:function`, or `auto` (the toy rule when every sampled prompt is a toy prompt)."""
    if spec == "none":
        return None
    if spec != "auto":
        module, _, name = spec.partition(":")
        return getattr(importlib.import_module(module), name)
    from pe_rlhf.data import toy

    toy_prompts = {toy.prompt_text(v, o) for v in toy.HARMFUL + toy.BENIGN for o in toy.OBJECTS}
    prompts = set()
    for run in find_runs(workdir):
        for _, path in sample_files(run)[:1]:
            prompts |= {r["prompt"] for r in read_jsonl(path)}
    return toy.gold_reward if prompts and prompts <= toy_prompts else None


# -- plotting ---------------------------------------------------------------------------------------
def run_curves(run_dir: str, gold: Callable | None) -> dict[str, dict[str, tuple[list, list]]]:
    """panel -> {label: (steps, values)} of what this run logged (empty panels left out)."""
    path = os.path.join(run_dir, "metrics.jsonl")
    rows = read_jsonl(path) if os.path.exists(path) else []
    panels = {}
    for title, keys in PANELS:
        curves = {k: series(rows, k) for k in keys}
        curves = {k: v for k, v in curves.items() if v[0]}
        if curves:
            panels[title] = curves
    if gold is not None:
        steps, values = gold_series(run_dir, gold)
        if steps:
            panels["gold reward"] = {"gold (eval responses)": (steps, values)}
    return panels


def plot_panels(panels: dict, title: str, out_path: str) -> None:
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.4), squeeze=False)
    for ax, (name, curves) in zip(axes[0], panels.items()):
        for label, (steps, values) in curves.items():
            ax.plot(steps, values, marker="o" if len(steps) < 12 else None, ms=3, label=label)
        ax.set_title(name)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(out_path, dpi=110)
    plt.close(fig)


def plot_win_rates(judged: list[tuple[str, dict]], out_path: str) -> None:
    """Stacked win/tie/loss fractions per comparison, with the win rate's confidence interval."""
    fig, ax = plt.subplots(figsize=(7, 0.7 + 0.6 * len(judged)))
    for i, (name, s) in enumerate(judged):
        left = 0.0
        for key, color in (("win_rate", "tab:green"), ("tie_rate", "tab:gray"), ("loss_rate", "tab:red")):
            ax.barh(i, s[key], left=left, color=color, label=key.split("_")[0] if i == 0 else None)
            left += s[key]
        lo, hi = s["win_rate_ci"]
        ax.errorbar(s["win_rate"], i, xerr=[[s["win_rate"] - lo], [hi - s["win_rate"]]], color="k", capsize=3)
    ax.set_yticks(range(len(judged)), [n for n, _ in judged], fontsize=7)
    ax.set_xlim(0, 1)
    ax.set_xlabel("fraction of prompts (policy vs baseline, both orders)")
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(out_path, dpi=110)
    plt.close(fig)


# -- the report -------------------------------------------------------------------------------------
def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def _scalars(summary: dict) -> list[tuple[str, object]]:
    return [(k, v) for k, v in sorted(summary.items()) if isinstance(v, (int, float)) and not isinstance(v, bool)]


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", "\\n")


def write_report(workdir: str, out_dir: str | None = None, gold: str = "auto") -> dict:
    """Write report.md, report.json and the figures; returns what report.json holds."""
    workdir = os.path.abspath(workdir)
    out_dir = out_dir or os.path.join(workdir, "report")
    os.makedirs(out_dir, exist_ok=True)
    gold_fn = resolve_gold(gold, workdir)
    lines = [f"# Report: `{workdir}`", ""]
    if gold_fn is not None:
        lines += [f"Gold reward: `{gold_fn.__module__}.{gold_fn.__qualname__}`.", ""]
    data, judged = {"workdir": workdir, "runs": {}}, []
    for run in find_runs(workdir):
        name = os.path.relpath(run, workdir)
        name = "." if name == "." else name
        slug = "root" if name == "." else name.replace(os.sep, "_")
        info = read_json(os.path.join(run, "run_info.json")) or {}
        summary = read_json(os.path.join(run, "summary.json")) or {}
        entry = {"stage": info.get("stage")}
        lines += [f"## `{name}`" + (f" ({info['stage']})" if info.get("stage") else ""), ""]

        panels = run_curves(run, gold_fn)
        if panels:
            fig = f"{slug}_curves.png"
            plot_panels(panels, name, os.path.join(out_dir, fig))
            entry["curves"] = {p: {k: {"steps": s, "values": v} for k, (s, v) in c.items()} for p, c in panels.items()}
            lines += [f"![{name}]({fig})", "", "| metric | first | last | steps |", "|---|---|---|---|"]
            for p, curves in panels.items():
                for k, (s, v) in curves.items():
                    lines.append(f"| {k} | {_fmt(v[0])} | {_fmt(v[-1])} | {s[0]}..{s[-1]} |")
            lines.append("")

        if os.path.exists(os.path.join(run, "judgements.jsonl")) and "win_rate" in summary:
            judged.append((name, summary))
            lo, hi = summary["win_rate_ci"]
            lines += [f"Policy `{summary.get('policy')}` against baseline `{summary.get('baseline')}`, judge "
                      f"{summary.get('judge')}, {summary.get('comparisons')} prompts, both orders "
                      f"({summary.get('ci_method')} interval).", "",
                      "| wins | ties | losses | win rate | 95% CI | first-position rate |", "|---|---|---|---|---|---|",
                      f"| {summary['wins']} | {summary['ties']} | {summary['losses']} | {summary['win_rate']:.3f} | "
                      f"[{lo:.3f}, {hi:.3f}] | {summary.get('first_position_rate', float('nan')):.3f} |", ""]
            if "harmless_rate_policy" in summary:
                lines += [f"Harmless rate: policy {summary['harmless_rate_policy']:.3f}, baseline "
                          f"{summary['harmless_rate_baseline']:.3f}.", ""]
            rows = read_jsonl(os.path.join(run, "judgements.jsonl"))[:3]
            lines += ["| prompt | policy | baseline | outcome |", "|---|---|---|---|"]
            lines += [f"| {_cell(r['prompt'])} | {_cell(r['policy'])} | {_cell(r['baseline'])} | {r['outcome']} |"
                      for r in rows]
            lines.append("")
        elif summary:
            scal = _scalars(summary)
            if scal:
                lines += ["| summary | value |", "|---|---|"] + [f"| {k} | {_fmt(v)} |" for k, v in scal] + [""]
        entry["summary"] = dict(_scalars(summary))

        samples = sample_files(run)
        if samples:
            step, path = samples[-1]
            rows = read_jsonl(path)[:3]
            lines += [f"Responses at step {step} (`{os.path.basename(path)}`):", "",
                      "| prompt | response | reward |", "|---|---|---|"]
            lines += [f"| {_cell(r['prompt'])} | {_cell(r['response'])} | {_fmt(r.get('reward'))} |" for r in rows]
            lines.append("")

        bench = os.path.join(run, "gold_benchmark.md")
        if os.path.exists(bench):
            with open(bench) as f:
                lines += ["### Gold-reward benchmark", "", f.read(), ""]
        data["runs"][name] = entry

    if judged:
        plot_win_rates(judged, os.path.join(out_dir, "win_rates.png"))
        lines += ["## Win rates", "", "![win rates](win_rates.png)", ""]
        data["win_rates"] = {n: {k: s[k] for k in ("wins", "ties", "losses", "win_rate", "win_rate_ci")}
                             for n, s in judged}
    with open(os.path.join(out_dir, "report.md"), "w") as f:
        f.write("\n".join(lines))
    with open(os.path.join(out_dir, "report.json"), "w") as f:
        json.dump(data, f, indent=2)
    print(f"report: {os.path.join(out_dir, 'report.md')}")
    return data


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", required=True, help="an RM/SFT/RL/pipeline/judge/gold-benchmark workdir")
    p.add_argument("--out", default=None, help="where to write (default WORKDIR/report)")
    p.add_argument("--gold", default="auto", help="auto | none | module:function(prompt, response) -> float")
    args = p.parse_args(argv)
    if not os.path.isdir(args.workdir):
        p.error(f"--workdir {args.workdir}: no such directory")
    return write_report(args.workdir, args.out, args.gold)


if __name__ == "__main__":
    main()
