"""Over-optimisation curves on the toy task: one reward model, a LoRA ensemble (each rule) and WARM.

The setting of Gao et al. 2022 (arXiv 2210.10760) with the label noise of Coste et al. 2023
(arXiv 2310.02743): the toy task's gold rule labels preference pairs, a fraction of the labels is
swapped, and LoRA reward models trained on them are proxies a policy can over-optimise. Per seed:

- `seed<s>/rm/`: K LoRA reward models on one backbone (`train_reward_ensemble`: initialisation and data
  order seed + k; with `member_fraction` < 1 each on its own subset of the pairs) and their WARM average;
- `seed<s>/<line>/`: a LoRA ReMax policy from the same SFT start against one reward: `single` (member 0),
  `mean`, `mean_minus_std`, `min` (the ensemble under that rule) or `warm`. Every `eval_every` steps it
  samples `eval_samples` responses (T=1) to each held-out prompt; their gold rate is the policy's
  expected gold reward at that step, and the KL logged since the previous evaluation is its distance to
  the start.

The seed changes the pairs and their swapped labels, the reward models and the RL run; the SFT start
and the prompts (and their held-out part) are shared. `overoptimisation.json` holds every curve and,
per line, the best and the final gold rate over seeds with 95% intervals.
"""

from __future__ import annotations

import dataclasses
import json
import os

import numpy as np

from pe_rlhf.data import toy
from pe_rlhf.eval.gold import toy_sft
from pe_rlhf.train.stages import run_stage, write_json_atomic

LINES = ("single", "mean", "mean_minus_std", "min", "warm")
T_975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}


@dataclasses.dataclass(frozen=True)
class OveroptConfig:
    """Sizes of the study: the gold benchmark's tiny model and learning rates (pe_rlhf/eval/gold.py).

    label_noise 0.25 is Coste et al.'s; kl_beta is lower than the benchmark's 0.05 so that the policy
    can travel far enough from the start to over-optimise within `rl_steps`.
    """

    model: str = "tiny"
    num_sft_examples: int = 1024
    sft_steps: int = 300
    sft_lr: float = 3e-3
    num_pairs: int = 128
    label_noise: float = 0.25
    members: int = 4
    member_fraction: float = 1.0
    rm_steps: int = 150
    rm_lr: float = 3e-3
    penalty: float = 1.0
    lines: tuple[str, ...] = LINES
    num_rl_prompts: int = 256
    rl_steps: int = 300
    rl_lr: float = 5e-4
    kl_beta: float = 0.01
    eval_every: int = 25
    eval_samples: int = 8
    batch_size: int = 16
    lora_rank: int = 8
    lora_alpha: float = 16.0
    max_prompt_len: int = 48
    max_response_len: int = 40
    seeds: tuple[int, ...] = (0, 1, 2)

    def __post_init__(self):
        bad = [x for x in self.lines if x not in LINES]
        if bad:
            raise ValueError(f"OveroptConfig.lines has {bad}; choose from {LINES}")
        if not self.seeds:
            raise ValueError("OveroptConfig.seeds is empty")


# -- pure measures ----------------------------------------------------------------------------------
def mean_interval(values) -> dict:
    """Mean and a 95% t-interval over seeds (low and high None from one value)."""
    v = np.asarray(values, float)
    if len(v) < 2:
        return {"mean": float(v.mean()), "low": None, "high": None, "n": len(v)}
    half = T_975.get(len(v) - 1, 1.96) * v.std(ddof=1) / np.sqrt(len(v))
    return {"mean": float(v.mean()), "low": float(v.mean() - half), "high": float(v.mean() + half), "n": len(v)}


def summarise(curves: dict[str, dict[int, list[dict]]]) -> dict:
    """Per line, over seeds: best gold (and the KL where it was reached), final gold and final KL."""
    out = {}
    for line, by_seed in curves.items():
        best = [max(c, key=lambda p: p["gold"]) for c in by_seed.values()]
        last = [c[-1] for c in by_seed.values()]
        out[line] = {"best_gold": mean_interval([p["gold"] for p in best]),
                     "kl_at_best_gold": mean_interval([p["kl"] for p in best]),
                     "final_gold": mean_interval([p["gold"] for p in last]),
                     "final_kl": mean_interval([p["kl"] for p in last]),
                     "final_proxy": mean_interval([p["proxy"] for p in last]),
                     "drop_from_best": mean_interval([b["gold"] - p["gold"] for b, p in zip(best, last)])}
    return out


