"""Gold-reward benchmark in the style of reward-overoptimisation studies (Gao et al. 2022, arXiv 2210.10760).

A fixed gold reward (here the toy task's rule, `pe_rlhf.data.toy.gold_reward`) labels
the preference pairs; proxy reward models (LoRA and full) are trained on those labels;
policies (ReMax, REINFORCE, PPO when the framework has it; LoRA and full) are optimised
against a proxy; the gold reward of the resulting policies is what is reported.

Reads in the order of the study: SFT policy -> proxy reward models and their agreement
with gold -> RL runs against the proxies -> gold (and proxy) reward of every policy.
Each stage runs in its own sub-directory of the workdir and is skipped when its
`summary.json` exists, so a rerun only does what is missing.

The policy's gold reward is the mean gold reward of `eval_samples` responses per prompt
sampled at temperature 1 (the expected gold reward of the policy, which RL optimises);
the greedy response's gold reward is reported beside it. The toy task has 96 distinct
prompts, so every one of them is evaluated (RL trains on most of them: this measures how
well the policy learnt the task, not generalisation to new requests).
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import traceback
from typing import Callable, Sequence

import jax
import numpy as np
from flax import nnx

from pe_rlhf.data import toy
from pe_rlhf.eval import judge as J
from pe_rlhf.eval import winrate as W
from pe_rlhf.train.stages import run_stage


@dataclasses.dataclass(frozen=True)
class GoldBenchmarkConfig:
    """Sizes and learning rates of the benchmark: a tiny model, minutes on a CPU.

    The learning rates are the quickstart's (experiments/configs/quickstart.gin): SFT 3e-3
    (full), LoRA reward model 3e-3, LoRA RL 5e-4 constant (Adam). Full fine-tuning takes
    smaller steps: 1e-3 for the reward model and 1e-4 for RL are our choices for this task.
    `cross=False` pairs each policy with the proxy of its own tuning (LoRA with LoRA, full
    with full, as PE-RLHF compares them); `cross=True` runs every policy against every proxy.
    """

    model: str = "tiny"
    num_sft_examples: int = 1024
    num_pairs: int = 512
    num_rl_prompts: int = 256
    sft_steps: int = 300
    rm_steps: int = 150
    rl_steps: int = 200
    batch_size: int = 16
    rm_tunings: tuple[str, ...] = ("lora", "full")
    policy_tunings: tuple[str, ...] = ("lora", "full")
    algorithms: tuple[str, ...] = ("remax", "reinforce", "ppo")
    cross: bool = False
    lora_rank: int = 8
    lora_alpha: float = 16.0
    sft_lr: float = 3e-3
    rm_lr_lora: float = 3e-3
    rm_lr_full: float = 1e-3
    rl_lr_lora: float = 5e-4
    rl_lr_full: float = 1e-4
    kl_beta: float = 0.05
    max_prompt_len: int = 48
    max_response_len: int = 40
    eval_samples: int = 4
    rl_eval_every: int = 0  # > 0: greedy samples_<step>.jsonl during RL, for gold-over-steps plots
    seed: int = 0

    def __post_init__(self):
        for name in ("rm_tunings", "policy_tunings"):
            bad = [t for t in getattr(self, name) if t not in ("lora", "full")]
            if bad:
                raise ValueError(f"GoldBenchmarkConfig.{name} has {bad}; use 'lora' and/or 'full'")
        if not self.cross and not set(self.policy_tunings) <= set(self.rm_tunings):
            raise ValueError(f"GoldBenchmarkConfig: cross=False pairs each policy with the proxy of its tuning, "
                             f"but rm_tunings={self.rm_tunings} lacks some of policy_tunings={self.policy_tunings}")


# -- pure measures ----------------------------------------------------------------------------------
def gold_agreement(proxy_N, gold_N, groups_N) -> tuple[float, int]:
    """Fraction of within-group pairs with different gold rewards that the proxy orders as gold does.

    A proxy tie on a gold-distinct pair counts as a disagreement. Returns (agreement, pairs).
    """
    proxy_N, gold_N, groups_N = np.asarray(proxy_N, float), np.asarray(gold_N, float), np.asarray(groups_N)
    agree = total = 0
    for g in np.unique(groups_N):
        idx = np.flatnonzero(groups_N == g)
        for i, j in itertools.combinations(idx, 2):
            if gold_N[i] == gold_N[j]:
                continue
            total += 1
            agree += np.sign(proxy_N[i] - proxy_N[j]) == np.sign(gold_N[i] - gold_N[j])
    return (agree / total if total else float("nan")), total


def policy_gold(model, tokenizer, prompts: Sequence[str], gold: Callable[[str, str], float], *,
                samples: int, max_prompt_len: int, max_new_tokens: int, seed: int = 0) -> dict:
    """Gold reward of greedy responses and of `samples` sampled (T=1) responses per prompt."""
    cfg = W.GenerationConfig(max_prompt_len=max_prompt_len, max_new_tokens=max_new_tokens, batch_size=32, seed=seed)
    greedy = [r[0] for r in W.generate(model, tokenizer, prompts, cfg)]
    sampled = W.generate(model, tokenizer, prompts, dataclasses.replace(cfg, temperature=1.0, batch_size=64),
                         num_samples=samples)
    flat_p = [p for p, rs in zip(prompts, sampled) for _ in rs]
    flat_r = [r for rs in sampled for r in rs]
    return {"gold_greedy": float(np.mean([gold(p, r) for p, r in zip(prompts, greedy)])),
            "gold_sampled": float(np.mean([gold(p, r) for p, r in zip(flat_p, flat_r)])),
            "greedy": greedy, "sampled_prompts": flat_p, "sampled": flat_r}


# -- the study ---------------------------------------------------------------------------------------
def toy_sft(sft_dir: str, *, model: str, examples: int, loop, data, learning_rate: float, seed: int
            ) -> tuple[str, float]:
    """The starting policy of the toy studies: `model` fully tuned on the toy demonstrations (a stage of
    its own, skipped when done). Returns its export directory and the seconds of the call that made it."""
    from pe_rlhf.train.optim import OptimizerConfig
    from pe_rlhf.train.supervised import TuningConfig, train_sft

    record = run_stage(
        "sft", sft_dir, train_sft, outputs=("summary.json", "export/config.json", "export/model.safetensors"),
        dataset=toy.sft_demonstrations(n=examples, seed=seed + 1), model=model, tuning=TuningConfig(mode="full"),
        loop=loop, data=data, optimizer=OptimizerConfig(learning_rate=learning_rate,
                                                        warmup_steps=min(20, loop.num_steps // 10),
                                                        total_steps=loop.num_steps))
    return os.path.join(sft_dir, "export"), record["seconds"]


def run_gold_benchmark(workdir: str, cfg: GoldBenchmarkConfig = GoldBenchmarkConfig(),
                       gold: Callable[[str, str], float] = toy.gold_reward) -> dict:
    """Run (or resume) the study in `workdir`; writes gold_benchmark.json and gold_benchmark.md."""
    from pe_rlhf.models.lora import LoRAConfig
    from pe_rlhf.train.optim import OptimizerConfig
    from pe_rlhf.train.policy import ALGORITHMS, RLConfig
    from pe_rlhf.train.rl_loop import train_policy
    from pe_rlhf.train.supervised import DataConfig, LoopConfig, TuningConfig, train_reward_model

    os.makedirs(workdir, exist_ok=True)
    lora_cfg = LoRAConfig(rank=cfg.lora_rank, alpha=cfg.lora_alpha)
    data = DataConfig(max_prompt_len=cfg.max_prompt_len, max_response_len=cfg.max_response_len, eval_size=64,
                      split_seed=cfg.seed)

    def loop(steps, eval_every=0):
        return LoopConfig(num_steps=steps, batch_size=cfg.batch_size, eval_every=eval_every, log_every=10,
                          checkpoint_every=steps, seed=cfg.seed, progress_bar=False)

    prompts = sorted({e.prompt for e in toy.prompts(n=4 * cfg.num_rl_prompts, seed=cfg.seed + 2).examples})
    measure = dict(samples=cfg.eval_samples, max_prompt_len=cfg.max_prompt_len,
                   max_new_tokens=cfg.max_response_len, seed=cfg.seed)
    seconds = {}

    # SFT: the starting policy, fully tuned from the random tiny model
    sft_dir = os.path.join(workdir, "sft")
    export, seconds["sft"] = toy_sft(sft_dir, model=cfg.model, examples=cfg.num_sft_examples, loop=loop(cfg.sft_steps),
                                     data=data, learning_rate=cfg.sft_lr, seed=cfg.seed)
    model, tokenizer, _ = W.load_policy(sft_dir)
    sft_eval = policy_gold(model, tokenizer, prompts, gold, **measure)

    # PROXY REWARD MODELS: trained on gold-labelled pairs; their agreement with gold
    rms = {}
    for tuning in cfg.rm_tunings:
        rm_dir = os.path.join(workdir, f"rm_{tuning}")
        record = run_stage(
            f"rm_{tuning}", rm_dir, train_reward_model,
            dataset=toy.preference_pairs(n=cfg.num_pairs, seed=cfg.seed), model=export,
            tuning=TuningConfig(mode=tuning, lora=lora_cfg), loop=loop(cfg.rm_steps), data=data,
            optimizer=OptimizerConfig(learning_rate=cfg.rm_lr_lora if tuning == "lora" else cfg.rm_lr_full,
                                      total_steps=cfg.rm_steps))
        summary, seconds[f"rm_{tuning}"] = record["summary"], record["seconds"]
        rm, rm_tok, rm_info = W.load_reward_model(rm_dir)
        scorer = J.reward_model_scorer(rm, rm_tok)
        proxy = scorer(sft_eval["sampled_prompts"], sft_eval["sampled"])
        gold_s = [gold(p, r) for p, r in zip(sft_eval["sampled_prompts"], sft_eval["sampled"])]
        agreement, pairs = gold_agreement(proxy, gold_s, sft_eval["sampled_prompts"])
        rms[tuning] = {"dir": rm_dir, "scorer": scorer, "sft_proxy": float(np.mean(proxy)), "row": {
            "proxy_rm": tuning, "trainable_params": _trainable_params(rm, tuning, rm_info["adapter"]),
            "heldout_pair_accuracy": summary["eval/pairwise_accuracy"],
            "gold_agreement_sft_samples": agreement, "sft_sample_pairs": pairs,
            "seconds": seconds[f"rm_{tuning}"]}}

    # POLICIES: RL against each proxy; gold and proxy reward of the result
    rows = [{"policy": "SFT", "algorithm": "-", "proxy_rm": tuning, "gold_sampled": sft_eval["gold_sampled"],
             "gold_greedy": sft_eval["gold_greedy"], "proxy_sampled": rms[tuning]["sft_proxy"], "kl": 0.0,
             "seconds": seconds["sft"]} for tuning in cfg.rm_tunings]
    algorithms = [a for a in cfg.algorithms if a in ALGORITHMS]
    skipped = [a for a in cfg.algorithms if a not in ALGORITHMS]
    for policy_tuning, algorithm, rm_tuning in itertools.product(cfg.policy_tunings, algorithms, cfg.rm_tunings):
        if not cfg.cross and rm_tuning != policy_tuning:
            continue
        rl_dir = os.path.join(workdir, f"rl_{algorithm}_{policy_tuning}_rm-{rm_tuning}")
        row = {"policy": policy_tuning, "algorithm": algorithm, "proxy_rm": rm_tuning}
        try:
            record = run_stage(
                os.path.basename(rl_dir), rl_dir, train_policy, prompts=toy.prompts(n=cfg.num_rl_prompts, seed=cfg.seed + 2), model=export,
                tuning=TuningConfig(mode=policy_tuning, lora=lora_cfg),
                rl=RLConfig(algorithm=algorithm, kl_beta=cfg.kl_beta, max_new_tokens=cfg.max_response_len),
                optimizer=OptimizerConfig(learning_rate=cfg.rl_lr_lora if policy_tuning == "lora" else cfg.rl_lr_full,
                                          schedule="constant"),
                loop=loop(cfg.rl_steps, cfg.rl_eval_every),
                data=DataConfig(max_prompt_len=cfg.max_prompt_len, eval_size=24, split_seed=cfg.seed),
                reward_model=rms[rm_tuning]["dir"])  # a LoRA proxy shares the backbone only with a LoRA policy
            row["seconds"] = record["seconds"]
            model, tokenizer, _ = W.load_policy(rl_dir, lora_config=lora_cfg)
            ev = policy_gold(model, tokenizer, prompts, gold, **measure)
            row.update(gold_sampled=ev["gold_sampled"], gold_greedy=ev["gold_greedy"],
                       proxy_sampled=float(np.mean(rms[rm_tuning]["scorer"](ev["sampled_prompts"], ev["sampled"]))),
                       kl=_last_logged(rl_dir, "train/kl"))
        except Exception as e:  # noqa: BLE001 — one failed configuration is reported, the others still run
            traceback.print_exc()
            row["error"] = f"{type(e).__name__}: {e}"
        rows.append(row)

    result = {"config": dataclasses.asdict(cfg), "reward_models": [rms[t]["row"] for t in cfg.rm_tunings],
              "policies": rows, "skipped_algorithms": skipped, "num_eval_prompts": len(prompts),
              "gold": getattr(gold, "__qualname__", repr(gold))}
    with open(os.path.join(workdir, "gold_benchmark.json"), "w") as f:
        json.dump(result, f, indent=2)
    with open(os.path.join(workdir, "gold_benchmark.md"), "w") as f:
        f.write(markdown(result))
    return result


def _trainable_params(rm, tuning: str, adapter: str) -> int:
    from pe_rlhf.train.supervised import TuningConfig, trainable_filter

    state = nnx.state(rm, trainable_filter(TuningConfig(mode=tuning), adapter))
    return int(sum(x.size for x in jax.tree.leaves(state)))


def _last_logged(directory: str, key: str) -> float:
    value = float("nan")
    path = os.path.join(directory, "metrics.jsonl")
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                row = json.loads(line)
                if row.get(key) is not None:
                    value = float(row[key])
    return value


def _fmt(v) -> str:
    return f"{v:.3f}" if isinstance(v, float) else str(v)


def markdown(result: dict) -> str:
    """The two tables of the benchmark (proxy reward models; policies) as Markdown."""
    lines = [f"Gold reward: `{result['gold']}`; {result['num_eval_prompts']} prompts, "
             f"{result['config']['eval_samples']} samples each (T=1).", "",
             "| proxy RM | trainable params | held-out pair accuracy | agreement with gold on SFT samples (pairs) |",
             "|---|---|---|---|"]
    for r in result["reward_models"]:
        lines.append(f"| {r['proxy_rm']} | {r['trainable_params']:,} | {_fmt(r['heldout_pair_accuracy'])} | "
                     f"{_fmt(r['gold_agreement_sft_samples'])} ({r['sft_sample_pairs']}) |")
    lines += ["", "| policy | algorithm | proxy RM | gold (sampled) | gold (greedy) | proxy reward (sampled) | "
              "KL (last logged) | seconds |", "|---|---|---|---|---|---|---|---|"]
    for r in result["policies"]:
        if "error" in r:
            lines.append(f"| {r['policy']} | {r['algorithm']} | {r['proxy_rm']} | error: {r['error']} | | | | |")
            continue
        note = f" ({r['note']})" if r.get("note") else ""
        lines.append(f"| {r['policy']} | {r['algorithm']} | {r['proxy_rm']}{note} | {_fmt(r['gold_sampled'])} | "
                     f"{_fmt(r['gold_greedy'])} | {_fmt(r['proxy_sampled'])} | {_fmt(r['kl'])} | "
                     f"{r.get('seconds', float('nan')):.0f} |")
    if result["skipped_algorithms"]:
        lines += ["", f"Not in this framework yet (skipped): {', '.join(result['skipped_algorithms'])}."]
    return "\n".join(lines) + "\n"
