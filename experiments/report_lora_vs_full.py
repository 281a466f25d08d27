"""The results of a LoRA-against-full sweep workdir (`experiments/configs/hh_lora_vs_full.gin`): JSON, figure, table.

    python experiments/report_lora_vs_full.py --workdir=runs/hh_lora_vs_full \
        --json=docs/results/hh_lora_vs_full.json --figure=docs/figures/hh_lora_vs_full_frontier.png

Reads every finished stage (`pe_rlhf.eval.lora_vs_full.collect`) and writes:
- `--json`: the yardstick (SFT, both reward models' held-out accuracy on helpful and harmless pairs, their
  agreement, the refusal rule's precision and recall on `experiments/data/refusal_labels.jsonl`, the SFT
  model's own refusal rates), one record per trained line (`arm`, `learning_rate`, `seed`, `steps`, its
  cost, and per evaluation the judge's paired gain over SFT overall / helpful / harmless, the gain net of
  length and refusal, refusal rates, KL to SFT, EOS, distinct responses and 2-grams, length), and the
  `frontier`: each arm's judge gain at the target KLs per seed, and LoRA minus full across seeds with the
  margin's verdict;
- `--figure`: judge gain over SFT against KL to SFT, one path per training run from SFT (0, 0) through its
  evaluations, one colour per arm;
- the Markdown table, printed.
The margin, target KLs and selection KL default to the config's; pass others only if the config's differ.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pe_rlhf.eval import lora_vs_full as L  # noqa: E402
from pe_rlhf.eval.refusal import precision_recall, refusal_flags  # noqa: E402
from pe_rlhf.train.stages import write_json_atomic  # noqa: E402

LABELS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "refusal_labels.jsonl")
ARM_ORDER = ("lora_attn_r8", "lora_all_r8", "lora_all_r1", "full")


def refusal_rule_quality(path: str = LABELS) -> dict:
    rows = [json.loads(line) for line in open(path)]
    return {"labels": os.path.relpath(path, os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
            **precision_recall(refusal_flags([r["response"] for r in rows]), [r["refusal"] for r in rows])}


def report(workdir: str, *, reference_arm: str = "full", select_kl: float = 3.0, kl_targets=(1.0, 3.0),
           margin: float = 0.1) -> dict:
    rl = os.path.join(workdir, "rl")
    arms = sorted(os.listdir(rl), key=lambda a: (ARM_ORDER.index(a) if a in ARM_ORDER else 99, a)) \
        if os.path.isdir(rl) else []
    result = L.collect(workdir, arms, reference_arm, select_kl, kl_targets, margin)
    stages = result.pop("stages")
    yardstick = {}
    if "sft" in stages:
        yardstick["sft"] = {k: v for k, v in stages["sft"]["summary"].items() if k.startswith("eval/")}
        yardstick["sft"]["seconds"] = stages["sft"]["seconds"]
    for name in ("proxy_rm", "judge_rm"):
        if name in stages:
            s = stages[name]["summary"]
            yardstick[name] = {"held_out_pairwise_accuracy_own_part": s.get("eval/pairwise_accuracy"),
                               "seconds": stages[name]["seconds"]}
    if "rm_agreement" in stages:
        yardstick["rm_agreement"] = stages["rm_agreement"]["summary"]
    if "eval/sft" in stages:
        s = stages["eval/sft"]["summary"]
        yardstick["sft_policy"] = {k: s[k] for k in ("refusal_rate_helpful", "refusal_rate_harmless", "eos_fraction",
                                                     "distinct", "distinct_2grams", "length_mean", "judge_mean",
                                                     "proxy_mean")}
    yardstick["refusal_rule"] = refusal_rule_quality()
    return {"workdir": workdir, "yardstick": yardstick, **result}


def figure(result: dict, path: str) -> None:
    colours = dict(zip(ARM_ORDER, ("tab:blue", "tab:orange", "tab:green", "tab:red")))
    fig, ax = plt.subplots(figsize=(7, 4.5))
    seen = set()
    for line in result["lines"]:
        pts = [(0.0, 0.0)] + [(e["kl_to_sft"]["mean"], e["judge_diff_vs_sft"]["overall"]["mean"])
                              for e in line["evaluations"]]
        label = line["arm"] if line["arm"] not in seen else None
        seen.add(line["arm"])
        ax.plot(*zip(*pts), "-o", color=colours.get(line["arm"], "grey"), alpha=0.8, label=label, markersize=4)
        ax.annotate(f"{line['learning_rate']:g}/s{line['seed']}", pts[-1], fontsize=6, alpha=0.7)
    for kl in result.get("kl_targets", ()):
        ax.axvline(kl, color="grey", ls=":", lw=0.8)
    ax.set_xlabel("KL to SFT (nats per response, from 2 samples per prompt)")
    ax.set_ylabel("judge reward - SFT's (greedy, paired)")
    ax.set_title("HH helpful + harmless, Gemma 3 270M: ReMax by arm (label: learning rate / seed)")
    ax.axhline(0, color="black", lw=0.5)
    ax.legend(fontsize=8)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=130)
    plt.close(fig)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", required=True)
    p.add_argument("--json")
    p.add_argument("--figure")
    p.add_argument("--reference_arm", default="full")
    p.add_argument("--select_kl", type=float, default=3.0)
    p.add_argument("--kl_targets", type=float, nargs="+", default=[1.0, 3.0])
    p.add_argument("--margin", type=float, default=0.1)
    args = p.parse_args(argv)
    if not os.path.isdir(args.workdir):
        p.error(f"--workdir {args.workdir}: no such directory")
    result = report(args.workdir, reference_arm=args.reference_arm, select_kl=args.select_kl,
                    kl_targets=args.kl_targets, margin=args.margin)
    if args.json:
        write_json_atomic(args.json, result)
    if args.figure and result["lines"]:
        figure(result, args.figure)
    print(json.dumps(result["yardstick"], indent=1, default=str)[:4000])
    print(L.markdown(result))
    return result


if __name__ == "__main__":
    main()
