"""judge_policies end to end on the benchmark's SFT and RL policies: a rule judge, a reward-model judge,
a policy against itself under a language-model judge, and the gin config through run.py."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from pe_rlhf.data import toy
from pe_rlhf.data.examples import Loaded, PromptResponse
from pe_rlhf.eval import judge as J
from pe_rlhf.eval import winrate as W
from pe_rlhf.models.lora import LoRAConfig

pytestmark = pytest.mark.slow  # every test reads the gold benchmark's run (a session fixture that trains it)

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# The RL runs' adapter options (GoldBenchmarkConfig's), for run_info.json files that do not record them.
LORA = LoRAConfig(rank=8, alpha=16.0)
GEN = W.GenerationConfig(max_prompt_len=48, max_new_tokens=40, temperature=1.0, batch_size=32, seed=3)


def _dirs(gold_run):
    workdir, _ = gold_run
    return (os.path.join(workdir, "rl_remax_lora_rm-lora"), os.path.join(workdir, "sft"),
            os.path.join(workdir, "rm_lora"))


def _prompts(n=96):
    texts = sorted({toy.prompt_text(v, o) for v in toy.HARMFUL + toy.BENIGN for o in toy.OBJECTS})[:n]
    return Loaded(tuple(PromptResponse(t, "") for t in texts), source="toy prompts")


def _responses(source, texts):
    model, tok, _ = W.load_policy(source, lora_config=LORA)
    return [r[0] for r in W.generate(model, tok, texts, GEN)]


def test_rule_judge_counts_match_the_rule(gold_run, tmp_path):
    rl, sft, _ = _dirs(gold_run)
    prompts = _prompts()
    s = W.judge_policies(workdir=str(tmp_path), policy=rl, baseline=sft, prompts=prompts, judge=toy.gold_reward,
                         generation=GEN, judge_config=J.JudgeConfig(harmless_threshold=0.5), lora_config=LORA)
    texts = [e.prompt for e in prompts.examples]
    g_pol = np.array([toy.gold_reward(p, r) for p, r in zip(texts, _responses(rl, texts))])
    g_base = np.array([toy.gold_reward(p, r) for p, r in zip(texts, _responses(sft, texts))])
    wins, losses = int((g_pol > g_base).sum()), int((g_pol < g_base).sum())
    assert (s["wins"], s["losses"], s["ties"]) == (wins, losses, len(texts) - wins - losses)
    assert s["win_rate_ci"] == pytest.approx(list(J.wilson_interval(wins, len(texts))))
    assert s["harmless_rate_policy"] == pytest.approx(g_pol.mean())
    assert s["harmless_rate_baseline"] == pytest.approx(g_base.mean())
    assert s["first_position_rate"] == 0.0  # a reward judge has no position bias
    assert wins > losses  # sampled at T=1, the RL policy follows the rule more often than SFT
    rows = [json.loads(line) for line in open(tmp_path / "judgements.jsonl")]
    assert [r["prompt"] for r in rows] == texts
    assert sum(r["outcome"] == "win" for r in rows) == wins
    assert json.load(open(tmp_path / "summary.json"))["wins"] == wins


def test_reward_model_judge_prefers_the_higher_reward(gold_run, tmp_path):
    rl, sft, rm_dir = _dirs(gold_run)
    prompts = _prompts(24)
    s = W.judge_policies(workdir=str(tmp_path), policy=rl, baseline=sft, prompts=prompts, judge=rm_dir,
                         generation=GEN, harmless=False, lora_config=LORA)
    texts = [e.prompt for e in prompts.examples]
    rm, tok, _ = W.load_reward_model(rm_dir)
    score = J.reward_model_scorer(rm, tok)
    diff = score(texts, _responses(rl, texts)) - score(texts, _responses(sft, texts))
    assert (s["wins"], s["losses"]) == (int((diff > 0).sum()), int((diff < 0).sum()))
    rows = [json.loads(line) for line in open(tmp_path / "judgements.jsonl")]
    np.testing.assert_allclose([r["margin_policy_first"] for r in rows], diff, atol=1e-4)
    np.testing.assert_allclose([r["margin_policy_second"] for r in rows], -diff, atol=1e-4)
    # the soft preference of a reward judge is the mean reward difference, with a normal interval
    assert s["preference_margin_mean"] == pytest.approx(diff.mean(), abs=1e-4)
    half = 1.959963984540054 * diff.std(ddof=1) / np.sqrt(len(diff))
    np.testing.assert_allclose(s["preference_margin_ci"], [diff.mean() - half, diff.mean() + half], atol=1e-4)


def test_a_policy_against_itself_only_ties_even_under_a_biased_lm_judge(gold_run, tmp_path):
    _, sft, _ = _dirs(gold_run)
    s = W.judge_policies(workdir=str(tmp_path), policy=sft, baseline=sft, prompts=_prompts(12), judge=sft,
                         generation=W.GenerationConfig(max_prompt_len=48, max_new_tokens=40), harmless=True)
    assert s["judge"].startswith("language model")
    assert (s["wins"], s["ties"], s["losses"]) == (0, 12, 0)
    rows = [json.loads(line) for line in open(tmp_path / "judgements.jsonl")]
    # the same two texts in both slots: the judge's margin is the same in both orders
    for r in rows:
        assert r["policy"] == r["baseline"] and r["margin_policy_first"] == pytest.approx(r["margin_policy_second"])
    first = np.mean([r["margin_policy_first"] > 0 for r in rows])
    assert s["first_position_rate"] == pytest.approx(first)
    assert s["harmless_rate_policy"] == s["harmless_rate_baseline"]
    # position bias cancels in the soft preference: the same text against itself leans neither way
    assert s["preference_margin_mean"] == pytest.approx(0.0, abs=1e-5)
    assert s["harmless_margin_diff_mean"] == 0.0
    h = [r["harmless_margin_policy"] for r in rows]
    assert s["harmless_margin_mean_policy"] == pytest.approx(np.mean(h))


def test_judge_config_runs_through_run_py(gold_run, tmp_path):
    rl, sft, _ = _dirs(gold_run)
    config = os.path.join(REPO, "experiments", "configs", "judge_quickstart.gin")
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO)
    proc = subprocess.run(
        [sys.executable, os.path.join(REPO, "experiments", "run.py"), "--gin_file", config,
         "--gin_param", f'judge_policies.policy="{rl}"', "--gin_param", f'judge_policies.baseline="{sft}"',
         "--gin_param", "judge_policies.max_prompts=16", "--workdir", str(tmp_path)],
        capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    s = json.load(open(tmp_path / "summary.json"))
    assert s["comparisons"] == 16 and s["wins"] + s["ties"] + s["losses"] == 16
    assert s["judge"] == "rule gold_reward"
    assert len(open(tmp_path / "judgements.jsonl").readlines()) == 16
    assert os.path.exists(tmp_path / "operative_config.gin")
