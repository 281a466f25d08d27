"""The one entry point: `python experiments/run.py --gin_file=experiments/configs/<name>.gin --workdir=DIR`.

gin is wired here and only here: the library never imports gin. A config names
the job (`run.job = @train_reward_model`) and binds the library's functions and
option dataclasses registered below. The workdir receives `config.gin` (what was
asked), `operative_config.gin` (every value actually used), metrics.jsonl,
TensorBoard events, summary.json and Orbax checkpoints. A config error (a missing
file, a typo, no job, a wrong value) is raised before anything is written, and so is
a second run on a workdir that a running process holds (`train.workdir_lock`).
"""

from __future__ import annotations

import argparse
import difflib
import functools
import json
import logging
import os
import sys

import gin

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pe_rlhf import cli  # noqa: E402
from pe_rlhf import data as D  # noqa: E402
from pe_rlhf.data.named import dataset_part, named_dataset, sft_mix  # noqa: E402
from pe_rlhf.models.lora import LoRAConfig  # noqa: E402
from pe_rlhf.data import toy  # noqa: E402
from pe_rlhf.eval import experiment as eval_experiment  # noqa: E402
from pe_rlhf.eval import lora_vs_full  # noqa: E402
from pe_rlhf.eval import judge as eval_judge  # noqa: E402
from pe_rlhf.eval import winrate  # noqa: E402
from pe_rlhf.profiling.plan import plan_report  # noqa: E402
from pe_rlhf.train import pipeline, rl_loop, supervised  # noqa: E402
from pe_rlhf.train import ensemble, preference  # noqa: E402
from pe_rlhf.models.heads import EnsembleRule  # noqa: E402
from pe_rlhf.train.policy import RLConfig  # noqa: E402
from pe_rlhf.train.records import RunIdentityError  # noqa: E402
from pe_rlhf.train.optim import OptimizerConfig  # noqa: E402
from pe_rlhf.train.workdir_lock import workdir_lock  # noqa: E402
from pe_rlhf.sharding.mesh import MeshConfig  # noqa: E402

CONFIG_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")
# The option dataclasses a config may build; each checks its values when built (`check_options`).
OPTIONS = (supervised.TuningConfig, supervised.LoopConfig, supervised.DataConfig, OptimizerConfig, LoRAConfig,
           RLConfig, MeshConfig, winrate.GenerationConfig, eval_judge.JudgeConfig, eval_experiment.EvalConfig,
           EnsembleRule)


