"""Does a LoRA policy match a fully tuned one? A resumable sweep, judged by a yardstick refusing cannot win.

    SFT on chosen responses of HH helpful + harmless (the frozen start of everything)
      -> proxy RM (LoRA, Bradley-Terry) on the SFT export, training part of both sets
      -> judge RM on the *base* model, judge part of both sets (another base, other pairs: not a sibling)
      -> ReMax lines against the proxy, one per (arm, learning rate, seed), each trained to every step of
         `eval_steps` and evaluated there on the held-out prompts of both sets
      -> the matched-KL frontier: each arm's judge gain at given KLs to the SFT model, LoRA minus full
         across seeds, against a margin declared in the config before any line ran

Arms are `TuningConfig`s by name (LoRA rank 8 on attention, on every linear layer, rank 1 on every
linear layer, full tuning). Lines run in an order that leaves a usable result at any stop:
1. "first": every arm at the middle of its learning-rate grid, seed 0;
2. "grid": the other learning rates, seed 0;
3. "seeds": the other seeds at each arm's best learning rate. The best is the grid line with the highest
   judge gain at `select_kl` nats (interpolated; a line that never got that far is judged at its last
   point). An arm in `lr_from` takes another arm's best (rank 1 at rank 8's, as in Schulman et al.'s
   "LoRA Without Regret", where the best rate hardly depends on the rank at a fixed alpha).

Each evaluation (`evaluate_point`) answers every held-out prompt greedily and with `kl_samples`
samples at temperature 1; both reward models score every response; the samples' log-probabilities
under the policy and the SFT model give the KL. Every stage lives in its own sub-workdir and is
skipped when finished (`pe_rlhf.train.stages`), so the sweep resumes across processes.
"""

from __future__ import annotations

import dataclasses
import functools
import gc
import json
import os
from typing import Callable, Sequence

import numpy as np

from pe_rlhf import data as D
from pe_rlhf.eval import frontier as F
from pe_rlhf.eval import judge as J
from pe_rlhf.eval import winrate
from pe_rlhf.eval.experiment import (EvalConfig, Scorers, format_ci, margin_agreement, pair_margins,
                                     prompt_groups, sequence_logprobs, step_rate)
from pe_rlhf.eval.refusal import refusal_flags
from pe_rlhf.train.config import LoopConfig, TuningConfig
from pe_rlhf.train.loop import rss_peak_bytes
from pe_rlhf.train.optim import OptimizerConfig
from pe_rlhf.train.records import read_run_info
from pe_rlhf.train.stages import finished, read_json, run_stage, write_json_atomic

PHASES = ("first", "grid", "seeds")
GROUPS = ("helpful", "harmless")


# -- one evaluation -----------------------------------------------------------------------------------
def _scored(prompts, responses, scorers: Scorers) -> dict:
    texts = [r.text for r in responses]
    return {"text": texts, "tokens": [len(r.tokens) for r in responses], "eos": [r.ended_with_eos for r in responses],
            "proxy": scorers.proxy(prompts, texts).tolist(), "judge": scorers.judge(prompts, texts).tolist(),
            "refusal": refusal_flags(texts).tolist()}


def evaluate_point(*, workdir: str, name: str, model, tokenizer, prompts: Sequence[str], groups: Sequence[str],
                   scorers: Scorers, cfg: EvalConfig, baseline_rows: list | None = None, sft_model=None,
                   described: str = "") -> dict:
    """Greedy and sampled responses of `model` to `prompts`, scored, with KL to `sft_model`, and the summary.

    Writes `responses.jsonl` (one row a prompt: its group, the greedy response and the samples, each with
    proxy and judge scores, refusal flag, token count, EOS; the samples' log-probabilities under the policy
    and the SFT model) and `summary.json` (`summarise`)."""
    greedy = [r[0] for r in winrate.generate_responses(model, tokenizer, prompts, cfg.generation())]
    sampled = winrate.generate_responses(model, tokenizer, prompts, cfg.generation(temperature=1.0),
                                         num_samples=cfg.kl_samples)
    k = cfg.kl_samples
    flat_prompts = [p for p in prompts for _ in range(k)]
    flat = [g for row in sampled for g in row]
    g_scores, s_scores = _scored(list(prompts), greedy, scorers), _scored(flat_prompts, flat, scorers)
    if sft_model is not None:
        tokens = [g.tokens for g in flat]
        logp = sequence_logprobs(model, tokenizer, flat_prompts, tokens, cfg)
        logp_sft = sequence_logprobs(sft_model, tokenizer, flat_prompts, tokens, cfg)
    else:  # the SFT model itself: its KL to itself is 0
        logp = logp_sft = np.zeros(len(flat))
    rows = []
    for i, (p, g) in enumerate(zip(prompts, groups)):
        row = {"prompt": p, "group": g, **{f"greedy_{key}": v[i] for key, v in g_scores.items()},
               "samples": [{**{key: v[i * k + j] for key, v in s_scores.items()}, "logp": float(logp[i * k + j]),
                            "logp_sft": float(logp_sft[i * k + j])} for j in range(k)]}
        rows.append(row)
    with open(os.path.join(workdir, "responses.jsonl"), "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    summary = {"name": name, "policy": described, **summarise(rows, baseline_rows, cfg.z),
               "rss_peak_bytes_process": rss_peak_bytes()}
    write_json_atomic(os.path.join(workdir, "summary.json"), summary)
    return summary


