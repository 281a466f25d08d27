"""The PE-RLHF experiment on a real model, in one resumable job, judged by an independent reward model.

    SFT -> proxy RM (LoRA, Bradley-Terry) + judge RM (trained on prompts no other stage sees)
        -> RL lines (LoRA ReMax, REINFORCE, PPO, a fully tuned ReMax policy...) against the proxy
        -> evaluation of the SFT model and of every policy on held-out prompts

Each stage runs in its own sub-workdir through `pe_rlhf.train.stages.run_stage`: skipped when
finished, resumed from its checkpoints when interrupted. The SFT export (LoRA merged into the base)
is the frozen base of both reward models and of every policy, so a LoRA reward adapter, a LoRA
policy adapter and the KL anchor (adapters off) share one copy of its weights.

The evaluation of one policy (`evaluate_policy`) writes `responses.jsonl` (prompt, greedy response,
its proxy and judge scores, EOS flag, length, and the sampled response's log-ratio to the SFT model)
and `summary.json`: paired differences against the SFT model with 95% intervals, the judge's win
rate in both orders, harmless rates, KL to the SFT model, EOS fraction and length; and
`curve.json`, the judge's reward of the in-training evaluations against the KL of training at that
step (the over-optimisation curve of Gao et al., 2022).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pe_rlhf import data as D
from pe_rlhf.eval import judge as J
from pe_rlhf.eval import winrate
from pe_rlhf.train.loop import rss_peak_bytes
from pe_rlhf.train.policy import response_logprobs
from pe_rlhf.train.stages import run_stage, write_json_atomic

BASELINE = "sft"


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    """How policies answer the held-out prompts: greedy, with the RL stage's prompt and response budgets."""

    max_prompt_len: int = 128
    max_new_tokens: int = 48
    batch_size: int = 20
    kl_samples: int = 1  # sampled (temperature 1) responses per prompt for the KL estimate; 0: skip it
    seed: int = 0
    z: float = 1.959963984540054  # 95% intervals

    def generation(self, temperature: float = 0.0) -> winrate.GenerationConfig:
        return winrate.GenerationConfig(max_prompt_len=self.max_prompt_len, max_new_tokens=self.max_new_tokens,
                                        temperature=temperature, batch_size=self.batch_size, seed=self.seed)


# -- scoring with both reward models -------------------------------------------------------------------
@dataclasses.dataclass
class Scorers:
    """The proxy and the judge reward models as text scorers `(prompts, responses) -> scores`.

    Each may be one reward model, or one per group of prompts (`routed`): then a prompt is scored by the
    reward model of its group, as Llama 2 scores a prompt flagged unsafe by its safety reward model."""

    proxy: Callable
    judge: Callable
    proxy_dir: str | dict
    judge_dir: str | dict

    @classmethod
    def load(cls, proxy_dir: str | dict, judge_dir: str | dict, group_of: dict | None = None) -> "Scorers":
        """`proxy_dir` and `judge_dir`: a reward model's workdir, or {group: workdir}; with groups, `group_of`
        maps each prompt that will be scored to its group."""
        return cls(_load_scorer(proxy_dir, group_of), _load_scorer(judge_dir, group_of), proxy_dir, judge_dir)


def _load_scorer(rm_dir: str | dict, group_of: dict | None) -> Callable:
    if isinstance(rm_dir, dict):
        if group_of is None:
            raise ValueError(f"Scorers.load: reward models by group ({', '.join(rm_dir)}) need group_of, "
                             "each prompt's group")
        return routed({g: _load_scorer(d, None) for g, d in rm_dir.items()}, group_of)
    rm, tokenizer, info = winrate.load_reward_model(rm_dir)
    return J.reward_model_scorer(rm, tokenizer, options=rm_budgets(info))


def routed(scorers: dict[str, Callable], group_of: dict[str, str]) -> Callable:
    """One scorer from one per group: each prompt's response is scored by its group's (`group_of[prompt]`)."""

    def score(prompts, responses):
        missing = sorted({p for p in prompts if group_of.get(p) not in scorers}, key=str)
        if missing:
            raise KeyError(f"routed scorer: {len(missing)} prompt(s) have no group with a reward model "
                           f"({', '.join(scorers)}), e.g. {missing[0][-80:]!r}")
        groups = np.array([group_of[p] for p in prompts])
        out = np.zeros(len(prompts), np.float64)
        for g, scorer in scorers.items():
            idx = np.flatnonzero(groups == g)
            if len(idx):
                out[idx] = scorer([prompts[i] for i in idx], [responses[i] for i in idx])
        return out

    return score