class _QuietGinIncludes(logging.Filter):
    """Drops gin's "Path not found: x.gin" for an `include` it then finds on the search path: gin first
    tries the name as a Python package resource and logs an ERROR when it is not one."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.pathname.endswith(os.path.join("gin", "resource_reader.py"))
                    and record.msg == "Path not found: %s")


def _register():
    """Everything a config may bind, under short names; `include 'x.gin'` finds the shipped configs."""
    gin.add_config_file_search_path(CONFIG_DIR)
    for fn in (supervised.train_reward_model, supervised.train_sft, rl_loop.train_policy, named_dataset, dataset_part, sft_mix,
               D.read_hh_harmless, D.read_tldr_comparisons, D.read_tldr_references,
               D.read_taskmaster, D.read_preference_jsonl, D.read_labeled_jsonl, D.read_sft_jsonl,
               D.read_prompts_jsonl, pipeline.rlhf_pipeline, winrate.judge_policies, eval_experiment.rlhf_experiment,
               lora_vs_full.lora_vs_full):
        gin.external_configurable(fn, name=fn.__name__)
    gin.external_configurable(preference.train_dpo, name="train_dpo")
    gin.external_configurable(ensemble.train_reward_ensemble, name="train_reward_ensemble")
    for fn in (toy.preference_pairs, toy.sft_demonstrations, toy.prompts, toy.gold_reward):
        gin.external_configurable(fn, name=fn.__name__, module="toy")
    for cls in OPTIONS:
        gin.external_configurable(cls, name=cls.__name__)


def bound_options() -> list[tuple[str, str]]:
    """(scope, class name) of each option dataclass the parsed config binds, e.g. ('rl', 'LoopConfig')."""
    names = {cls.__name__ for cls in OPTIONS}
    # gin has no public list of its bindings; its registry is keyed by (scope, full selector).
    keys = {(scope, selector.rpartition(".")[2]) for scope, selector in gin.config._CONFIG}
    return sorted(key for key in keys if key[1] in names)


def check_options() -> None:
    """Check that the config names a job, and build every option dataclass it binds, in each scope it is
    bound in, so that a wrong value fails now, as a ValueError naming its gin key
    (`rl/LoopConfig.batch_size='four': expected ...`)."""
    try:
        gin.query_parameter("run.job")
    except ValueError:
        raise ValueError("the config names no job: bind run.job (e.g. `run.job = @train_reward_model`), or pass "
                         "--gin_file=experiments/configs/<name>.gin (run.py --help lists them)") from None
    for scope, name in bound_options():
        try:
            with gin.config_scope(scope or None):
                gin.get_configurable(name)()
        except ValueError as e:
            message = str(e).splitlines()[0]  # gin appends "In call to configurable ..." lines
            if scope and message.split(".")[0] in {cls.__name__ for cls in OPTIONS}:
                message = f"{scope}/{message}"
            elif scope:
                message += f" (gin scope {scope!r})"
            raise ValueError(message) from None


def shipped_configs() -> list[str]:
    return cli.shipped_configs(CONFIG_DIR)


def _configs_help() -> str:
    """One line per shipped config: its name and the first line of its leading comment."""
    return cli.configs_help(CONFIG_DIR)


def _missing_config(path: str) -> str:
    """The error for a --gin_file that does not exist: the path, a close shipped config, and the list."""
    shipped = shipped_configs()
    close = difflib.get_close_matches(os.path.basename(path), shipped, n=1)
    hint = f"Did you mean experiments/configs/{close[0]}? " if close else ""
    return (f"--gin_file {path}: no such file. {hint}Configs shipped in experiments/configs: "
            f"{', '.join(shipped)}")


@gin.configurable
def run(workdir: str, job=gin.REQUIRED, plan_only: str | None = None):
    """Call the configured job with the workdir, or (`plan_only`: 'local' or a TPU topology) hand it
    `profiling.plan.plan_report` for that target, so it compiles its step from shapes and trains nothing."""
    if plan_only is not None:
        return job(workdir=workdir, plan=functools.partial(plan_report, target=plan_only))
    return job(workdir=workdir)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, epilog=_configs_help(),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gin_file", action="append", default=[], help="gin config file(s), in order")
    p.add_argument("--gin_param", action="append", default=[], help="extra bindings, e.g. LoopConfig.num_steps=10")
    p.add_argument("--workdir", required=True, help="where metrics, checkpoints and summaries go")
    p.add_argument("--compile_only", action="store_true",
                   help="train nothing: compile the configured step from shapes and report its peak memory")
    p.add_argument("--topology", default="local",
                   help="with --compile_only: 'local' or a TPU topology, e.g. v5e:2x2, v4:2x2x1, v5p:2x2x1, v6e:2x4")
    args = p.parse_args(argv)
    for path in args.gin_file:
        if not os.path.isfile(path):
            p.error(_missing_config(path))  # exits with status 2
    return args


def attempt_paths(workdir: str) -> tuple[str, str]:
    """Where this attempt's config.gin and operative_config.gin go: the first run's keep those names;
    each later attempt (a resume, a rerun) writes config.<n>.gin and operative_config.<n>.gin, so no
    attempt's record overwrites another's."""
    n = 1
    while os.path.exists(os.path.join(workdir, "config.gin" if n == 1 else f"config.{n}.gin")):
        n += 1
    suffix = "" if n == 1 else f".{n}"
    return os.path.join(workdir, f"config{suffix}.gin"), os.path.join(workdir, f"operative_config{suffix}.gin")


def main(argv=None):
    args = parse_args(argv)
    from pe_rlhf.sharding.distributed import initialize, quiet_tpu_probe

    quiet_tpu_probe()  # no libtpu errors at start-up on a machine without a TPU
    initialize()  # multi-host: before anything touches a device; a no-op on one process
    _register()
    # Parse and build the options first: a typo raises gin's own error here, and a wrong value a
    # ValueError naming its gin key, before the workdir is touched.
    quiet = _QuietGinIncludes()
    logging.getLogger().addFilter(quiet)
    try:
        gin.parse_config_files_and_bindings(args.gin_file, args.gin_param, skip_unknown=False)
    finally:
        logging.getLogger().removeFilter(quiet)
    check_options()
    if args.compile_only and args.topology != "local":
        from pe_rlhf.profiling.aot import topology

        topology(args.topology)  # an unknown topology fails here, before anything is written or compiled
    os.makedirs(args.workdir, exist_ok=True)
    with workdir_lock(args.workdir):  # another run writing this workdir is refused here, before config.gin
        config_path, operative_path = attempt_paths(args.workdir)
        with open(config_path, "w") as f:
            f.write(gin.config_str())
        try:
            summary = run(workdir=args.workdir, plan_only=args.topology if args.compile_only else None)
        except RunIdentityError:
            os.remove(config_path)  # refused before anything ran: leave the workdir as it was
            raise
        with open(operative_path, "w") as f:
            f.write(gin.operative_config_str())
    printable = {k: v for k, v in summary.items() if isinstance(v, (int, float, str))}
    print(json.dumps(printable, indent=2, default=str))
    return summary


if __name__ == "__main__":
    main()