def _mean_over_samples(rows, key) -> np.ndarray:
    return np.array([np.mean([s[key] for s in r["samples"]]) for r in rows], np.float64)


def summarise(rows: list, baseline_rows: list | None = None, z: float = F.Z95) -> dict:
    """The figures of one evaluation: means, refusal rates and diversity, and (against the SFT model's rows on
    the same prompts) paired gains by group, the win rate with ties as half, KL, and the judge gain net of
    length and refusal (`frontier.net_gain`)."""
    group = np.array([r["group"] for r in rows])
    judge, proxy = np.array([r["greedy_judge"] for r in rows]), np.array([r["greedy_proxy"] for r in rows])
    length = np.array([r["greedy_tokens"] for r in rows], np.float64)
    refusal = np.array([r["greedy_refusal"] for r in rows], bool)
    s_refusal = np.array([s["refusal"] for r in rows for s in r["samples"]], bool)
    s_group = np.array([r["group"] for r in rows for _ in r["samples"]])
    texts = [r["greedy_text"] for r in rows]
    out = {"prompts": len(rows), "groups": {g: int((group == g).sum()) for g in GROUPS},
           "judge_mean": float(judge.mean()), "proxy_mean": float(proxy.mean()),
           "judge_mean_sampled": float(_mean_over_samples(rows, "judge").mean()),
           "eos_fraction": J.rate_with_ci([r["greedy_eos"] for r in rows], z),
           "eos_fraction_sampled": J.rate_with_ci([s["eos"] for r in rows for s in r["samples"]], z),
           "length_mean": float(length.mean()), "length_mean_sampled": float(_mean_over_samples(rows, "tokens").mean()),
           "distinct": len(set(texts)) / len(texts), "distinct_2grams": F.distinct_ngrams(texts, 2),
           "distinct_2grams_sampled": F.distinct_ngrams([s["text"] for r in rows for s in r["samples"]], 2)}
    for g in GROUPS:
        out[f"refusal_rate_{g}"] = J.rate_with_ci(refusal[group == g], z)
        out[f"refusal_rate_{g}_sampled"] = J.rate_with_ci(s_refusal[s_group == g], z)
    kl = _mean_over_samples(rows, "logp") - _mean_over_samples(rows, "logp_sft")
    out["kl_to_sft"] = J.mean_with_ci(kl, z)
    if baseline_rows is None:
        return out
    if [b["prompt"] for b in baseline_rows] != [r["prompt"] for r in rows]:
        raise ValueError("summarise: the baseline answered other prompts, or in another order")
    b_judge = np.array([b["greedy_judge"] for b in baseline_rows])
    d_judge = judge - b_judge
    d_sampled = _mean_over_samples(rows, "judge") - _mean_over_samples(baseline_rows, "judge")

    def by_group(d):
        return {"overall": J.mean_with_ci(d, z), **{g: J.mean_with_ci(d[group == g], z) for g in GROUPS}}

    out["judge_diff_vs_sft"] = by_group(d_judge)
    out["judge_diff_vs_sft_sampled"] = by_group(d_sampled)
    out["proxy_diff_vs_sft"] = by_group(proxy - np.array([b["greedy_proxy"] for b in baseline_rows]))
    out["judge_win_rate"] = F.win_rate_ties_half(judge, b_judge)
    out["judge_diff_net_of_length_and_refusal"] = F.net_gain(d_judge, {
        "length": length - np.array([b["greedy_tokens"] for b in baseline_rows], np.float64),
        "refusal": refusal.astype(np.float64) - np.array([b["greedy_refusal"] for b in baseline_rows], np.float64)}, z)
    out["identical_to_sft"] = int(sum(r["greedy_text"] == b["greedy_text"] for r, b in zip(rows, baseline_rows)))
    return out