def prompt_groups(pairs: D.Loaded) -> dict[str, str]:
    """Each prompt's group; an error if one prompt sits in two groups (it could not be routed)."""
    group_of = {}
    for e in pairs.examples:
        if group_of.setdefault(e.prompt, e.group) != e.group:
            raise ValueError(f"{pairs.source}: the prompt {e.prompt[-80:]!r} is in groups {group_of[e.prompt]!r} "
                             f"and {e.group!r}; a reward model by group cannot score it")
    return group_of


def rm_budgets(info: dict) -> D.TokenizeOptions:
    """The token budgets a reward model trained with (its run record), so it scores texts laid out as
    in training: prompts cut from the left to the same length, responses from the right."""
    data = (info.get("identity") or {}).get("data")
    if data is None:  # a record without its data budgets: those of hh_rlhf.gin's reward models
        return D.TokenizeOptions(max_prompt_len=128, max_response_len=64)
    return D.TokenizeOptions(max_prompt_len=data["max_prompt_len"], max_response_len=data["max_response_len"],
                             eos_id=data.get("eos_id"))


def pair_margins(scorers: Scorers, pairs: D.Loaded) -> dict[str, np.ndarray]:
    """Each reward model's score of the chosen response minus the rejected one's, per pair."""
    prompts = [e.prompt for e in pairs.examples]
    return {name: getattr(scorers, name)(prompts, [e.chosen for e in pairs.examples])
            - getattr(scorers, name)(prompts, [e.rejected for e in pairs.examples]) for name in ("proxy", "judge")}


def margin_agreement(margins: dict[str, np.ndarray], z: float = J.wilson_interval.__defaults__[0]) -> dict:
    """Each reward model's pairwise accuracy (margin > 0) and how often the two agree, from their margins."""
    out = {"pairs": int(len(margins["proxy"]))}
    for name in ("proxy", "judge"):
        acc = J.rate_with_ci(margins[name] > 0, z)
        out[f"{name}_pairwise_accuracy"], out[f"{name}_pairwise_accuracy_ci"] = acc["rate"], acc["ci"]
    agree = J.rate_with_ci(np.sign(margins["proxy"]) == np.sign(margins["judge"]), z)
    out["agreement"], out["agreement_ci"] = agree["rate"], agree["ci"]
    out["margin_correlation"] = float(np.corrcoef(margins["proxy"], margins["judge"])[0, 1])
    return out


def rm_agreement(scorers: Scorers, pairs: D.Loaded, z: float = J.wilson_interval.__defaults__[0]) -> dict:
    """Each reward model's accuracy on `pairs` (which neither trained on) and how often they agree."""
    return {**margin_agreement(pair_margins(scorers, pairs), z), "source": pairs.source}


# -- KL to the SFT model ------------------------------------------------------------------------------
@functools.partial(jax.jit, static_argnums=(0, 5))
def _sequence_logprob(graphdef, state, seq_BxL, seq_mask_BxL, tokens_BxN, prompt_len, mask_BxN):
    model = nnx.merge(graphdef, state)
    logp_BxN, _ = response_logprobs(model, seq_BxL, seq_mask_BxL, prompt_len, tokens_BxN)
    return jnp.sum(logp_BxN * mask_BxN, axis=1)