# -- WARP's interpolation of a trained policy towards its start -----------------------------------------
def interpolation(rl_dir: str, start: str, reward_model: str, gold, *, etas=(1.0, 0.75, 0.5, 0.25, 0.0),
                  samples: int = 8, max_prompt_len: int = 48, max_new_tokens: int = 40, seed: int = 0) -> list[dict]:
    """Gold rate, proxy reward and KL to the start of the LoRA policy in `rl_dir` scaled by each eta.

    eta scales the policy adapter's update (`models.averaging.scale_adapter`: 1 the trained policy, 0 its
    start); each point samples `samples` responses (T=1) per held-out prompt of the run
    (`eval_prompts.jsonl`). KL(policy_eta || start) is the mean of log p_eta(y|x) - log p_start(y|x) over
    those samples (unbiased). `reward_model` is the reward-model workdir the proxy reward is read from.
    """
    from pe_rlhf.data import read_prompts_jsonl
    from pe_rlhf.eval import judge as J
    from pe_rlhf.eval import winrate as W
    from pe_rlhf.eval.experiment import EvalConfig, sequence_logprobs
    from pe_rlhf.models.averaging import scale_adapter
    from pe_rlhf.models.merging import merged_model
    from pe_rlhf.train.records import read_run_info
    from pe_rlhf.train.rl_loop import EVAL_PROMPTS

    info = read_run_info(rl_dir)
    if info is None or info.get("stage") != "rl" or info.get("tuning") != "lora":
        raise ValueError(f"{rl_dir}: not a LoRA RL workdir; only a LoRA policy interpolates to its start")
    prompts = [p.prompt for p in read_prompts_jsonl(os.path.join(rl_dir, EVAL_PROMPTS)).examples]
    backbone, tokenizer, _ = W.restore_rl_policy(rl_dir, info, merged=False)
    base, _, _ = W.load_policy(start)
    rm, rm_tok, _ = W.load_reward_model(reward_model)
    proxy = J.reward_model_scorer(rm, rm_tok)
    cfg = EvalConfig(max_prompt_len=max_prompt_len, max_new_tokens=max_new_tokens, batch_size=64, seed=seed)
    points, current = [], 1.0
    for eta in sorted(etas, reverse=True):  # scale down step by step: 1 -> 0.75 -> ... -> 0
        if eta != current:
            scale_adapter(backbone, info["adapter"], eta / current)
            current = eta
        policy = merged_model(backbone, info["adapter"])
        rows = [(p, g) for p, gs in zip(prompts, W.generate_responses(policy, tokenizer, prompts,
                                                                       cfg.generation(temperature=1.0),
                                                                       num_samples=samples)) for g in gs]
        ps, gs = [p for p, _ in rows], [g for _, g in rows]
        kl = (sequence_logprobs(policy, tokenizer, ps, [g.tokens for g in gs], cfg)
              - sequence_logprobs(base, tokenizer, ps, [g.tokens for g in gs], cfg))
        points.append({"eta": eta, "gold": float(np.mean([gold(p, g.text) for p, g in rows])),
                       "proxy": float(np.mean(proxy(ps, [g.text for g in gs]))), "kl": float(kl.mean())})
    return points


