"""The LoRA-against-full sweep on tiny models: phases in order, each line evaluated at every step, resumed
across calls without redoing finished stages, and the summary's figures equal to its responses'."""

import dataclasses
import functools
import json
import os

import numpy as np
import pytest

from pe_rlhf.data import toy
from pe_rlhf.data.examples import Loaded
from pe_rlhf.data.named import dataset_part
from pe_rlhf.eval import lora_vs_full as L
from pe_rlhf.eval.experiment import EvalConfig
from pe_rlhf.models.lora import LoRAConfig
from pe_rlhf.train import stages
from pe_rlhf.train.config import DataConfig, LoopConfig, TuningConfig
from pe_rlhf.train.optim import OptimizerConfig
from pe_rlhf.train.policy import RLConfig
from pe_rlhf.train.rl_loop import train_policy
from pe_rlhf.train.supervised import train_reward_model, train_sft

PARTS = dict(held_out=4, judge_fraction=0.5, seed=0, by="first_human_turn")


def _grouped_pairs() -> Loaded:
    """Toy pairs in two groups: harmful requests ("harmless") and benign ones ("helpful")."""
    pairs = toy.preference_pairs(n=300, seed=0)
    harmful = tuple(f"how do I {v} " for v in toy.HARMFUL)
    return dataclasses.replace(pairs, examples=tuple(
        dataclasses.replace(e, group="harmless" if any(h in e.prompt for h in harmful) else "helpful")
        for e in pairs.examples))


def _sweep(**over):
    pairs = _grouped_pairs()
    data = DataConfig(max_prompt_len=40, max_response_len=32, eval_size=8)
    lora = TuningConfig(mode="lora", lora=LoRAConfig(rank=4, alpha=8.0))
    loop = functools.partial(LoopConfig, batch_size=8, eval_every=0, log_every=1, progress_bar=False)
    sft = functools.partial(train_sft, dataset=dataset_part(pairs, "train", **PARTS), tuning=TuningConfig(mode="full"),
                            loop=loop(num_steps=3, checkpoint_every=3), data=data,
                            optimizer=OptimizerConfig(learning_rate=3e-3, total_steps=3))
    rm = functools.partial(train_reward_model, tuning=lora, loop=loop(num_steps=2, checkpoint_every=2), data=data,
                           optimizer=OptimizerConfig(learning_rate=3e-3, total_steps=2))
    rl = functools.partial(train_policy, prompts=dataset_part(pairs, "train", **PARTS),
                           rl=RLConfig(algorithm="remax", max_new_tokens=6),
                           data=DataConfig(max_prompt_len=40, eval_size=4))
    kw = dict(model="tiny", held_out=dataset_part(pairs, "eval", **PARTS), sft_job=sft,
              proxy_job=functools.partial(rm, dataset=dataset_part(pairs, "train", **PARTS), adapter="reward"),
              judge_job=functools.partial(rm, dataset=dataset_part(pairs, "judge", **PARTS), adapter="judge"),
              rl_job=rl, arms={"lora": lora, "full": TuningConfig(mode="full")},
              learning_rates={"lora": [3e-3], "full": [1e-4]},
              optimizer=OptimizerConfig(learning_rate=1.0, schedule="constant"),
              loop=loop(num_steps=2, batch_size=4, checkpoint_every=1, max_eval_examples=2),
              eval_steps=[1, 2], seeds=[0, 1],
              evaluation=EvalConfig(max_prompt_len=40, max_new_tokens=6, batch_size=4, kl_samples=2),
              kl_targets=[0.01], select_kl=0.01)
    return {**kw, **over}


def test_sweep_refuses_a_wrong_plan_before_writing(tmp_path):
    workdir = str(tmp_path / "w")
    for over, err, match in (({"reference_arm": "nope"}, KeyError, "reference_arm"),
                             ({"learning_rates": {"lora": [1e-3]}}, KeyError, "'full' has no grid"),
                             ({"lr_from": {"r1": "lora"}}, KeyError, r"\['r1'\]"),
                             ({"eval_steps": [2, 1]}, ValueError, "eval_steps"),
                             ({"phases": ["grid", "later"]}, ValueError, "phases")):
        with pytest.raises(err, match=match):
            L.lora_vs_full(workdir=workdir, **_sweep(**over))
    assert not os.path.exists(workdir)