def sequence_logprobs(model, tokenizer, prompts: Sequence[str], responses: Sequence[Sequence[int]],
                      cfg: EvalConfig) -> np.ndarray:
    """log p(response | prompt) under `model` for token-id responses (as sampled, EOS included)."""
    graphdef, state = nnx.split(model)
    ids = winrate.prompt_ids(tokenizer, prompts, cfg.max_prompt_len)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    n = cfg.max_new_tokens
    out = []
    for i in range(0, len(ids), cfg.batch_size):
        chunk = list(zip(ids[i:i + cfg.batch_size], responses[i:i + cfg.batch_size]))
        chunk = chunk + [chunk[-1]] * (cfg.batch_size - len(chunk))
        batch = D.batch_prompts([p for p, _ in chunk], prompt_len=cfg.max_prompt_len, pad_id=pad)  # left-padded
        tokens = np.full((len(chunk), n), pad, np.int32)
        mask = np.zeros((len(chunk), n), bool)
        for b, (_, r) in enumerate(chunk):
            tokens[b, :len(r)], mask[b, :len(r)] = r, True
        seq = np.concatenate([batch["prompt_BxT"], tokens], 1)
        seq_mask = np.concatenate([batch["prompt_mask_BxT"].astype(bool), mask], 1)
        out.append(np.asarray(_sequence_logprob(graphdef, state, seq, seq_mask, tokens, cfg.max_prompt_len, mask)))
    return np.concatenate(out)[: len(ids)].astype(np.float64)


# -- one policy ---------------------------------------------------------------------------------------
def policy_responses(*, policy: str, prompts: Sequence[str], cfg: EvalConfig,
                     baseline_model=None) -> tuple[list, np.ndarray | None]:
    """Greedy responses of `policy` and, with a baseline model, per-prompt KL estimates to it.

    KL(policy || baseline) over a whole response is estimated from `kl_samples` responses sampled at
    temperature 1: the mean of log pi(y|x) - log pi_base(y|x) (unbiased; one sample per prompt is noisy
    per prompt, its mean over prompts is what the summary reports).
    """
    model, tokenizer, described = winrate.load_policy(policy)
    greedy = [r[0] for r in winrate.generate_responses(model, tokenizer, prompts, cfg.generation())]
    kl = None
    if baseline_model is not None and cfg.kl_samples > 0:
        sampled = winrate.generate_responses(model, tokenizer, prompts, cfg.generation(temperature=1.0),
                                             num_samples=cfg.kl_samples)
        rows = [(p, g.tokens) for p, gs in zip(prompts, sampled) for g in gs]
        logp = sequence_logprobs(model, tokenizer, [p for p, _ in rows], [t for _, t in rows], cfg)
        logp_base = sequence_logprobs(baseline_model, tokenizer, [p for p, _ in rows], [t for _, t in rows], cfg)
        kl = (logp - logp_base).reshape(len(prompts), cfg.kl_samples).mean(axis=1)
    print(f"{policy}: {described}: {len(prompts)} greedy responses")
    return greedy, kl


def evaluate_policy(*, workdir: str, name: str, policy: str, prompts: Sequence[str], scorers: Scorers,
                    cfg: EvalConfig, baseline: dict | None = None, baseline_model=None) -> dict:
    """Responses, scores and (against `baseline`, the SFT model's evaluation) paired comparisons."""
    greedy, kl = policy_responses(policy=policy, prompts=prompts, cfg=cfg, baseline_model=baseline_model)
    texts = [g.text for g in greedy]
    proxy, judge = scorers.proxy(prompts, texts), scorers.judge(prompts, texts)
    eos = np.array([g.ended_with_eos for g in greedy])
    length = np.array([len(g.tokens) for g in greedy], np.float64)
    with open(os.path.join(workdir, "responses.jsonl"), "w") as f:
        for i, (p, g) in enumerate(zip(prompts, greedy)):
            f.write(json.dumps({"prompt": p, "response": g.text, "ended_with_eos": g.ended_with_eos,
                                "tokens": len(g.tokens), "proxy": float(proxy[i]), "judge": float(judge[i]),
                                "kl_sample": None if kl is None else float(kl[i])}) + "\n")
    z = cfg.z
    summary = {"name": name, "policy": policy, "prompts": len(prompts),
               "proxy_mean": float(proxy.mean()), "judge_mean": float(judge.mean()),
               "eos_fraction": J.rate_with_ci(eos, z), "length_mean": float(length.mean()),
               "harmless_rate_judge": J.rate_with_ci(judge > 0, z)}
    if kl is not None:
        summary["kl_to_sft"] = J.mean_with_ci(kl, z)
    if baseline is not None:
        base = [json.loads(line) for line in open(baseline["responses"])]
        if [b["prompt"] for b in base] != list(prompts):
            raise ValueError(f"{baseline['responses']}: the baseline answered other prompts; rerun its evaluation")
        base_proxy = np.array([b["proxy"] for b in base])
        base_judge = np.array([b["judge"] for b in base])
        summary["proxy_diff_vs_sft"] = J.mean_with_ci(proxy - base_proxy, z)
        summary["judge_diff_vs_sft"] = J.mean_with_ci(judge - base_judge, z)
        # the judge in both orders: for a reward-model judge the two orders agree by construction
        # (a margin is a score difference), so a win is a strictly higher judge score
        judge_rm = J.RewardJudge(lambda ps, rs: scorers.judge(ps, rs), threshold=0.0, name="judge reward model")
        tally, _ = winrate.judge_responses(judge_rm, list(prompts), texts, [b["response"] for b in base],
                                           harmless=False, z=z)
        summary["judge_win_rate"] = {k: tally[k] for k in ("wins", "ties", "losses", "win_rate", "win_rate_ci")}
        summary["identical_to_sft"] = int(sum(t == b["response"] for t, b in zip(texts, base)))
    summary["rss_peak_bytes_process"] = rss_peak_bytes()
    write_json_atomic(os.path.join(workdir, "summary.json"), summary)
    return summary


