"""Over-optimisation curves on the toy task: gold reward against KL for one LoRA reward model, a LoRA
ensemble (mean, mean - std, min) and WARM, over seeds (see pe_rlhf/eval/overopt.py for the protocol).

    python experiments/overoptimisation.py --workdir=runs/overopt --figure=docs/figures/overopt.png
    python experiments/overoptimisation.py --workdir=runs/overopt_quick --seeds=0 --lines=single,min

Prints the summary table and writes overoptimisation.json in the workdir (and a copy to --json);
a rerun reuses finished stages.
"""

from __future__ import annotations

import os
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from gold_benchmark import config_of, parse_args  # noqa: E402

from pe_rlhf.eval.overopt import OveroptConfig, markdown, run_overoptimisation  # noqa: E402
from pe_rlhf.train.stages import write_json_atomic  # noqa: E402


def plot(result: dict, path: str) -> None:
    """Gold rate against KL (left) and against step (right): one colour per reward, one line per seed."""
    fig, (ax_kl, ax_step) = plt.subplots(1, 2, figsize=(11, 4.2))
    for i, (line, by_seed) in enumerate(result["curves"].items()):
        for j, points in enumerate(by_seed.values()):
            label = line if j == 0 else None
            ax_kl.plot([p["kl"] for p in points], [p["gold"] for p in points], "o-", ms=3, lw=1, color=f"C{i}",
                       label=label, alpha=0.8)
            ax_step.plot([p["step"] for p in points], [p["gold"] for p in points], "o-", ms=3, lw=1, color=f"C{i}",
                         label=label, alpha=0.8)
    ax_kl.set(xlabel="KL to the start (train/kl, mean since the last evaluation)", ylabel="gold rate (T=1 samples)")
    ax_step.set(xlabel="RL step", ylabel="gold rate (T=1 samples)")
    ax_kl.legend(title="reward")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None):
    args = parse_args(argv, OveroptConfig, __doc__, outputs=("figure", "json"))
    from pe_rlhf.sharding.distributed import quiet_tpu_probe

    quiet_tpu_probe()
    result = run_overoptimisation(args.workdir, config_of(args, OveroptConfig))
    print("\n" + markdown(result))
    if args.figure:
        plot(result, args.figure)
    if args.json:
        write_json_atomic(args.json, result)
    return result


if __name__ == "__main__":
    main()
