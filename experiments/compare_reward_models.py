"""Reward models side by side on the same preference pairs: each one's pairwise accuracy, and each against the
first, paired (the accuracy difference on the same pairs with its interval, the pairs only one of them gets
right, how often their margins agree in sign, and the margins' correlation).

    # the HH proxy reward model (fp32 backbone) against the same recipe on a 4-bit backbone and with DoRA,
    # on the 950 pairs none of them trained on (the experiment's judge and evaluation parts)
    python experiments/compare_reward_models.py --rm runs/hh_rlhf/proxy_rm runs/hh_rm_nf4 runs/hh_rm_dora \
        --dataset hh_harmless --parts judge eval --out runs/rm_compare.json

Parts are `pe_rlhf.data.named.dataset_part`'s prompt-disjoint parts (with hh_rlhf.gin's split: 100 held-out
prompts, half the rest for the judge, seed 0). Each model scores texts laid out as it trained (its run
record's token budgets). Intervals: Wilson for an accuracy; for a paired difference, mean +- z * sd / sqrt(n)
of the per-pair differences of correctness (-1, 0 or 1).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pe_rlhf.data import named  # noqa: E402
from pe_rlhf.eval import judge as J  # noqa: E402
from pe_rlhf.eval import winrate  # noqa: E402
from pe_rlhf.eval.experiment import rm_budgets  # noqa: E402


def margins(rm_dir: str, prompts, chosen, rejected) -> np.ndarray:
    """r(prompt, chosen) - r(prompt, rejected) for every pair, scored by the reward model in `rm_dir`."""
    rm, tokenizer, info = winrate.load_reward_model(rm_dir)
    score = J.reward_model_scorer(rm, tokenizer, options=rm_budgets(info))
    return score(prompts, chosen) - score(prompts, rejected)


def compare(margins_by_rm: dict[str, np.ndarray], z: float = 1.959963984540054) -> dict:
    """Accuracy of each model, and of each against the first on the same pairs."""
    names = list(margins_by_rm)
    correct = {n: margins_by_rm[n] > 0 for n in names}
    out = {"pairs": int(len(correct[names[0]])), "models": {}}
    first = names[0]
    for n in names:
        row = {"pairwise_accuracy": J.rate_with_ci(correct[n], z),
               "margin_mean": float(margins_by_rm[n].mean()), "margin_std": float(margins_by_rm[n].std())}
        if n != first:
            diff = correct[n].astype(np.int64) - correct[first].astype(np.int64)
            row["against_first"] = {
                "accuracy_difference": J.mean_with_ci(diff, z),
                "only_this_right": int((diff > 0).sum()), "only_first_right": int((diff < 0).sum()),
                "sign_agreement": J.rate_with_ci(np.sign(margins_by_rm[n]) == np.sign(margins_by_rm[first]), z),
                "margin_correlation": float(np.corrcoef(margins_by_rm[n], margins_by_rm[first])[0, 1]),
            }
        out["models"][n] = row
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rm", nargs="+", required=True, help="reward-model workdirs; the first is the reference")
    ap.add_argument("--dataset", default="hh_harmless", help="a named dataset (pe_rlhf.data.named)")
    ap.add_argument("--parts", nargs="+", choices=named.PARTS, default=["judge", "eval"])
    ap.add_argument("--held-out", type=int, default=100, help="dataset_part's held_out (hh_rlhf.gin: 100)")
    ap.add_argument("--judge-fraction", type=float, default=0.5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--limit", type=int, default=None, help="the first N pairs only")
    ap.add_argument("--out", required=True, help="JSON written here (margins cached beside it per model)")
    args = ap.parse_args(argv)
    for d in args.rm:
        if not os.path.isfile(os.path.join(d, "run_info.json")):
            ap.error(f"--rm {d}: no run_info.json there (not a reward-model workdir)")

    data = named.named_dataset(args.dataset)
    examples = []
    for part in args.parts:
        examples += list(named.dataset_part(data, part, held_out=args.held_out, judge_fraction=args.judge_fraction,
                                            seed=args.seed).examples)
    examples = examples[: args.limit]
    prompts = [e.prompt for e in examples]
    by_rm, timings = {}, {}
    for d in args.rm:
        cache = f"{args.out}.{os.path.basename(os.path.normpath(d))}.npy"
        start = time.time()
        cached = np.load(cache) if os.path.exists(cache) else None
        if cached is not None and len(cached) == len(examples):
            by_rm[d] = cached
        else:
            by_rm[d] = margins(d, prompts, [e.chosen for e in examples], [e.rejected for e in examples])
            np.save(cache, by_rm[d])
        timings[d] = round(time.time() - start, 1)
        print(f"[compare] {d}: accuracy {(by_rm[d] > 0).mean():.4f} on {len(examples)} pairs ({timings[d]} s)",
              flush=True)
    out = {**compare(by_rm), "dataset": args.dataset, "parts": args.parts, "seconds": timings,
           "split": {"held_out": args.held_out, "judge_fraction": args.judge_fraction, "seed": args.seed}}
    with open(args.out, "w") as f:
        json.dump(out, f, indent=1)
    for n, row in out["models"].items():
        acc = row["pairwise_accuracy"]
        line = f"{n}: {acc['rate']:.4f} [{acc['ci'][0]:.4f}, {acc['ci'][1]:.4f}]"
        if "against_first" in row:
            a = row["against_first"]
            d = a["accuracy_difference"]
            line += (f"; minus the first {d['mean']:+.4f} [{d['ci'][0]:+.4f}, {d['ci'][1]:+.4f}], only this / only "
                     f"the first right {a['only_this_right']} / {a['only_first_right']}, sign agreement "
                     f"{a['sign_agreement']['rate']:.3f}, margin correlation {a['margin_correlation']:.3f}")
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