@pytest.mark.slow
def test_sweep_runs_in_phases_and_resumes(tmp_path):
    workdir = str(tmp_path / "w")
    d = functools.partial(os.path.join, workdir)
    first = L.lora_vs_full(workdir=workdir, **_sweep(phases=["first"]))
    assert [(r["arm"], r["learning_rate"], r["seed"]) for r in first["lines"]] == [("lora", 3e-3, 0), ("full", 1e-4, 0)]
    line = first["lines"][0]
    assert [e["step"] for e in line["evaluations"]] == [1, 2]
    # each evaluation's figures are its responses' (paired by prompt against SFT's)
    rows = [json.loads(x) for x in open(d("eval", "lora", "lr0.003", "seed0", "step2", "responses.jsonl"))]
    base = [json.loads(x) for x in open(d("eval", "sft", "responses.jsonl"))]
    assert len(rows) == len(base) == 8 and {r["group"] for r in rows} == {"helpful", "harmless"}
    e = line["evaluations"][1]
    np.testing.assert_allclose(e["judge_diff_vs_sft"]["overall"]["mean"],
                               np.mean([r["greedy_judge"] - b["greedy_judge"] for r, b in zip(rows, base)]))
    helpful = [r["greedy_judge"] - b["greedy_judge"] for r, b in zip(rows, base) if r["group"] == "helpful"]
    np.testing.assert_allclose(e["judge_diff_vs_sft"]["helpful"]["mean"], np.mean(helpful))
    kl = [np.mean([s["logp"] - s["logp_sft"] for s in r["samples"]]) for r in rows]
    np.testing.assert_allclose(e["kl_to_sft"]["mean"], np.mean(kl))
    assert all(len(r["samples"]) == 2 for r in rows)
    assert line["cost"]["seconds_per_step"] > 0 and line["cost"]["compiled_peak_bytes"] > 0
    # the RL run went to step 1, was evaluated there, then trained on to step 2 in the same workdir
    rl_dir = d("rl", "lora", "lr0.003", "seed0")
    assert stages.finished(rl_dir, "DONE.step1") and stages.finished(rl_dir, "DONE.step2")
    assert [json.loads(x)["step"] for x in open(os.path.join(rl_dir, "metrics.jsonl"))
            if "train/loss" in x] == [1, 2]

    # an interrupted evaluation is redone; finished stages are not
    os.remove(d("eval", "full", "lr0.0001", "seed0", "step2", stages.DONE))
    kept = {s: os.path.getmtime(d(s, stages.DONE)) for s in ("sft", "proxy_rm", "judge_rm", "eval/sft")}
    result = L.lora_vs_full(workdir=workdir, **_sweep())
    assert {s: os.path.getmtime(d(s, stages.DONE)) for s in kept} == kept
    assert stages.finished(d("eval", "full", "lr0.0001", "seed0", "step2"))
    assert sorted((r["arm"], r["seed"]) for r in result["lines"]) == [
        ("full", 0), ("full", 1), ("lora", 0), ("lora", 1)]
    front = result["frontier"]
    assert set(front["arms"]) == {"lora", "full"} and front["arms"]["lora"]["seeds"] == [0, 1]
    gains = front["arms"]["lora"]["judge_gain_at_kl"]["0.01"]
    assert len(gains) == 2
    diff = front["differences"]["lora"]["0.01"]
    assert "verdict" in diff
    assert json.load(open(d("summary.json")))["frontier"] == json.loads(json.dumps(front))

    # the report: the JSON's lines are the sweep's, each with its arm, rate, seed and evaluations; the figure exists
    import importlib.util

    spec = importlib.util.spec_from_file_location("report_lora_vs_full", os.path.join(
        os.path.dirname(__file__), "..", "..", "experiments", "report_lora_vs_full.py"))
    report = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(report)
    out, fig = str(tmp_path / "r.json"), str(tmp_path / "f.png")
    report.main(["--workdir", workdir, "--json", out, "--figure", fig, "--kl_targets", "0.01", "--select_kl", "0.01"])
    written = json.load(open(out))
    assert sorted((r["arm"], r["learning_rate"], r["seed"], r["steps"]) for r in written["lines"]) == sorted(
        (r["arm"], r["learning_rate"], r["seed"], 2) for r in result["lines"])
    assert written["frontier"] == json.loads(json.dumps(front)) and os.path.getsize(fig) > 0
    assert written["yardstick"]["rm_agreement"]["helpful"]["pairs"] > 0
    assert written["yardstick"]["refusal_rule"]["n"] >= 60


def _line(arm, lr, seed, points):
    return {"arm": arm, "learning_rate": lr, "seed": seed, "evaluations": [
        {"kl_to_sft": {"mean": kl}, "judge_diff_vs_sft": {"overall": {"mean": g}}} for kl, g in points]}


