"""Gold-reward benchmark on the toy task: proxy RMs (LoRA, full) and RL policies judged by the gold rule.

    python experiments/gold_benchmark.py --workdir=/tmp/gold            # the full grid, minutes on CPU
    python experiments/gold_benchmark.py --workdir=/tmp/gold_small --rl_steps=100 \\
        --policy_tunings=lora --algorithms=remax                        # one policy

Prints the Markdown tables and writes gold_benchmark.md and gold_benchmark.json in the
workdir (see pe_rlhf/eval/gold.py for what is measured). A rerun reuses finished stages.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pe_rlhf.eval.gold import GoldBenchmarkConfig, run_gold_benchmark  # noqa: E402


def parse_args(argv=None, config=GoldBenchmarkConfig, doc=__doc__, outputs=()):
    """`--workdir`, one flag per field of the dataclass `config` (tuples comma-separated) and an optional
    path flag per name in `outputs`."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", required=True)
    for name in outputs:
        p.add_argument(f"--{name}", default=None, help="output path (optional)")
    for field in dataclasses.fields(config):
        default = field.default
        if isinstance(default, tuple):
            p.add_argument(f"--{field.name}", default=",".join(map(str, default)),
                           help=f"comma-separated (default {default})")
        elif isinstance(default, bool):
            p.add_argument(f"--{field.name}", default=default, type=lambda s: s.lower() in ("1", "true", "yes"))
        else:
            p.add_argument(f"--{field.name}", default=default, type=type(default))
    return p.parse_args(argv)


def config_of(args, config=GoldBenchmarkConfig):
    """The dataclass `config` from parsed flags; a tuple's items take the type of its default's first."""
    values = {}
    for field in dataclasses.fields(config):
        v = getattr(args, field.name)
        if isinstance(field.default, tuple):
            kind = type(field.default[0]) if field.default else str
            v = tuple(kind(x) for x in v.split(",") if x)
        values[field.name] = v
    return config(**values)


def main(argv=None):
    args = parse_args(argv)
    from pe_rlhf.sharding.distributed import quiet_tpu_probe

    quiet_tpu_probe()  # no libtpu errors at start-up on a machine without a TPU
    result = run_gold_benchmark(args.workdir, config_of(args))
    with open(os.path.join(args.workdir, "gold_benchmark.md")) as f:
        print("\n" + f.read())
    print(json.dumps({"reward_models": result["reward_models"], "policies": result["policies"]}, indent=2))
    return result


if __name__ == "__main__":
    main()