# -- the study ---------------------------------------------------------------------------------------
def run_overoptimisation(workdir: str, cfg: OveroptConfig = OveroptConfig(), gold=toy.gold_reward) -> dict:
    """Run (or resume) the study in `workdir`; writes overoptimisation.json and returns it."""
    from pe_rlhf.eval.experiment import eval_curve
    from pe_rlhf.models.heads import EnsembleRule
    from pe_rlhf.models.lora import LoRAConfig
    from pe_rlhf.train.ensemble import WARM, train_reward_ensemble
    from pe_rlhf.train.optim import OptimizerConfig
    from pe_rlhf.train.policy import RLConfig
    from pe_rlhf.train.rl_loop import train_policy
    from pe_rlhf.train.supervised import DataConfig, LoopConfig, TuningConfig

    os.makedirs(workdir, exist_ok=True)
    lora_tuning = TuningConfig(mode="lora", lora=LoRAConfig(rank=cfg.lora_rank, alpha=cfg.lora_alpha))

    def loop(steps, seed, eval_every=0):
        # log at least once per evaluation interval: each point's KL is the mean of what was logged in it
        return LoopConfig(num_steps=steps, batch_size=cfg.batch_size, eval_every=eval_every,
                          log_every=min(5, eval_every) if eval_every else 5,
                          checkpoint_every=steps, seed=seed, progress_bar=False)

    data = DataConfig(max_prompt_len=cfg.max_prompt_len, max_response_len=cfg.max_response_len, eval_size=64)
    export, _ = toy_sft(os.path.join(workdir, "sft"), model=cfg.model, examples=cfg.num_sft_examples,
                        loop=loop(cfg.sft_steps, 0), data=data, learning_rate=cfg.sft_lr, seed=0)
    rules = {"mean": EnsembleRule("mean"), "mean_minus_std": EnsembleRule("mean_minus_std", cfg.penalty),
             "min": EnsembleRule("min")}

    def gold_scores(prompts, responses):
        return [gold(p, r) for p, r in zip(prompts, responses)]

    curves = {line: {} for line in cfg.lines}
    reward_models, warp = {}, {}
    for seed in cfg.seeds:
        # PROXIES: K LoRA reward models on pairs with swapped labels, and their WARM average
        rm_dir = os.path.join(workdir, f"seed{seed}", "rm")
        record = run_stage(
            f"seed {seed}: reward ensemble", rm_dir, train_reward_ensemble, outputs=("summary.json", f"{WARM}/run_info.json"),
            dataset=toy.preference_pairs(n=cfg.num_pairs, seed=seed, label_noise=cfg.label_noise),
            members=cfg.members, model=export, tuning=lora_tuning, loop=loop(cfg.rm_steps, seed),
            optimizer=OptimizerConfig(learning_rate=cfg.rm_lr, total_steps=cfg.rm_steps),
            data=dataclasses.replace(data, eval_size=0.25, train_fraction=cfg.member_fraction),
            rules=tuple(rules.values()))
        reward_models[seed] = record["summary"]
        single = os.path.join(rm_dir, "members", "0")
        rewards = {"single": (single, None), "warm": (os.path.join(rm_dir, WARM), None),
                   **{name: (rm_dir, rule) for name, rule in rules.items()}}
        # POLICIES: LoRA ReMax against each reward, evaluated by the gold rule along the way
        for line in cfg.lines:
            rl_dir = os.path.join(workdir, f"seed{seed}", line)
            reward_model, rule = rewards[line]
            run_stage(f"seed {seed}: {line}", rl_dir, train_policy, prompts=toy.prompts(n=cfg.num_rl_prompts, seed=2),
                      model=export, tuning=lora_tuning, reward_model=reward_model, reward_rule=rule,
                      rl=RLConfig(algorithm="remax", kl_beta=cfg.kl_beta, max_new_tokens=cfg.max_response_len),
                      optimizer=OptimizerConfig(learning_rate=cfg.rl_lr, schedule="constant"),
                      loop=loop(cfg.rl_steps, seed, cfg.eval_every),
                      data=DataConfig(max_prompt_len=cfg.max_prompt_len, eval_size=24),
                      eval_temperature=1.0, eval_samples=cfg.eval_samples)
            curves[line][seed] = eval_curve(rl_dir, {"gold": gold_scores})
        # WARP: the single-RM policy interpolated towards its start, after training
        if "single" in cfg.lines:
            path = os.path.join(workdir, f"seed{seed}", "interpolation.json")
            if not os.path.exists(path):
                write_json_atomic(path, interpolation(
                    os.path.join(workdir, f"seed{seed}", "single"), export, single, gold, samples=cfg.eval_samples,
                    max_prompt_len=cfg.max_prompt_len, max_new_tokens=cfg.max_response_len, seed=seed))
            with open(path) as f:
                warp[str(seed)] = json.load(f)

    result = {"config": dataclasses.asdict(cfg), "reward_models": {str(s): v for s, v in reward_models.items()},
              "interpolation": warp,
              "curves": {line: {str(s): c for s, c in by_seed.items()} for line, by_seed in curves.items()},
              "summary": summarise(curves)}
    write_json_atomic(os.path.join(workdir, "overoptimisation.json"), result)
    return result


def markdown(result: dict) -> str:
    """The per-line summary table of a result."""
    def ci(d):
        return f"{d['mean']:.3f}" if d["low"] is None else f"{d['mean']:.3f} [{d['low']:.3f}, {d['high']:.3f}]"

    lines = ["| reward | best gold | KL at best | final gold | final KL | drop from best |", "|---|---|---|---|---|---|"]
    for line, s in result["summary"].items():
        lines.append(f"| {line} | {ci(s['best_gold'])} | {ci(s['kl_at_best_gold'])} | {ci(s['final_gold'])} | "
                     f"{ci(s['final_kl'])} | {ci(s['drop_from_best'])} |")
    return "\n".join(lines) + "\n"


__all__ = ["LINES", "OveroptConfig", "interpolation", "markdown", "mean_interval", "run_overoptimisation",
           "summarise"]