# -- the sweep ----------------------------------------------------------------------------------------
def lr_name(lr: float) -> str:
    return f"lr{lr:g}"


def line_dir(arm: str, lr: float, seed: int) -> str:
    return os.path.join(arm, lr_name(lr), f"seed{seed}")


def held_out_prompts(held_out: D.Loaded) -> tuple[list[str], list[str]]:
    """The distinct held-out prompts and each one's group."""
    group_of = prompt_groups(held_out)
    return list(group_of), list(group_of.values())


def rm_agreement_by_group(scorers: Scorers, held_out: D.Loaded, z: float) -> dict:
    """Each reward model's held-out pairwise accuracy and their agreement: overall and per group."""
    margins = pair_margins(scorers, held_out)
    group = np.array([e.group for e in held_out.examples])
    out = {"overall": {**margin_agreement(margins, z), "source": held_out.source}}
    for g in GROUPS:
        out[g] = {**margin_agreement({k: m[group == g] for k, m in margins.items()}, z),
                  "source": f"{held_out.source} [{g}]"}
    return out


def lora_vs_full(*, workdir: str, model: str, held_out: D.Loaded, sft_job: Callable,
                 proxy_job: Callable | dict[str, Callable], judge_job: Callable | dict[str, Callable], rl_job: Callable, arms: dict[str, TuningConfig],
                 learning_rates: dict[str, Sequence[float]], optimizer: OptimizerConfig, loop: LoopConfig,
                 lr_from: dict[str, str] | None = None, reference_arm: str = "full",
                 eval_steps: Sequence[int] = (20, 40), seeds: Sequence[int] = (0, 1, 2),
                 evaluation: EvalConfig = EvalConfig(kl_samples=2), select_kl: float = 3.0,
                 kl_targets: Sequence[float] = (1.0, 3.0), margin: float = 0.1,
                 phases: Sequence[str] = PHASES) -> dict:
    """Run (or resume) the sweep up to the last of `phases` and write `summary.json` (`collect`).

    `proxy_job` and `judge_job` each train one reward model for every prompt, or are {group: job}: one reward
    model per group (helpful, harmless), each prompt scored by its group's."""
    lr_from = dict(lr_from or {})
    _check_sweep(arms, learning_rates, lr_from, reference_arm, eval_steps, seeds, phases, evaluation)
    os.makedirs(workdir, exist_ok=True)
    d = functools.partial(os.path.join, workdir)
    prompts, groups = held_out_prompts(held_out)

    # THE YARDSTICK: SFT, proxy RM on its export, judge RM on the base model, their agreement
    run_stage("sft", d("sft"), sft_job, outputs=("summary.json", "export/config.json", "export/model.safetensors"),
              model=model)
    base = d("sft", "export")
    proxy_dir = _reward_models("proxy", proxy_job, d, model=base)
    judge_dir = _reward_models("judge", judge_job, d, model=model)
    group_of = prompt_groups(held_out)

    def scorers():
        return Scorers.load(proxy_dir, judge_dir, group_of=group_of)

    def agreement_job(workdir):
        summary = rm_agreement_by_group(scorers(), held_out, evaluation.z)
        write_json_atomic(os.path.join(workdir, "summary.json"), summary)
        return summary

    run_stage("rm_agreement", d("rm_agreement"), agreement_job)

    def sft_eval_job(workdir):
        sft, tokenizer, described = winrate.load_policy(d("sft"))
        return evaluate_point(workdir=workdir, name="sft", model=sft, tokenizer=tokenizer, prompts=prompts,
                              groups=groups, scorers=scorers(), cfg=evaluation, described=described)

    run_stage("eval/sft", d("eval", "sft"), sft_eval_job, outputs=("summary.json", "responses.jsonl"))
    baseline_rows = [json.loads(line) for line in open(d("eval", "sft", "responses.jsonl"))]

    # THE LINES: each trained to every evaluation step in turn, evaluated there
    def run_line(arm: str, lr: float, seed: int):
        if isinstance(proxy_dir, dict):
            raise NotImplementedError(
                f"{workdir}: the proxy is one reward model per group ({', '.join(proxy_dir)}), and RL cannot yet "
                "score a prompt by its group's reward model; the yardstick stages are done (rm_agreement/, "
                "eval/sft/). Give lora_vs_full.proxy_job one reward model to train RL lines.")
        rel = line_dir(arm, lr, seed)
        for steps in eval_steps:
            gc.collect()
            run_stage(f"rl/{rel} to step {steps}", d("rl", rel), rl_job, marker=f"DONE.step{steps}",
                      model=base, reward_model=proxy_dir, tuning=arms[arm],
                      optimizer=dataclasses.replace(optimizer, learning_rate=lr),
                      loop=dataclasses.replace(loop, num_steps=steps, seed=seed))

            def eval_job(workdir, steps=steps):
                info = read_run_info(d("rl", rel))
                policy, tokenizer, at = winrate.restore_rl_policy(d("rl", rel), info)
                if at != steps:
                    raise RuntimeError(f"{d('rl', rel)}: its latest checkpoint is step {at}, not {steps}; the "
                                       f"evaluation at step {steps} must run before the line trains further")
                sft, _, _ = winrate.load_policy(d("sft"))
                return evaluate_point(workdir=workdir, name=f"{rel} step {steps}", model=policy, tokenizer=tokenizer,
                                      prompts=prompts, groups=groups, scorers=scorers(), cfg=evaluation,
                                      baseline_rows=baseline_rows, sft_model=sft,
                                      described=f"{d('rl', rel)} step {steps}")

            run_stage(f"eval/{rel}/step{steps}", d("eval", rel, f"step{steps}"), eval_job,
                      outputs=("summary.json", "responses.jsonl"))
        write_json_atomic(d("summary.json"), collect(workdir, arms, reference_arm, select_kl, kl_targets, margin))

    def middle(arm):
        grid = learning_rates[lr_from.get(arm, arm)]
        return grid[len(grid) // 2]

    last = max(PHASES.index(p) for p in phases)
    for arm in arms:  # 1. every arm at one learning rate
        run_line(arm, middle(arm), seeds[0])
    if last >= 1:  # 2. the grid
        for arm in arms:
            for lr in learning_rates.get(arm, ()):
                run_line(arm, lr, seeds[0])
    if last >= 2:  # 3. seeds at each arm's best learning rate
        best = best_learning_rates(workdir, arms, learning_rates, lr_from, seeds[0], select_kl)
        for arm in arms:
            for seed in seeds:
                run_line(arm, best[arm], seed)
    result = collect(workdir, arms, reference_arm, select_kl, kl_targets, margin)
    write_json_atomic(d("summary.json"), result)
    print(markdown(result))
    return result


def _reward_models(role: str, job, d, *, model: str) -> str | dict[str, str]:
    """Train (or find finished) the proxy or judge reward model: one (`<role>_rm/`), or one per group when
    `job` is {group: job} (`rm_<role>_<group>/`). Returns its workdir, or {group: workdir}."""
    if not isinstance(job, dict):
        run_stage(f"{role}_rm", d(f"{role}_rm"), job, model=model)
        return d(f"{role}_rm")
    unknown = [g for g in job if g not in GROUPS]
    if unknown:
        raise KeyError(f"lora_vs_full.{role}_job: groups {unknown} are not among the held-out groups {GROUPS}")
    for g, group_job in job.items():
        run_stage(f"rm_{role}_{g}", d(f"rm_{role}_{g}"), group_job, model=model)
    return {g: d(f"rm_{role}_{g}") for g in job}


def _check_sweep(arms, learning_rates, lr_from, reference_arm, eval_steps, seeds, phases, evaluation):
    """Refuse a sweep that cannot run, before any stage does."""
    where = "lora_vs_full"
    if reference_arm not in arms:
        raise KeyError(f"{where}.reference_arm={reference_arm!r} is not an arm ({', '.join(arms)})")
    for arm in arms:
        source = lr_from.get(arm, arm)
        if source not in arms or not learning_rates.get(source):
            raise KeyError(f"{where}.learning_rates: arm {arm!r} has no grid (and lr_from names none for it)")
    unknown = [a for a in [*learning_rates, *lr_from] if a not in arms]
    if unknown:
        raise KeyError(f"{where}: {unknown} in learning_rates or lr_from are not arms ({', '.join(arms)})")
    if list(eval_steps) != sorted(set(eval_steps)) or not eval_steps or eval_steps[0] < 1:
        raise ValueError(f"{where}.eval_steps={list(eval_steps)}: positive steps in increasing order")
    if not seeds or len(set(seeds)) != len(seeds):
        raise ValueError(f"{where}.seeds={list(seeds)}: distinct seeds, at least one")
    bad = [p for p in phases if p not in PHASES]
    if bad or not phases:
        raise ValueError(f"{where}.phases={list(phases)}: choose from {PHASES}")
    if evaluation.kl_samples < 1:
        raise ValueError(f"{where}: EvalConfig.kl_samples={evaluation.kl_samples}; the sweep's KL and sampled "
                         "judge need at least one sample per prompt")


# -- reading the sweep --------------------------------------------------------------------------------
def line_points(workdir: str, rel: str) -> list[dict]:
    """The finished evaluations of one line, by step: step, KL to SFT, judge gain (greedy, overall)."""
    root = os.path.join(workdir, "eval", rel)
    if not os.path.isdir(root):
        return []
    points = []
    for name in sorted(os.listdir(root), key=lambda s: int(s[4:]) if s.startswith("step") else -1):
        rec = finished(os.path.join(root, name)) if name.startswith("step") else None
        if rec is not None:
            s = rec["summary"]
            points.append({"step": int(name[4:]), "kl": s["kl_to_sft"]["mean"],
                           "judge_gain": s["judge_diff_vs_sft"]["overall"]["mean"], "summary": s})
    return points


def selection_score(points: list[dict], select_kl: float) -> float | None:
    """A line's judge gain at `select_kl` nats, or at its last point when it never got that far."""
    if not points:
        return None
    at = F.value_at_kl([(p["kl"], p["judge_gain"]) for p in points], select_kl)
    return at if at is not None else points[-1]["judge_gain"]


def best_learning_rates(workdir, arms, learning_rates, lr_from, seed, select_kl) -> dict[str, float]:
    """Each arm's grid line (seed `seed`) with the highest `selection_score`; `lr_from` arms take their source's."""
    best = {}
    for arm in arms:
        if arm in lr_from:
            continue
        scored = [(selection_score(line_points(workdir, line_dir(arm, lr, seed)), select_kl), lr)
                  for lr in learning_rates[arm]]
        scored = [(s, lr) for s, lr in scored if s is not None]
        if not scored:
            raise RuntimeError(f"{workdir}: arm {arm!r} has no evaluated grid line to choose a learning rate from")
        best[arm] = max(scored)[1]
    for arm, source in lr_from.items():
        best[arm] = best[source]
    return best


def collect(workdir: str, arms: dict, reference_arm: str, select_kl: float, kl_targets: Sequence[float],
            margin: float) -> dict:
    """Every finished stage under one dict: the yardstick, one record per line, and the matched-KL frontier."""
    d = functools.partial(os.path.join, workdir)
    out = {"workdir": workdir, "stages": {}, "lines": [], "margin": margin, "kl_targets": list(kl_targets),
           "select_kl": select_kl}
    for stage in ("sft", "proxy_rm", "judge_rm", "rm_agreement", "eval/sft"):
        rec = finished(d(stage))
        if rec is not None:
            out["stages"][stage] = {"seconds": rec["seconds"], "summary": rec["summary"]}
    for arm in arms:
        arm_dir = d("rl", arm)
        for lr_dir in sorted(os.listdir(arm_dir)) if os.path.isdir(arm_dir) else []:
            for seed_dir in sorted(os.listdir(os.path.join(arm_dir, lr_dir))):
                rel = os.path.join(arm, lr_dir, seed_dir)
                points = line_points(workdir, rel)
                if points:
                    out["lines"].append(_line_record(workdir, rel, arm, points))
    out["frontier"] = matched_kl(out["lines"], reference_arm, kl_targets, margin, select_kl)
    return out


def _line_record(workdir, rel, arm, points) -> dict:
    info = read_run_info(os.path.join(workdir, "rl", rel)) or {}
    rl_summary = read_json(os.path.join(workdir, "rl", rel, "summary.json")) or {}
    keys = ("judge_diff_vs_sft", "judge_diff_vs_sft_sampled", "proxy_diff_vs_sft", "judge_win_rate",
            "judge_diff_net_of_length_and_refusal", "refusal_rate_helpful", "refusal_rate_harmless",
            "refusal_rate_helpful_sampled", "refusal_rate_harmless_sampled", "kl_to_sft", "eos_fraction",
            "distinct", "distinct_2grams", "length_mean", "identical_to_sft")
    _, lr_part, seed_part = rel.split(os.sep)
    return {"arm": arm, "learning_rate": float(lr_part[2:]), "seed": int(seed_part[4:]), "line": rel,
            "steps": points[-1]["step"], "lora": info.get("lora"), "tuning": info.get("tuning"),
            "cost": {"compiled_peak_bytes": rl_summary.get("compiled_peak_bytes"),
                     "rss_peak_bytes_process": rl_summary.get("rss_peak_bytes_process"),
                     "seconds_per_step": step_rate(os.path.join(workdir, "rl", rel),
                                                   rl_summary.get("batch_size"))["seconds_per_step"]},
            "evaluations": [{"step": p["step"], **{k: p["summary"].get(k) for k in keys}} for p in points]}


def matched_kl(lines: list[dict], reference_arm: str, kl_targets: Sequence[float], margin: float,
               select_kl: float) -> dict:
    """Each arm's judge gain at each target KL per run, and every arm minus the reference across runs.

    Only an arm's lines at one learning rate count: the rate with the most seeds (its best, once seeds have
    run), ties broken by the mean `selection_score` at `select_kl` (the grid's best before then)."""
    by_arm = {}
    for line in lines:
        by_arm.setdefault(line["arm"], {}).setdefault(line["learning_rate"], []).append(line)

    def rank(runs):
        scores = [selection_score([{"kl": e["kl_to_sft"]["mean"],
                                    "judge_gain": e["judge_diff_vs_sft"]["overall"]["mean"]} for e in r["evaluations"]],
                                  select_kl) for r in runs]
        return len(runs), float(np.mean(scores))

    chosen = {arm: max(lrs.values(), key=rank) for arm, lrs in by_arm.items()}
    out = {"arms": {}, "differences": {}}
    for arm, runs in chosen.items():
        per_target = {}
        for kl in kl_targets:
            per_target[f"{kl:g}"] = [F.value_at_kl([(e["kl_to_sft"]["mean"],
                                                     e["judge_diff_vs_sft"]["overall"]["mean"])
                                                    for e in r["evaluations"]], kl) for r in runs]
        out["arms"][arm] = {"learning_rate": runs[0]["learning_rate"], "seeds": [r["seed"] for r in runs],
                            "judge_gain_at_kl": per_target}
    ref = out["arms"].get(reference_arm)
    for arm, rec in out["arms"].items():
        if arm == reference_arm or ref is None:
            continue
        out["differences"][arm] = {}
        for kl in kl_targets:
            a = [v for v in rec["judge_gain_at_kl"][f"{kl:g}"] if v is not None]
            b = [v for v in ref["judge_gain_at_kl"][f"{kl:g}"] if v is not None]
            if len(a) < 2 or len(b) < 2:
                out["differences"][arm][f"{kl:g}"] = {"runs": [len(a), len(b)], "verdict": "too few runs reach it"}
                continue
            diff = F.seed_difference(a, b)
            out["differences"][arm][f"{kl:g}"] = {**diff, **F.margin_verdict(diff, diff["mean_b"], margin)}
    return out


def _ci(x: dict | None) -> str:
    return format_ci(x, "{:+.2f}")


def markdown(result: dict) -> str:
    """One row per evaluation of every line, then the matched-KL differences."""
    rows = ["| arm | lr | seed | step | judge - SFT | helpful | harmless | net of length, refusal | win rate "
            "| refusal helpful / harmless | KL to SFT | EOS | distinct | tokens |",
            "|---|---:|---:|---:|---|---|---|---|---:|---|---|---:|---:|---:|"]
    for line in result["lines"]:
        for e in line["evaluations"]:
            jd = e["judge_diff_vs_sft"]
            rows.append(f"| {line['arm']} | {line['learning_rate']:g} | {line['seed']} | {e['step']} "
                        f"| {_ci(jd['overall'])} | {_ci(jd['helpful'])} | {_ci(jd['harmless'])} "
                        f"| {_ci(e['judge_diff_net_of_length_and_refusal'])} | {e['judge_win_rate']['win_rate']:.2f} "
                        f"| {e['refusal_rate_helpful']['rate']:.2f} / {e['refusal_rate_harmless']['rate']:.2f} "
                        f"| {_ci(e['kl_to_sft'])} | {e['eos_fraction']['rate']:.2f} | {e['distinct']:.2f} "
                        f"| {e['length_mean']:.1f} |")
    for arm, by_kl in result.get("frontier", {}).get("differences", {}).items():
        for kl, diff in by_kl.items():
            rows.append(f"\n{arm} - reference at KL {kl}: " + (
                f"{_ci(diff)} over {diff['runs']} runs, margin bound {diff['bound']:+.2f}: {diff['verdict']}"
                if "ci" in diff else diff["verdict"]))
    return "\n".join(rows)