def eval_curve(rl_dir: str, scorers: dict[str, Callable]) -> list[dict]:
    """An RL run's in-training evaluations, each scored by `scorers`, against the KL of training then.

    `samples_<step>.jsonl` hold the responses to the run's own held-out prompts with the proxy's reward;
    each point has its step, the proxy's mean reward, the mean of each `scorers[name](prompts, responses)`
    under `name`, and the KL: the training rollouts' mean KL to the anchor (nats per response) over the
    logged steps since the previous evaluation (0 where none was logged, as at the start).
    """
    metrics = [json.loads(line) for line in open(os.path.join(rl_dir, "metrics.jsonl"))]
    kl_by_step = {}
    for m in metrics:
        if m.get("train/kl") is not None:
            kl_by_step[m["step"]] = m["train/kl"]  # a resumed run logs a step again: the last line wins
    steps = sorted(int(f[len("samples_"):-len(".jsonl")]) for f in os.listdir(rl_dir)
                   if f.startswith("samples_") and f.endswith(".jsonl"))
    curve, prev = [], 0
    for step in steps:
        rows = [json.loads(line) for line in open(os.path.join(rl_dir, f"samples_{step}.jsonl"))]
        prompts, responses = [r["prompt"] for r in rows], [r["response"] for r in rows]
        window = [v for s, v in kl_by_step.items() if prev < s <= step]
        curve.append({"step": step, "proxy": float(np.mean([r["reward"] for r in rows])),
                      **{name: float(np.mean(score(prompts, responses))) for name, score in scorers.items()},
                      "kl": float(np.mean(window)) if window else 0.0})
        prev = step
    return curve


# -- the experiment -----------------------------------------------------------------------------------
REWARDS = ("proxy", "ensemble", "warm")


