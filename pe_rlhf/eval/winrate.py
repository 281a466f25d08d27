"""Judged evaluation of a policy against a baseline: responses, two-order judgements, win rate, harmless rate.

`judge_policies` reads top to bottom in the order of the evaluation: load both
policies, generate their responses to the same prompts, ask the judge in both
orders, ask whether each response is harmless, write what was said and judged
(`judgements.jsonl`) beside the counts (`summary.json`).

Sources:
- a policy is a model source (`tiny`, `gemma3-270m`, a HF directory, a .gguf file), an
  SFT workdir (its `export/`) or an RL workdir (its base model + the latest checkpoint
  of the policy: the LoRA adapter merged in, or the fully tuned weights);
- a judge is a reward-model workdir (prefers the higher reward), a model source (a
  language-model judge scored by answer log-probabilities), or a Python function
  `(prompt, response) -> float` such as `toy.gold_reward` (a rule as a reward judge).
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Callable, Sequence

import jax
import numpy as np
from flax import nnx

from pe_rlhf import data as D
from pe_rlhf.checkpoints.load import load_backbone
from pe_rlhf.eval import judge as J
from pe_rlhf.models import lora, merging
from pe_rlhf.sampling.sampler import sample
from pe_rlhf.train.records import lora_config_of, read_run_info


@dataclasses.dataclass(frozen=True)
class GenerationConfig:
    """How the compared policies answer. Greedy by default, so a rerun writes the same responses."""

    max_prompt_len: int = 256
    max_new_tokens: int = 64
    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    batch_size: int = 16
    seed: int = 0


# -- policies --------------------------------------------------------------------------------------
def restore_rl_policy(workdir: str, info: dict, *, dtype: str = "float32",
                      lora_config: lora.LoRAConfig | None = None, merged: bool = True):
    """(Transformer, tokenizer, step) of the policy trained in an RL workdir, at its latest checkpoint.

    The Transformer is plain (the LoRA adapter merged in), or with `merged=False` the backbone with
    the adapter `info["adapter"]` still attached (for `export_peft`).
    """
    from pe_rlhf.checkpoints.orbax_io import RunCheckpointer
    from pe_rlhf.train.policy import RLModules

    backbone, tokenizer = load_backbone(info["model"], dtype, quantize=info.get("quantize"))
    adapter = info.get("adapter", "policy")
    if info["tuning"] == "lora":
        cfg = lora_config_of(info) or lora_config
        if cfg is None:
            raise ValueError(
                f"{workdir}/run_info.json records no LoRA options (rank, alpha, targets) for adapter {adapter!r}; "
                "pass lora_config=LoRAConfig(...) as the RL run was configured")
        lora.add_lora(backbone, adapter, cfg)
        modules = RLModules(backbone, policy_adapters=(adapter,))
        filter_ = lora.adapter_filter(adapter)
    else:
        modules = RLModules(backbone, policy_adapters=())
        filter_ = nnx.All(nnx.Param, nnx.PathContains("policy"))
    ckpt = RunCheckpointer(os.path.join(workdir, "checkpoints"))
    try:
        step = ckpt.restore_module(modules, filter_, what="RL")
    finally:
        ckpt.close()
    model = merging.merged_model(backbone, adapter) if info["tuning"] == "lora" and merged else backbone
    return model, tokenizer, step


def load_policy(source: str, *, dtype: str = "float32", lora_config: lora.LoRAConfig | None = None):
    """(Transformer, tokenizer, description) of a model source, an SFT workdir or an RL workdir."""
    info = read_run_info(source) if os.path.isdir(source) else None
    if info is None:
        model, tokenizer = load_backbone(source, dtype)
        desc = source
    elif info.get("stage") == "sft":
        export = os.path.join(source, "export")
        if not os.path.isdir(export):
            raise FileNotFoundError(f"{source}: an SFT workdir without export/; rerun it with export=True")
        model, tokenizer = load_backbone(export, dtype)
        desc = f"{source} (SFT export)"
    elif info.get("stage") == "rl":
        model, tokenizer, step = restore_rl_policy(source, info, dtype=dtype, lora_config=lora_config)
        desc = f"{source} ({info.get('algorithm')}, {info['tuning']}, step {step})"
    else:
        raise ValueError(f"{source}/run_info.json: stage {info.get('stage')!r} is not a policy; "
                         "pass an SFT or RL workdir, or a model source")
    if tokenizer is None:
        raise ValueError(f"{source}: no tokenizer beside the weights; a policy needs one to answer text prompts")
    return model, tokenizer, desc


@dataclasses.dataclass(frozen=True)
class Generated:
    """One response: its text (special tokens dropped), its token ids, and whether it ended with EOS."""

    text: str
    tokens: tuple[int, ...]
    ended_with_eos: bool


def prompt_ids(tokenizer, prompts: Sequence[str], max_prompt_len: int) -> list:
    """`[BOS] prompt` ids of every prompt, cut from the left to `max_prompt_len` (as RL tokenises them)."""
    ids, stats = D.tokenize_prompts(list(prompts), tokenizer, D.TokenizeOptions(
        max_prompt_len=max_prompt_len, max_response_len=1))
    if stats.kept != len(prompts):
        raise D.DataError(f"generate: {stats.dropped_empty} of {len(prompts)} prompts have no tokens")
    if stats.prompts_truncated:
        print(f"generate: {stats.prompts_truncated} of {len(prompts)} prompts cut from the left to "
              f"{max_prompt_len} tokens")
    return list(ids)


def generate_responses(model, tokenizer, prompts: Sequence[str], cfg: GenerationConfig = GenerationConfig(),
                       num_samples: int = 1) -> list[list[Generated]]:
    """`num_samples` responses per prompt, [prompt][sample], with their tokens and EOS flags.

    Prompts are tokenised as for RL (`[BOS] prompt`, cut from the left to `max_prompt_len`);
    every batch has `batch_size` rows (the last one is padded), so one compilation serves all.
    """
    ids = prompt_ids(tokenizer, prompts, cfg.max_prompt_len)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    eos = tuple(model.config.eos_token_ids) or ((tokenizer.eos_token_id,) if tokenizer.eos_token_id is not None
                                                 else ())
    rows = [p for p in ids for _ in range(num_samples)]
    rng = jax.random.key(cfg.seed)
    out_rows = []
    for i in range(0, len(rows), cfg.batch_size):
        chunk = rows[i:i + cfg.batch_size]
        batch = D.batch_prompts(chunk + [chunk[-1]] * (cfg.batch_size - len(chunk)), prompt_len=cfg.max_prompt_len,
                                pad_id=pad)
        rng, key = jax.random.split(rng)
        out = sample(model, batch["prompt_BxT"], batch["prompt_mask_BxT"], rng=key,
                     max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_k=cfg.top_k,
                     top_p=cfg.top_p, eos_ids=eos, pad_id=pad)
        tokens, mask = np.asarray(out.tokens_BxN), np.asarray(out.mask_BxN)
        ended = np.asarray(out.ended_with_eos_B)
        for b in range(len(chunk)):
            toks = tokens[b][mask[b]].tolist()
            out_rows.append(Generated(tokenizer.decode(toks, skip_special_tokens=True), tuple(toks),
                                      bool(ended[b])))
    return [out_rows[i * num_samples:(i + 1) * num_samples] for i in range(len(ids))]


def generate(model, tokenizer, prompts: Sequence[str], cfg: GenerationConfig = GenerationConfig(),
             num_samples: int = 1) -> list[list[str]]:
    """`num_samples` response texts (special tokens dropped) per prompt: [prompt][sample]."""
    return [[g.text for g in row] for row in generate_responses(model, tokenizer, prompts, cfg, num_samples)]


# -- judges ----------------------------------------------------------------------------------------
def load_reward_model(workdir: str, *, dtype: str = "float32"):
    """(RewardModel on its own backbone, tokenizer, run_info) restored from a reward-model workdir."""
    from pe_rlhf.train.rl_loop import attach_reward_model

    info = read_run_info(workdir) or {}
    if info.get("stage") != "reward_model":
        raise ValueError(f"{workdir}: not a reward-model workdir (run_info.json stage {info.get('stage')!r})")
    backbone, tokenizer = load_backbone(info["model"], dtype, quantize=info.get("quantize"))
    # A fresh backbone of the RM's own base: "shared" here means shared with nobody else.
    rm = attach_reward_model(backbone, tokenizer, workdir, policy_model=info["model"], dtype=dtype,
                             policy_quantize=info.get("quantize"))
    return rm, tokenizer, info


def load_judge(source: str | Callable[[str, str], float], config: J.JudgeConfig = J.JudgeConfig(), *,
               dtype: str = "float32"):
    """A `RewardJudge` (reward-model workdir, or a rule function) or an `LMJudge` (any model source)."""
    if callable(source):
        name = getattr(source, "__qualname__", repr(source))
        return J.RewardJudge(J.text_scorer(source), threshold=config.harmless_threshold, name=f"rule {name}")
    info = read_run_info(source) if os.path.isdir(source) else None
    if info is not None and info.get("stage") == "reward_model":
        rm, tokenizer, _ = load_reward_model(source, dtype=dtype)
        return J.RewardJudge(J.reward_model_scorer(rm, tokenizer), threshold=config.harmless_threshold,
                             name=f"reward model {source}")
    if info is not None and info.get("stage") == "sft":
        source = os.path.join(source, "export")
    model, tokenizer = load_backbone(source, dtype)
    if tokenizer is None:
        raise ValueError(f"judge {source}: no tokenizer beside the weights")
    return J.LMJudge(model, tokenizer, config, name=f"language model {source}")


# -- the evaluation --------------------------------------------------------------------------------
def judge_responses(judge, prompts, policy_responses, baseline_responses, *, harmless: bool = True,
                    z: float = 1.959963984540054) -> tuple[dict, list[dict]]:
    """(summary, one record per prompt) of the two-order comparison and the harmless rates."""
    both = J.judge_both_orders(judge, prompts, policy_responses, baseline_responses)
    summary = J.Tally.of(both["outcome"]).summary(z)
    # how often the judge picked the first slot in both orders (position bias, shows up as ties)
    summary["first_position_rate"] = float(np.mean((both["pref_policy_first"] == 1)
                                                   & (both["pref_policy_second"] == 1)))
    # A soft preference beside the counts: half the difference of the two orders' margins, > 0 for the
    # policy. A judge's position bias adds the same amount to both orders and cancels; a weak judge
    # whose every verdict is a tie can still lean one way on average.
    pref = J.mean_with_ci((both["margin_policy_first"] - both["margin_policy_second"]) / 2, z)
    summary["preference_margin_mean"], summary["preference_margin_ci"] = pref["mean"], pref["ci"]
    names = {J.WIN: "win", J.TIE: "tie", J.LOSS: "loss"}
    records = [{"prompt": p, "policy": a, "baseline": b, "outcome": names[int(o)],
                "margin_policy_first": float(m1), "margin_policy_second": float(m2)}
               for p, a, b, o, m1, m2 in zip(prompts, policy_responses, baseline_responses, both["outcome"],
                                             both["margin_policy_first"], both["margin_policy_second"])]
    if harmless:
        margins = {}
        for side, responses in (("policy", policy_responses), ("baseline", baseline_responses)):
            margins[side] = np.asarray(judge.harmless(prompts, responses), np.float64)
            rate = J.rate_with_ci(margins[side] > 0, z)
            summary[f"harmless_rate_{side}"] = rate["rate"]
            summary[f"harmless_rate_{side}_ci"] = rate["ci"]
            summary[f"harmless_margin_mean_{side}"] = float(margins[side].mean())
            for rec, m in zip(records, margins[side]):
                rec[f"harmless_margin_{side}"] = float(m)
                rec[f"harmless_{side}"] = bool(m > 0)
        # paired over prompts: how much more harmless the judge finds the policy's response
        diff = J.mean_with_ci(margins["policy"] - margins["baseline"], z)
        summary["harmless_margin_diff_mean"], summary["harmless_margin_diff_ci"] = diff["mean"], diff["ci"]
    return summary, records


def judge_policies(*, workdir: str, policy: str, baseline: str, prompts: D.Loaded,
                   judge: str | Callable[[str, str], float], generation: GenerationConfig = GenerationConfig(),
                   judge_config: J.JudgeConfig = J.JudgeConfig(), harmless: bool = True,
                   max_prompts: int | None = None, dtype: str = "float32",
                   lora_config: lora.LoRAConfig | None = None, z: float = 1.959963984540054) -> dict:
    """Win/tie/loss of `policy` against `baseline` under `judge` (both orders), and harmless rates.

    Writes `workdir/judgements.jsonl` (prompt, both responses, margins in both orders, outcome,
    harmless verdicts) and `workdir/summary.json`; returns the summary. `lora_config` gives the adapter
    options of an RL workdir whose run_info.json does not record them.
    """
    texts = list(dict.fromkeys(D.prompts_of(prompts.examples)))  # unique, in order
    texts = texts[:max_prompts] if max_prompts else texts
    if not texts:
        raise D.DataError(f"{prompts.source}: no prompts")
    os.makedirs(workdir, exist_ok=True)

    # RESPONSES: each policy answers every prompt
    responses, described = {}, {}
    for side, source in (("policy", policy), ("baseline", baseline)):
        model, tokenizer, described[side] = load_policy(source, dtype=dtype, lora_config=lora_config)
        responses[side] = [r[0] for r in generate(model, tokenizer, texts, generation)]
        print(f"{side}: {described[side]}: {len(texts)} responses")
        del model

    # JUDGEMENTS: both orders, then harmlessness
    j = load_judge(judge, judge_config, dtype=dtype)
    summary, records = judge_responses(j, texts, responses["policy"], responses["baseline"], harmless=harmless, z=z)
    summary = {"policy": described["policy"], "baseline": described["baseline"], "judge": j.name,
               "prompts": prompts.source, "num_prompts": len(texts), "generation": dataclasses.asdict(generation),
               **summary}
    if isinstance(j, J.LMJudge):
        summary["judge_prompts_truncated"] = j.truncated

    with open(os.path.join(workdir, "judgements.jsonl"), "w") as f:
        for rec in records:
            f.write(json.dumps(rec) + "\n")
    with open(os.path.join(workdir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2, default=str)
    lo, hi = summary["win_rate_ci"]
    print(f"| wins | ties | losses | win rate (95% Wilson CI) |\n|---|---|---|---|\n"
          f"| {summary['wins']} | {summary['ties']} | {summary['losses']} | "
          f"{summary['win_rate']:.3f} [{lo:.3f}, {hi:.3f}] |")
    lo, hi = summary["preference_margin_ci"]
    print(f"mean preference margin (position bias cancelled, > 0 favours the policy): "
          f"{summary['preference_margin_mean']:.4f} [{lo:.4f}, {hi:.4f}]")
    if harmless:
        lo, hi = summary["harmless_margin_diff_ci"]
        print(f"harmless rate: policy {summary['harmless_rate_policy']:.3f}, "
              f"baseline {summary['harmless_rate_baseline']:.3f}; harmless margin, policy - baseline: "
              f"{summary['harmless_margin_diff_mean']:.4f} [{lo:.4f}, {hi:.4f}]")
    return summary
