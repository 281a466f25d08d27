"""The whole PE-RLHF pipeline in one job: SFT -> reward model -> RL -> evaluation.

Each stage is a configured job (gin passes `@sft/train_sft`, `@rm/train_reward_model`,
`@rl/train_policy` with their own scopes) run in its own sub-directory of the
workdir. The RL policy and the reward model both start from the SFT export, so
one copy of that backbone serves policy, anchor and reward model. A rerun with
the same workdir skips finished stages and resumes an interrupted one
(`pe_rlhf.train.stages`: a stage is finished only once all its outputs exist).
"""

from __future__ import annotations

import json
import os
from typing import Callable

import numpy as np

from pe_rlhf.train.stages import run_stage, write_json_atomic


def _read_jsonl(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f]


def gold_rate(samples_path: str, gold_reward: Callable[[str, str], float]) -> float:
    rows = _read_jsonl(samples_path)
    return float(np.mean([gold_reward(r["prompt"], r["response"]) for r in rows]))


def rlhf_pipeline(*, workdir: str, model: str, sft_job: Callable, reward_job: Callable, rl_job: Callable,
                  gold_reward: Callable[[str, str], float] | None = None) -> dict:
    """Run the three stages and print a short table of what each achieved."""
    timings, summaries = {}, {}
    export = os.path.join(workdir, "sft", "export")
    for name, job, kwargs, outputs in (
        ("sft", sft_job, {"model": model}, ("summary.json", "export/config.json", "export/model.safetensors")),
        ("reward_model", reward_job, {"model": export}, ("summary.json",)),
        ("rl", rl_job, {"model": export, "reward_model": os.path.join(workdir, "reward_model")}, ("summary.json",)),
    ):
        record = run_stage(name, os.path.join(workdir, name), job, outputs=outputs, **kwargs)
        summaries[name], timings[name] = record["summary"], record["seconds"]

    rl_dir = os.path.join(workdir, "rl")
    final_step = summaries["rl"]["step"]
    rows = [
        ("SFT", "held-out perplexity", summaries["sft"]["eval/perplexity"]),
        ("reward model (LoRA)", "held-out pairwise accuracy", summaries["reward_model"]["eval/pairwise_accuracy"]),
        ("RL (LoRA)", "RM reward on held-out prompts: SFT policy", summaries["rl"]["eval/start_reward"]),
        ("RL (LoRA)", "RM reward on held-out prompts: RL policy", summaries["rl"]["eval/reward"]),
    ]
    result = {"sft_perplexity": rows[0][2], "rm_pairwise_accuracy": rows[1][2],
              "rm_reward_sft": rows[2][2], "rm_reward_rl": rows[3][2]}
    if gold_reward is not None:
        gold_sft = gold_rate(os.path.join(rl_dir, "samples_0.jsonl"), gold_reward)
        gold_rl = gold_rate(os.path.join(rl_dir, f"samples_{final_step}.jsonl"), gold_reward)
        rows += [("evaluation", "gold rule satisfied: SFT policy", gold_sft),
                 ("evaluation", "gold rule satisfied: RL policy", gold_rl)]
        result.update(gold_sft=gold_sft, gold_rl=gold_rl)
    print("\n| stage | metric | value |\n|---|---|---|")
    for stage, metric, value in rows:
        print(f"| {stage} | {metric} | {value:.3f} |")
    print("| time | " + ", ".join(f"{k} {v:.0f}s" for k, v in timings.items()) + " | |")
    result["seconds"] = timings
    write_json_atomic(os.path.join(workdir, "summary.json"), result)
    return result