def rlhf_experiment(*, workdir: str, model: str, held_out: D.Loaded, sft_job: Callable, proxy_job: Callable,
                    judge_job: Callable, rl_jobs: dict[str, Callable], lines: Sequence[str] | None = None,
                    evaluation: EvalConfig = EvalConfig(), ensemble_job: Callable | None = None,
                    line_rewards: dict[str, str] | None = None) -> dict:
    """Run (or resume) every stage and write `summary.json`: one row per line, as in the results page.

    `held_out` is the part of the data no stage trains on (`pe_rlhf.data.named.dataset_part(...,
    'eval')`): its prompts are the evaluation's, its pairs are where proxy and judge are compared.
    `lines` picks which of `rl_jobs` to run now (all by default), so lines can be added to a
    finished experiment later.

    `line_rewards` names the reward a line optimises: "proxy" (the default), "ensemble" or "warm".
    Those two come from `ensemble_job` (a `train_reward_ensemble`), run in `proxy_ensemble/` when a
    line needs it, with the proxy RM as its member 0 and further members trained the same way with
    other seeds; "warm" is their weight average. Every line is still judged, and compared, by the
    one proxy and the judge.
    """
    held = held_out
    prompts = list(D.prompts_of(held.examples))
    lines = list(rl_jobs) if lines is None else list(lines)
    unknown = [n for n in lines if n not in rl_jobs]
    if unknown:
        raise KeyError(f"rlhf_experiment.lines: {unknown} not in rl_jobs ({', '.join(rl_jobs)})")
    line_rewards = dict(line_rewards or {})
    bad = {n: r for n, r in line_rewards.items() if n not in rl_jobs or r not in REWARDS}
    if bad:
        raise KeyError(f"rlhf_experiment.line_rewards: {bad}: each key must be a line of rl_jobs "
                       f"({', '.join(rl_jobs)}) and each value one of {REWARDS}")
    need_ensemble = any(line_rewards.get(n, "proxy") != "proxy" for n in lines)
    if need_ensemble and ensemble_job is None:
        raise ValueError("rlhf_experiment: lines "
                         f"{[n for n in lines if line_rewards.get(n, 'proxy') != 'proxy']} optimise the ensemble "
                         "or WARM, but rlhf_experiment.ensemble_job is not set")
    os.makedirs(workdir, exist_ok=True)
    d = functools.partial(os.path.join, workdir)
    stages = {}

    # SFT, then both reward models on its export
    stages["sft"] = run_stage("sft", d("sft"), sft_job, outputs=("summary.json", "export/config.json",
                                                                 "export/model.safetensors"), model=model)
    base = d("sft", "export")
    stages["proxy_rm"] = run_stage("proxy_rm", d("proxy_rm"), proxy_job, model=base)
    stages["judge_rm"] = run_stage("judge_rm", d("judge_rm"), judge_job, model=base)

    scorers = None

    def get_scorers():
        nonlocal scorers
        if scorers is None:
            scorers = Scorers.load(d("proxy_rm"), d("judge_rm"))
        return scorers

    def agreement_job(workdir):
        summary = rm_agreement(get_scorers(), held, evaluation.z)
        write_json_atomic(os.path.join(workdir, "summary.json"), summary)
        return summary

    stages["rm_agreement"] = run_stage("rm_agreement", d("rm_agreement"), agreement_job)
    if need_ensemble:  # the proxy is member 0: its seed and data are the members' recipe
        stages["proxy_ensemble"] = run_stage("proxy_ensemble", d("proxy_ensemble"), ensemble_job, model=base,
                                             first_members=[d("proxy_rm")],
                                             outputs=("summary.json", "warm/run_info.json"))
    reward_dirs = {"proxy": d("proxy_rm"), "ensemble": d("proxy_ensemble"), "warm": d("proxy_ensemble", "warm")}

    # the starting point every line is measured against
    def sft_eval_job(workdir):
        return evaluate_policy(workdir=workdir, name=BASELINE, policy=d("sft"), prompts=prompts,
                               scorers=get_scorers(), cfg=dataclasses.replace(evaluation, kl_samples=0))

    stages["eval/sft"] = run_stage("eval/sft", d("eval", "sft"), sft_eval_job, outputs=("summary.json",
                                                                                        "responses.jsonl"))
    baseline = {"responses": d("eval", "sft", "responses.jsonl")}

    for line in lines:
        reward = line_rewards.get(line, "proxy")
        stages[f"rl/{line}"] = run_stage(f"rl/{line}", d("rl", line), rl_jobs[line], model=base,
                                         reward_model=reward_dirs[reward])

        def eval_job(workdir, line=line, reward=reward):
            sft_model, _, _ = winrate.load_policy(d("sft"))
            summary = evaluate_policy(workdir=workdir, name=line, policy=d("rl", line), prompts=prompts,
                                      scorers=get_scorers(), cfg=evaluation, baseline=baseline,
                                      baseline_model=sft_model)
            # "proxy" in a curve is the reward the line optimised; another reward's line is also scored
            # by the single proxy, so that every curve has it
            curve = eval_curve(d("rl", line), {"judge": get_scorers().judge,
                                               **({"single_proxy": get_scorers().proxy} if reward != "proxy" else {})})
            write_json_atomic(os.path.join(workdir, "curve.json"), curve)
            return summary

        stages[f"eval/{line}"] = run_stage(f"eval/{line}", d("eval", line), eval_job,
                                           outputs=("summary.json", "responses.jsonl", "curve.json"))

    result = collect(workdir)
    write_json_atomic(d("summary.json"), result)
    print(markdown(result))
    return result


