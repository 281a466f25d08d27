"""The one entry point: `python experiments/run.py --gin_file=experiments/configs/<name>.gin --workdir=DIR`.

gin is wired here and only here: the library never imports gin. A config names
the job (`run.job = @train_reward_model`) and binds the library's functions and
option dataclasses registered below. The workdir receives `config.gin` (what was
asked), `operative_config.gin` (every value actually used), metrics.jsonl,
TensorBoard events, summary.json and Orbax checkpoints. A config error is raised
before anything is written.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import gin

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pe_rlhf import data as D  # noqa: E402
from pe_rlhf.data.named import named_dataset  # noqa: E402
from pe_rlhf.models.lora import LoRAConfig  # noqa: E402
from pe_rlhf.data import toy  # noqa: E402
from pe_rlhf.eval import judge as eval_judge  # noqa: E402
from pe_rlhf.eval import winrate  # noqa: E402
from pe_rlhf.train import pipeline, rl_loop, supervised  # noqa: E402
from pe_rlhf.train.policy import RLConfig  # noqa: E402
from pe_rlhf.train.optim import OptimizerConfig  # noqa: E402
from pe_rlhf.sharding.mesh import MeshConfig  # noqa: E402

CONFIG_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")


def _register():
    """Everything a config may bind, under short names."""
    for fn in (supervised.train_reward_model, supervised.train_sft, rl_loop.train_policy, named_dataset, D.read_hh_harmless,
               D.read_taskmaster, D.read_preference_jsonl, D.read_labeled_jsonl, D.read_sft_jsonl,
               D.read_prompts_jsonl, pipeline.rlhf_pipeline, winrate.judge_policies):
        gin.external_configurable(fn, name=fn.__name__)
    for fn in (toy.preference_pairs, toy.sft_demonstrations, toy.prompts, toy.gold_reward):
        gin.external_configurable(fn, name=fn.__name__, module="toy")
    for cls in (supervised.TuningConfig, supervised.LoopConfig, supervised.DataConfig, OptimizerConfig,
                LoRAConfig, RLConfig, MeshConfig, winrate.GenerationConfig, eval_judge.JudgeConfig):
        gin.external_configurable(cls, name=cls.__name__)


@gin.configurable
def run(workdir: str, job=gin.REQUIRED, plan_only: str | None = None):
    """Call the configured job with the workdir (or only plan its step's memory for a target)."""
    if plan_only is not None:
        return job(workdir=workdir, plan_only=plan_only)
    return job(workdir=workdir)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gin_file", action="append", default=[], help="gin config file(s), in order")
    p.add_argument("--gin_param", action="append", default=[], help="extra bindings, e.g. LoopConfig.num_steps=10")
    p.add_argument("--workdir", required=True, help="where metrics, checkpoints and summaries go")
    p.add_argument("--compile_only", action="store_true",
                   help="train nothing: compile the configured step from shapes and report its peak memory")
    p.add_argument("--topology", default="local",
                   help="with --compile_only: 'local' or a TPU topology, e.g. v5e:2x2, v4:2x2x1, v5p:2x2x1, v6e:2x4")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    from pe_rlhf.sharding.distributed import initialize

    initialize()  # multi-host: before anything touches a device; a no-op on one process
    _register()
    # Parse first: a typo raises gin's own error here, before the workdir is touched.
    gin.parse_config_files_and_bindings(args.gin_file, args.gin_param, skip_unknown=False)
    if args.compile_only and args.topology != "local":
        from pe_rlhf.profiling.aot import topology

        topology(args.topology)  # an unknown topology fails here, before anything is written or compiled
    os.makedirs(args.workdir, exist_ok=True)
    with open(os.path.join(args.workdir, "config.gin"), "w") as f:
        f.write(gin.config_str())
    summary = run(workdir=args.workdir, plan_only=args.topology if args.compile_only else None)
    with open(os.path.join(args.workdir, "operative_config.gin"), "w") as f:
        f.write(gin.operative_config_str())
    printable = {k: v for k, v in summary.items() if isinstance(v, (int, float, str))}
    print(json.dumps(printable, indent=2, default=str))
    return summary


if __name__ == "__main__":
    main()