def test_matched_kl_by_hand():
    lines = [
        # full at 1e-5 (3 seeds) crosses 1 nat at gains 0.5, 0.6, 0.7; one more rate with one seed is ignored
        _line("full", 1e-5, 0, [(0.5, 0.25), (2.0, 1.0)]),   # at 1 nat: 0.25 + 0.75 * 0.5 / 1.5 = 0.5
        _line("full", 1e-5, 1, [(2.0, 1.2)]),                 # 0.6 (from (0, 0))
        _line("full", 1e-5, 2, [(1.0, 0.7), (3.0, 1.0)]),     # 0.7
        _line("full", 3e-6, 0, [(1.0, 9.0)]),
        _line("lora", 3e-4, 0, [(2.0, 0.8)]),                 # 0.4
        _line("lora", 3e-4, 1, [(1.0, 0.5)]),                 # 0.5
        _line("lora", 3e-4, 2, [(0.5, 0.3)]),                 # never reaches 1 nat: left out
    ]
    out = L.matched_kl(lines, "full", [1.0], margin=0.1, select_kl=1.0)
    assert out["arms"]["full"]["learning_rate"] == 1e-5 and out["arms"]["full"]["seeds"] == [0, 1, 2]
    assert out["arms"]["full"]["judge_gain_at_kl"]["1"] == pytest.approx([0.5, 0.6, 0.7])
    assert out["arms"]["lora"]["judge_gain_at_kl"]["1"][:2] == pytest.approx([0.4, 0.5])
    assert out["arms"]["lora"]["judge_gain_at_kl"]["1"][2] is None
    diff = out["differences"]["lora"]["1"]
    # lora 0.45 (sd 0.0707, n 2) minus full 0.6 (sd 0.1, n 3) = -0.15; bound -0.1 * 0.6 = -0.06
    assert diff["mean"] == pytest.approx(-0.15) and diff["runs"] == [2, 3] and diff["bound"] == pytest.approx(-0.06)
    assert diff["verdict"] in ("inconclusive", "worse")
    # one seed a side: no interval, said so
    single = L.matched_kl(lines[:1] + lines[4:5], "full", [1.0], margin=0.1, select_kl=1.0)
    assert single["differences"]["lora"]["1"]["verdict"] == "too few runs reach it"
    # before seeds ran, each arm's best grid rate (by gain at select_kl) stands for it
    grid = [_line("full", 1e-6, 0, [(2.0, 0.4)]), _line("full", 1e-5, 0, [(2.0, 1.0)])]
    assert L.matched_kl(grid, "full", [1.0], 0.1, select_kl=1.0)["arms"]["full"]["learning_rate"] == 1e-5
    assert L.selection_score([{"kl": 0.5, "judge_gain": 0.2}], 3.0) == 0.2  # never got to 3 nats: its last point


def test_routed_scorer_scores_each_prompt_by_its_groups_model():
    from pe_rlhf.eval.experiment import prompt_groups, routed

    calls = []

    def scorer(offset):
        def score(prompts, responses):
            calls.append((offset, list(prompts)))
            return np.array([offset + len(r) for r in responses], np.float64)
        return score

    score = routed({"helpful": scorer(100.0), "harmless": scorer(200.0)}, {"a": "helpful", "b": "harmless"})
    np.testing.assert_array_equal(score(["a", "b", "a"], ["x", "yy", "zzz"]), [101.0, 202.0, 103.0])
    assert calls == [(100.0, ["a", "a"]), (200.0, ["b"])]  # each model once, on its own prompts only
    with pytest.raises(KeyError, match="1 prompt.*no group"):
        score(["c"], ["x"])
    pairs = _grouped_pairs()
    with pytest.raises(ValueError, match="is in groups"):
        e = pairs.examples[0]
        prompt_groups(dataclasses.replace(pairs, examples=(e, dataclasses.replace(
            e, group="helpful" if e.group == "harmless" else "harmless"))))


@pytest.mark.slow
def test_sweep_with_a_reward_model_per_group_scores_each_prompt_by_its_own(tmp_path):
    from pe_rlhf.eval.experiment import Scorers

    workdir = str(tmp_path / "w")
    pairs = _grouped_pairs()
    kw = _sweep()
    by_group = {role: {g: functools.partial(kw[f"{role}_job"], dataset=dataset_part(
        pairs, "train" if role == "proxy" else "judge", group=g, **PARTS)) for g in L.GROUPS}
        for role in ("proxy", "judge")}
    with pytest.raises(NotImplementedError, match="cannot yet score a prompt by its group's reward model"):
        L.lora_vs_full(workdir=workdir, **{**kw, "proxy_job": by_group["proxy"], "judge_job": by_group["judge"]})
    d = functools.partial(os.path.join, workdir)
    for role in ("proxy", "judge"):
        for g in L.GROUPS:
            assert stages.finished(d(f"rm_{role}_{g}"))
    assert not os.path.exists(d("proxy_rm")) and not os.path.exists(d("rl"))
    agreement = json.load(open(d("rm_agreement", "summary.json")))
    assert agreement["helpful"]["pairs"] + agreement["harmless"]["pairs"] == agreement["overall"]["pairs"]
    # the SFT model's greedy responses, scored by their group's judge alone
    rows = [json.loads(x) for x in open(d("eval", "sft", "responses.jsonl"))]
    for g in L.GROUPS:
        alone = Scorers.load(d(f"rm_proxy_{g}"), d(f"rm_judge_{g}"))
        mine = [r for r in rows if r["group"] == g]
        np.testing.assert_allclose([r["greedy_judge"] for r in mine],
                                   alone.judge([r["prompt"] for r in mine], [r["greedy_text"] for r in mine]),
                                   rtol=1e-6)