def _read(path: str):
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def step_rate(rl_dir: str, batch_size: int | None) -> dict:
    """A training run's median examples per second over its logged steps, and the seconds per step it means."""
    path = os.path.join(rl_dir, "metrics.jsonl")
    rates = []
    if os.path.isfile(path):
        with open(path) as f:
            rates = [m["train/examples_per_s"] for m in map(json.loads, f) if m.get("train/examples_per_s")]
    median = float(np.median(rates)) if rates else None
    return {"median_examples_per_s": median,
            "seconds_per_step": batch_size / median if median and batch_size else None}


def collect(workdir: str) -> dict:
    """Every finished stage's figures under one dict (what `docs/results/hh_rlhf.json` holds)."""
    from pe_rlhf.train.stages import finished

    d = functools.partial(os.path.join, workdir)
    out = {"workdir": workdir, "stages": {}, "lines": {}}
    for stage in ("sft", "proxy_rm", "judge_rm", "rm_agreement", "proxy_ensemble"):
        rec = finished(d(stage))
        if rec is not None:
            out["stages"][stage] = {"seconds": rec["seconds"], "summary": rec["summary"]}
    rl_root = d("rl")
    names = [BASELINE] + (sorted(os.listdir(rl_root)) if os.path.isdir(rl_root) else [])
    for name in names:
        ev = finished(d("eval", name))
        if ev is None:
            continue
        row = dict(ev["summary"])
        rl = finished(d("rl", name)) if name != BASELINE else None
        if rl is not None:
            s = rl["summary"]
            info = _read(d("rl", name, "run_info.json")) or {}
            row["rl"] = {"algorithm": s.get("algorithm"), "tuning": s.get("tuning"), "steps": s.get("step"),
                         "seconds": rl["seconds"], "compiled_peak_bytes": s.get("compiled_peak_bytes"),
                         "rss_peak_bytes_process": s.get("rss_peak_bytes_process"),
                         **step_rate(d("rl", name), s.get("batch_size")),
                         **{k: info.get(k) for k in ("reward_model", "reward_rule")}}
            row["curve"] = _read(d("eval", name, "curve.json"))
        out["lines"][name] = row
    return out


def format_ci(x: dict | None, fmt: str = "{:+.3f}") -> str:
    """`mean [lo, hi]` of a `mean_with_ci` dict, "-" for none."""
    if not x:
        return "-"
    lo, hi = x["ci"]
    return f"{fmt.format(x['mean'])} [{fmt.format(lo)}, {fmt.format(hi)}]"


def markdown(result: dict) -> str:
    """The results table: one row per line, the SFT model first."""
    head = ("| line | judge - SFT (95% CI) | proxy - SFT (95% CI) | judge win rate | EOS | tokens | KL to SFT "
            "| s/step | compiled peak | RSS peak |\n|---|---|---|---|---:|---:|---|---:|---:|---:|")
    rows = [head]
    for name, r in result["lines"].items():
        win = r.get("judge_win_rate")
        win_s = f"{win['win_rate']:.2f} [{win['win_rate_ci'][0]:.2f}, {win['win_rate_ci'][1]:.2f}]" if win else "-"
        rl = r.get("rl") or {}
        gib = lambda b: f"{b / 2**30:.2f} GiB" if b else "-"  # noqa: E731
        sps = rl.get("seconds_per_step")
        rows.append(f"| {name} | {format_ci(r.get('judge_diff_vs_sft'))} | {format_ci(r.get('proxy_diff_vs_sft'))} | {win_s} "
                    f"| {r['eos_fraction']['rate']:.2f} | {r['length_mean']:.1f} | {format_ci(r.get('kl_to_sft'), '{:.2f}')} "
                    f"| {f'{sps:.1f}' if sps else '-'} | {gib(rl.get('compiled_peak_bytes'))} "
                    f"| {gib(rl.get('rss_peak_bytes_process'))} |")
    return "\n".join(rows)
