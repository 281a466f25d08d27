"""The results of a real-model experiment workdir (`experiments/configs/hh_rlhf.gin`): table, JSON, plots.

    python experiments/report_experiment.py --workdir=runs/hh_rlhf --json=docs/results/hh_rlhf.json \
        --figures=docs/figures --name=hh_rlhf

Reads every finished stage (`pe_rlhf.eval.experiment.collect`) and writes:
- `--json`: per line, the judge's and the proxy's paired difference against the SFT model (95% CI), the
  judge's win rate, EOS fraction, response length, KL to the SFT model, seconds per step, compiled and
  RSS peak memory and the reward it optimised; per stage, the SFT perplexity, both reward models' held-out
  accuracy, their agreement, and the proxy ensemble's (each member, each rule, WARM) where there is one;
- `<figures>/<name>_reward_vs_step.png`: the reward each line optimises, of sampled responses during
  training, and the proxy's and the judge's of greedy held-out responses at each evaluation, per line;
- `<figures>/<name>_judge_vs_kl.png`: the judge's reward of the held-out responses against the KL to the
  start at each evaluation (the over-optimisation curve, Gao et al. 2022);
- `<figures>/<name>_overopt.png` (when lines optimise the proxy ensemble or WARM): the same curve for those
  lines and the single-proxy line of their algorithm;
- a Markdown table and a few responses side by side, printed (and to `--markdown` if given).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import sys

import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pe_rlhf.eval import judge as J  # noqa: E402
from pe_rlhf.eval.experiment import BASELINE, collect, markdown  # noqa: E402
from pe_rlhf.train.stages import write_json_atomic  # noqa: E402


def response_variety(responses: list[str], words: int = 2) -> dict:
    """How varied a policy's replies are: distinct replies, and the most common opening (its first
    `words` words, typographic apostrophes read as plain ones) with its share of the replies."""
    texts = [" ".join(r.replace("\u2019", "'").split()) for r in responses]
    openings = collections.Counter(" ".join(t.split()[:words]) for t in texts)
    top, count = openings.most_common(1)[0] if openings else ("", 0)
    return {"responses": len(texts), "distinct": len(set(texts)), "top_opening": top,
            "top_opening_share": count / len(texts) if texts else float("nan")}


def compact(result: dict) -> dict:
    """The small JSON committed to docs/: what a reader needs to weigh each line, nothing per prompt."""
    stages = result["stages"]
    out = {"workdir": result["workdir"], "stages": {}, "lines": {}}
    if "sft" in stages:
        s = stages["sft"]["summary"]
        out["stages"]["sft"] = {"eval_perplexity": s.get("eval/perplexity"), "steps": s.get("step"),
                                "seconds": stages["sft"]["seconds"], "compiled_peak_bytes": s.get("compiled_peak_bytes")}
    for rm in ("proxy_rm", "judge_rm"):
        if rm in stages:
            s = stages[rm]["summary"]
            out["stages"][rm] = {"heldout_pairwise_accuracy": s.get("eval/pairwise_accuracy"),
                                 "heldout_pairs": s.get("eval/num_pairs"), "train_pairs": s.get("train_examples"),
                                 "steps": s.get("step"), "seconds": stages[rm]["seconds"],
                                 "compiled_peak_bytes": s.get("compiled_peak_bytes")}
    if "rm_agreement" in stages:
        out["stages"]["rm_agreement"] = stages["rm_agreement"]["summary"]
    if "proxy_ensemble" in stages:  # held-out accuracy of each member, each rule and WARM
        s = stages["proxy_ensemble"]["summary"]
        out["stages"]["proxy_ensemble"] = {
            "seconds": stages["proxy_ensemble"]["seconds"],
            **{k: ([m.get("pairwise_accuracy") for m in v] if k == "members" else v.get("pairwise_accuracy"))
               for k, v in s.items()}}
    keys = ("judge_diff_vs_sft", "proxy_diff_vs_sft", "judge_win_rate", "eos_fraction", "length_mean", "kl_to_sft",
            "judge_mean", "proxy_mean", "harmless_rate_judge", "identical_to_sft", "prompts")
    for name, row in result["lines"].items():
        line = {k: row[k] for k in keys if k in row}
        rl = row.get("rl")
        if rl:
            line.update(algorithm=rl["algorithm"], tuning=rl["tuning"], steps=rl["steps"],
                        seconds_per_step=rl["seconds_per_step"], rl_seconds=rl["seconds"],
                        compiled_peak_bytes=rl["compiled_peak_bytes"],
                        rss_peak_bytes_process=rl["rss_peak_bytes_process"], reward=reward_of(rl))
        responses = os.path.join(result["workdir"], "eval", name, "responses.jsonl")
        if os.path.exists(responses):
            line["variety"] = response_variety([json.loads(r)["response"] for r in open(responses)])
        out["lines"][name] = line
    return out


def reward_of(rl: dict) -> str:
    """What a line optimised, in words: the proxy, WARM, or the ensemble under its rule."""
    rule = rl.get("reward_rule")
    if rule:
        return f"ensemble {rule['rule']}" + (" (standardised)" if rule.get("standardise") else " (raw)")
    path = (rl.get("reward_model") or "").rstrip("/")
    return {"warm": "WARM", "proxy_rm": "proxy"}.get(os.path.basename(path), path or "-")


def overoptimisation_lines(result: dict) -> list[str]:
    """The lines against the ensemble or WARM, and the line of the same algorithm and tuning against the
    proxy: the single-RM baseline of their over-optimisation curves. Empty without such lines."""
    rls = {n: r["rl"] for n, r in result["lines"].items() if r.get("rl")}
    other = [n for n, rl in rls.items() if reward_of(rl) != "proxy"]
    kinds = {(rls[n]["algorithm"], rls[n]["tuning"]) for n in other}
    return [n for n, rl in rls.items() if n in other or (reward_of(rl) == "proxy"
                                                         and (rl["algorithm"], rl["tuning"]) in kinds)]


def paired_judge_diffs(workdir: str, result: dict) -> dict:
    """For each over-optimisation line, its judge score minus the single-proxy line's on the same held-out
    prompts, paired by prompt, with its 95% interval: a much tighter comparison than the two lines'
    separate intervals against SFT. Only lines trained for as many steps as the proxy line are paired.
    {line: {"vs": proxy line, "mean", "n", "ci", "wins", "ties", "losses", "steps", "vs_steps"}}."""
    lines = overoptimisation_lines(result)
    rls = {n: result["lines"][n]["rl"] for n in lines}

    def judge_scores(line: str) -> dict:
        with open(os.path.join(workdir, "eval", line, "responses.jsonl")) as f:
            return {r["prompt"]: r["judge"] for r in map(json.loads, f)}

    out, scores = {}, {}
    for name in lines:
        rl = rls[name]
        base = [n for n in lines if reward_of(rls[n]) == "proxy" and
                (rls[n]["algorithm"], rls[n]["tuning"]) == (rl["algorithm"], rl["tuning"])]
        if reward_of(rl) == "proxy" or not base or rls[base[0]].get("steps") != rl.get("steps"):
            continue
        for line in (name, base[0]):  # the proxy line is read once however many lines it pairs with
            if line not in scores:
                scores[line] = judge_scores(line)
        mine, theirs = scores[name], scores[base[0]]
        d = np.array([mine[k] - theirs[k] for k in sorted(set(mine) & set(theirs))])
        out[name] = {"vs": base[0], **J.mean_with_ci(d), "wins": int((d > 0).sum()), "ties": int((d == 0).sum()),
                     "losses": int((d < 0).sum()), "steps": rl.get("steps"), "vs_steps": rls[base[0]].get("steps")}
    return out


def _metrics(path: str) -> list[dict]:
    rows = {}
    for line in open(path):
        r = json.loads(line)
        rows.setdefault(r["step"], {}).update(r)
    return [rows[s] for s in sorted(rows)]


def plot_rewards(workdir: str, result: dict, path: str) -> None:
    fig, ax = plt.subplots(1, 2, figsize=(11, 4))
    for name, row in result["lines"].items():
        if name == BASELINE:
            continue
        m = _metrics(os.path.join(workdir, "rl", name, "metrics.jsonl"))
        tr = [(r["step"], r["train/reward_mean"]) for r in m if r.get("train/reward_mean") is not None]
        ax[0].plot(*zip(*tr), label=name, alpha=0.8) if tr else None
        curve = row.get("curve") or []
        if curve:  # the one proxy for every line (a line with another reward has it as single_proxy)
            ax[1].plot([c["step"] for c in curve], [c.get("single_proxy", c["proxy"]) for c in curve], "o-",
                       label=f"{name} (proxy)")
            ax[1].plot([c["step"] for c in curve], [c["judge"] for c in curve], "s--", label=f"{name} (judge)")
    ax[0].set(title="reward each line optimises, sampled responses (training)", xlabel="step", ylabel="reward")
    ax[1].set(title="greedy responses to held-out prompts", xlabel="step", ylabel="mean reward")
    for a in ax:
        a.legend(fontsize=7)
        a.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_judge_vs_kl(result: dict, path: str, lines=None) -> None:
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for name, row in result["lines"].items():
        if lines is not None and name not in lines:
            continue
        curve = row.get("curve") or []
        if curve:
            ax.plot([c["kl"] for c in curve], [c["judge"] for c in curve], "o-", label=name)
            for c in curve:
                ax.annotate(str(c["step"]), (c["kl"], c["judge"]), fontsize=6)
    ax.set(title="judge reward vs KL to the start (labels: step)", xlabel="KL (nats per response)",
           ylabel="judge reward, held-out greedy")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def side_by_side(workdir: str, result: dict, n: int = 3) -> str:
    """The first `n` held-out prompts with the SFT model's and every policy's greedy response."""
    rows = {name: [json.loads(line) for line in open(os.path.join(workdir, "eval", name, "responses.jsonl"))]
            for name in result["lines"]}
    out = []
    for i in range(min(n, len(rows.get(BASELINE, [])))):
        prompt = rows[BASELINE][i]["prompt"].strip().replace("\n\n", " / ")
        out.append(f"**Prompt** (last 300 characters): {prompt[-300:]}\n")
        for name, r in rows.items():
            out.append(f"- *{name}* (proxy {r[i]['proxy']:+.2f}, judge {r[i]['judge']:+.2f}): "
                       f"{r[i]['response'].strip()!r}")
        out.append("")
    return "\n".join(out)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", required=True)
    p.add_argument("--json", help="where to write the compact results JSON")
    p.add_argument("--figures", help="folder for the plots")
    p.add_argument("--name", default="hh_rlhf", help="file-name prefix of the plots")
    p.add_argument("--markdown", help="also write the table and responses here")
    args = p.parse_args(argv)
    if not os.path.isdir(args.workdir):
        p.error(f"--workdir {args.workdir}: no such directory")
    result = collect(args.workdir)
    if not result["lines"]:
        p.error(f"{args.workdir}: no evaluated line yet (eval/<line>/DONE); run the experiment first")
    text = markdown(result) + "\n\n" + side_by_side(args.workdir, result)
    paired = paired_judge_diffs(args.workdir, result)
    if paired:
        text += "\n\n| line | steps | judge - the proxy line's, paired (95% CI) | vs | W/T/L |\n|---|---:|---|---|---|\n"
        text += "\n".join(f"| {n} | {p['steps']} | {p['mean']:+.3f} [{p['ci'][0]:+.3f}, {p['ci'][1]:+.3f}] | "
                           f"{p['vs']} ({p['vs_steps']} steps) | {p['wins']}/{p['ties']}/{p['losses']} |"
                           for n, p in paired.items())
    print(text)
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        write_json_atomic(args.json, {**compact(result), **({"paired_vs_proxy_line": paired} if paired else {})})
    if args.figures:
        os.makedirs(args.figures, exist_ok=True)
        plot_rewards(args.workdir, result, os.path.join(args.figures, f"{args.name}_reward_vs_step.png"))
        plot_judge_vs_kl(result, os.path.join(args.figures, f"{args.name}_judge_vs_kl.png"))
        overopt = overoptimisation_lines(result)
        if overopt:
            plot_judge_vs_kl(result, os.path.join(args.figures, f"{args.name}_overopt.png"), lines=overopt)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(text + "\n")
    return result


if __name__ == "__main__":
    main()
