"""The real-model experiment's driver on tiny models: stages skipped when done, resumed when not,
a stage killed between its last checkpoint and its export repaired, and the judge kept independent."""

import functools
import json
import os

import numpy as np
import pytest

from pe_rlhf.data import toy
from pe_rlhf.data.named import dataset_part
from pe_rlhf.eval import experiment as E
from pe_rlhf.models.lora import LoRAConfig
from pe_rlhf.train import stages
from pe_rlhf.train.config import DataConfig, LoopConfig, TuningConfig
from pe_rlhf.train.optim import OptimizerConfig
from pe_rlhf.train.policy import RLConfig
from pe_rlhf.train.rl_loop import train_policy
from pe_rlhf.train.supervised import train_reward_model, train_sft

PARTS = dict(held_out=8, judge_fraction=0.5, seed=0)


# -- the three parts ---------------------------------------------------------------------------------
def test_dataset_parts_are_prompt_disjoint_and_cover_the_data():
    pairs = toy.preference_pairs(n=300, seed=0)
    parts = {p: dataset_part(pairs, p, **PARTS) for p in ("eval", "train", "judge")}
    prompts = {p: {e.prompt for e in part.examples} for p, part in parts.items()}
    assert len(prompts["eval"]) == 8
    assert not prompts["eval"] & prompts["train"] and not prompts["eval"] & prompts["judge"]
    assert not prompts["train"] & prompts["judge"]  # the judge never sees a prompt of the proxy, SFT or RL
    assert sum(len(p) for p in parts.values()) == len(pairs)
    n_rest = len({e.prompt for e in pairs.examples}) - 8
    assert len(prompts["judge"]) == round(0.5 * n_rest)
    again = dataset_part(pairs, "judge", **PARTS)
    assert again.examples == parts["judge"].examples  # the same split on every call
    with pytest.raises(ValueError, match="part='dev'"):
        dataset_part(pairs, "dev", **PARTS)


# -- run_stage ------------------------------------------------------------------------------------------
def test_run_stage_skips_finished_and_reruns_unfinished(tmp_path):
    calls = []

    def job(workdir, fail=False):
        calls.append(workdir)
        with open(os.path.join(workdir, "summary.json"), "w") as f:
            json.dump({"x": 1.0}, f)
        if fail:
            raise RuntimeError("killed")
        os.makedirs(os.path.join(workdir, "export"), exist_ok=True)
        open(os.path.join(workdir, "export", "w"), "w").close()
        return {"x": float("nan"), "y": 2}

    d = str(tmp_path / "s")
    with pytest.raises(RuntimeError):
        stages.run_stage("s", d, job, outputs=("summary.json", "export/w"), fail=True)
    assert stages.finished(d) is None  # summary.json alone does not finish a stage
    rec = stages.run_stage("s", d, job, outputs=("summary.json", "export/w"))
    assert rec["summary"] == {"x": None, "y": 2}  # strict JSON: NaN is written as null
    assert json.load(open(os.path.join(d, stages.DONE)))["summary"]["y"] == 2
    assert len(calls) == 2
    assert stages.run_stage("s", d, job, outputs=("summary.json", "export/w"))["summary"]["y"] == 2
    assert len(calls) == 2  # skipped
    os.remove(os.path.join(d, "export", "w"))  # an output lost after the stage finished
    stages.run_stage("s", d, job, outputs=("summary.json", "export/w"))
    assert len(calls) == 3

    def forgetful(workdir):
        return {}

    with pytest.raises(stages.StageError, match="summary.json missing"):
        stages.run_stage("f", str(tmp_path / "f"), forgetful)


# -- the whole experiment on a tiny model ----------------------------------------------------------------
def _report_module():
    """experiments/report_experiment.py, imported from its path."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "report_experiment", os.path.join(os.path.dirname(__file__), "..", "..", "experiments", "report_experiment.py"))
    report = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(report)
    return report


def _jobs():
    data = DataConfig(max_prompt_len=40, max_response_len=32, eval_size=8)
    lora = TuningConfig(mode="lora", lora=LoRAConfig(rank=4, alpha=8.0))
    loop = functools.partial(LoopConfig, batch_size=8, eval_every=0, log_every=1, progress_bar=False)
    pairs = toy.preference_pairs(n=300, seed=0)
    sft = functools.partial(train_sft, dataset=dataset_part(pairs, "train", **PARTS),
                            tuning=TuningConfig(mode="full"), loop=loop(num_steps=4, checkpoint_every=2),
                            data=data, optimizer=OptimizerConfig(learning_rate=3e-3, total_steps=4))
    rm = functools.partial(train_reward_model, tuning=lora, loop=loop(num_steps=3, checkpoint_every=3), data=data,
                           optimizer=OptimizerConfig(learning_rate=3e-3, total_steps=3))
    rl = functools.partial(train_policy, prompts=dataset_part(pairs, "train", **PARTS), tuning=lora,
                           rl=RLConfig(algorithm="remax", max_new_tokens=8),
                           loop=loop(num_steps=2, batch_size=4, checkpoint_every=1, max_eval_examples=4,
                                     eval_every=1),
                           data=DataConfig(max_prompt_len=40, eval_size=4),
                           optimizer=OptimizerConfig(learning_rate=1e-3, schedule="constant"))
    return dict(
        model="tiny", held_out=dataset_part(pairs, "eval", **PARTS), sft_job=sft,
        proxy_job=functools.partial(rm, dataset=dataset_part(pairs, "train", **PARTS), adapter="reward"),
        judge_job=functools.partial(rm, dataset=dataset_part(pairs, "judge", **PARTS), adapter="judge"),
        rl_jobs={"lora_remax": rl},
        evaluation=E.EvalConfig(max_prompt_len=40, max_new_tokens=8, batch_size=4, kl_samples=1))


@pytest.mark.slow
def test_experiment_runs_resumes_and_repairs_a_half_written_stage(tmp_path):
    workdir = str(tmp_path / "exp")
    result = E.rlhf_experiment(workdir=workdir, **_jobs())
    row = result["lines"]["lora_remax"]
    assert set(result["lines"]) == {"sft", "lora_remax"}
    for key in ("judge_diff_vs_sft", "proxy_diff_vs_sft", "kl_to_sft"):
        lo, hi = row[key]["ci"]
        assert lo <= row[key]["mean"] <= hi and row[key]["n"] == 8
    # the paired differences are exactly the per-prompt judge scores minus SFT's
    ours = [json.loads(line) for line in open(os.path.join(workdir, "eval", "lora_remax", "responses.jsonl"))]
    base = [json.loads(line) for line in open(os.path.join(workdir, "eval", "sft", "responses.jsonl"))]
    np.testing.assert_allclose(row["judge_diff_vs_sft"]["mean"],
                               np.mean([a["judge"] - b["judge"] for a, b in zip(ours, base)]), rtol=1e-9)
    assert row["judge_win_rate"]["wins"] == sum(a["judge"] > b["judge"] for a, b in zip(ours, base))
    assert [c["step"] for c in row["curve"]] == [0, 1, 2]
    agreement = result["stages"]["rm_agreement"]["summary"]
    held = dataset_part(toy.preference_pairs(n=300, seed=0), "eval", **PARTS)
    assert agreement["pairs"] == len(held) and 0.0 <= agreement["agreement"] <= 1.0
    assert json.load(open(os.path.join(workdir, "summary.json")))["lines"]["lora_remax"]["rl"]["steps"] == 2

    # a kill after SFT's last checkpoint and summary but before its export: the rerun repairs it
    sft_dir = os.path.join(workdir, "sft")
    mtimes = {s: os.path.getmtime(os.path.join(workdir, s, stages.DONE)) for s in ("proxy_rm", "judge_rm")}
    os.remove(os.path.join(sft_dir, stages.DONE))
    for name in os.listdir(os.path.join(sft_dir, "export")):
        os.remove(os.path.join(sft_dir, "export", name))
    os.rmdir(os.path.join(sft_dir, "export"))
    steps_logged = open(os.path.join(sft_dir, "metrics.jsonl")).read().count('"train/loss"')
    again = E.rlhf_experiment(workdir=workdir, **_jobs())
    assert os.path.isfile(os.path.join(sft_dir, "export", "model.safetensors"))
    assert stages.finished(sft_dir) is not None
    # resumed at its last checkpoint (step 4): no training step ran again
    assert open(os.path.join(sft_dir, "metrics.jsonl")).read().count('"train/loss"') == steps_logged
    # the later stages were finished and stay as they were
    assert {s: os.path.getmtime(os.path.join(workdir, s, stages.DONE)) for s in mtimes} == mtimes
    assert again["lines"]["lora_remax"]["judge_diff_vs_sft"] == row["judge_diff_vs_sft"]

    # the report: the compact JSON holds the same figures as the workdir's summary, and both plots exist
    report = _report_module()
    out = str(tmp_path / "hh.json")
    report.main(["--workdir", workdir, "--json", out, "--figures", str(tmp_path / "fig"), "--name", "x"])
    compact = json.load(open(out))
    assert compact["lines"]["lora_remax"]["judge_diff_vs_sft"] == row["judge_diff_vs_sft"]
    assert compact["lines"]["lora_remax"]["steps"] == 2 and compact["lines"]["lora_remax"]["seconds_per_step"] > 0
    assert compact["stages"]["rm_agreement"]["pairs"] == len(held)
    assert sorted(os.listdir(tmp_path / "fig")) == ["x_judge_vs_kl.png", "x_reward_vs_step.png"]
    assert compact["lines"]["lora_remax"]["variety"]["responses"] == row["prompts"]
    assert report.response_variety(["I\u2019m sorry, no.", "I'm  sorry, no.", "Sure thing"]) == {
        "responses": 3, "distinct": 2, "top_opening": "I'm sorry,", "top_opening_share": 2 / 3}


@pytest.mark.slow
def test_lines_against_the_proxy_ensemble_and_warm(tmp_path):
    from pe_rlhf.models.heads import EnsembleRule
    from pe_rlhf.train.ensemble import train_reward_ensemble
    from pe_rlhf.train.records import read_run_info

    jobs = _jobs()
    rm = jobs["proxy_job"]
    pairs = toy.preference_pairs(n=300, seed=0)
    jobs["ensemble_job"] = functools.partial(
        train_reward_ensemble, members=2, dataset=dataset_part(pairs, "train", **PARTS), tuning=rm.keywords["tuning"],
        loop=rm.keywords["loop"], data=rm.keywords["data"], optimizer=rm.keywords["optimizer"])
    rl = jobs["rl_jobs"]["lora_remax"]
    jobs["rl_jobs"] = {"lora_remax": rl, "ens": functools.partial(rl, reward_rule=EnsembleRule("min")), "warm": rl}
    workdir = str(tmp_path / "exp")

    # refused before anything is written: an unknown reward, a line that is not one, no ensemble job
    for bad, match in (({"ens": "judge"}, "line_rewards"), ({"other": "warm"}, "line_rewards")):
        with pytest.raises(KeyError, match=match):
            E.rlhf_experiment(workdir=workdir, **jobs, line_rewards=bad)
    with pytest.raises(ValueError, match=r"lines \['warm'\] optimise the ensemble or WARM, but .*ensemble_job"):
        E.rlhf_experiment(workdir=workdir, **{**jobs, "ensemble_job": None}, line_rewards={"warm": "warm"},
                          lines=["warm"])
    assert not os.path.exists(workdir)

    # the proxy alone trains no ensemble
    E.rlhf_experiment(workdir=workdir, **jobs, line_rewards={"ens": "ensemble", "warm": "warm"}, lines=["lora_remax"])
    assert not os.path.exists(os.path.join(workdir, "proxy_ensemble"))
    result = E.rlhf_experiment(workdir=workdir, **jobs, line_rewards={"ens": "ensemble", "warm": "warm"})
    ens = os.path.join(workdir, "proxy_ensemble")
    assert read_run_info(ens)["members"] == ["../proxy_rm", "members/1"]  # the proxy is member 0
    proxy = json.load(open(os.path.join(workdir, "proxy_rm", "summary.json")))
    members = result["stages"]["proxy_ensemble"]["summary"]["members"]
    assert members[0]["pairwise_accuracy"] == pytest.approx(proxy["eval/pairwise_accuracy"])
    rows = result["lines"]
    assert rows["ens"]["rl"]["reward_model"] == ens
    assert rows["ens"]["rl"]["reward_rule"] == {"rule": "min", "penalty": 1.0, "standardise": True}
    assert rows["warm"]["rl"]["reward_model"] == os.path.join(ens, "warm") and rows["warm"]["rl"]["reward_rule"] is None
    assert rows["lora_remax"]["rl"]["reward_model"] == os.path.join(workdir, "proxy_rm")
    # every line is evaluated by the one proxy and the judge; a line with another reward has its
    # in-training curve scored by the single proxy too
    for name in ("ens", "warm"):
        assert [c["step"] for c in rows[name]["curve"]] == [0, 1, 2]
        assert all({"proxy", "judge", "single_proxy"} <= set(c) for c in rows[name]["curve"])
    assert "single_proxy" not in rows["lora_remax"]["curve"][0]

    # the report names each line's reward and plots the over-optimisation lines on their own
    report = _report_module()
    out = str(tmp_path / "hh.json")
    report.main(["--workdir", workdir, "--json", out, "--figures", str(tmp_path / "fig"), "--name", "x"])
    compact = json.load(open(out))
    assert {n: compact["lines"][n].get("reward") for n in ("lora_remax", "ens", "warm")} == {
        "lora_remax": "proxy", "ens": "ensemble min (standardised)", "warm": "WARM"}
    ens_stage = compact["stages"]["proxy_ensemble"]
    assert ens_stage["members"] == [m["pairwise_accuracy"] for m in members]
    assert {"ensemble_mean", "ensemble_min", "warm"} <= set(ens_stage)
    assert report.overoptimisation_lines(result) == ["ens", "lora_remax", "warm"]
    assert sorted(os.listdir(tmp_path / "fig")) == ["x_judge_vs_kl.png", "x_overopt.png", "x_reward_vs_step.png"]
    # each line against the proxy line on the same prompts, paired, by hand from the responses
    read = lambda line: {r["prompt"]: r["judge"] for r in map(json.loads, open(
        os.path.join(workdir, "eval", line, "responses.jsonl")))}
    base = read("lora_remax")
    assert set(compact["paired_vs_proxy_line"]) == {"ens", "warm"}
    for name in ("ens", "warm"):
        d = np.array([v - base[p] for p, v in read(name).items()])
        got = compact["paired_vs_proxy_line"][name]
        assert got["vs"] == "lora_remax" and got["n"] == len(d) == len(base)
        half = 1.959963984540054 * d.std(ddof=1) / np.sqrt(len(d))
        assert got["mean"] == pytest.approx(d.mean()) and got["ci"] == pytest.approx([d.mean() - half, d.mean() + half])
        assert (got["wins"], got["ties"], got["losses"]) == ((d > 0).sum(), (d == 0).sum(), (d < 0).sum())


# -- the split by first human turn (HH helpful + harmless) ------------------------------------------------
def test_first_human_turn_keeps_a_conversation_at_every_depth_in_one_part():
    import dataclasses

    from pe_rlhf.data.examples import Loaded, PreferenceExample
    from pe_rlhf.data.sources import first_human_turn

    deep = "\n\nHuman: How do I bake bread?\n\nAssistant: Flour, water, yeast.\n\nHuman: How long?\n\nAssistant:"
    assert first_human_turn(deep) == "How do I bake bread?"
    assert first_human_turn("\n\nHuman: How do I bake bread?\n\nAssistant:") == "How do I bake bread?"
    # 40 conversations, each at two depths (the shallow prompt a prefix of the deep one), in two groups
    examples = []
    for i in range(40):
        shallow = f"\n\nHuman: question {i}?\n\nAssistant:"
        for prompt in (shallow, shallow + f" answer {i}.\n\nHuman: and then?\n\nAssistant:"):
            examples.append(PreferenceExample(prompt, " good", " bad", group="helpful" if i % 2 else "harmless"))
    data = Loaded(tuple(examples), "two-depth conversations")
    parts = {p: dataset_part(data, p, held_out=5, judge_fraction=0.5, seed=3, by="first_human_turn")
             for p in ("eval", "judge", "train")}
    turns = {p: {first_human_turn(e.prompt) for e in part.examples} for p, part in parts.items()}
    assert not (turns["eval"] & turns["judge"] or turns["eval"] & turns["train"] or turns["judge"] & turns["train"])
    assert sum(len(p) for p in parts.values()) == len(examples)
    held = parts["eval"].examples
    assert {g: sum(e.group == g for e in held) for g in ("helpful", "harmless")} == {"helpful": 10, "harmless": 10}
    # by exact prompt, conversations are split across depths: the first-turn split exists for this
    by_prompt = {p: {e.prompt for e in dataset_part(data, p, held_out=10, seed=3).examples}
                 for p in ("eval", "train")}
    assert any(a.startswith(b) or b.startswith(a) for a in by_prompt["eval"] for b in by_prompt["train"])
    with pytest.raises(ValueError, match="cannot hold out 20 conversations per group"):
        dataset_part(data, "eval", held_out=20, by="first_human_turn")
    with pytest.raises(ValueError, match="by='turn'"):
        dataset_part(data, "eval", by="turn")
    assert dataclasses.replace(examples[0]).group == "harmless"
    # one group of a part: the same split, that group's items only
    kw = dict(held_out=5, judge_fraction=0.5, seed=3, by="first_human_turn")
    for p, part in parts.items():
        helpful = dataset_part(data, p, group="helpful", **kw)
        assert helpful.examples == tuple(e for e in part.examples if e.group == "helpful")
        assert helpful.source.endswith(", helpful only]")
    assert len(dataset_part(data, "eval", group="harmless", **kw).examples) == 10
    with pytest.raises(ValueError, match="group='helpfull'.*'harmless', 'helpful'"):
        dataset_part(data, "eval", group="helpfull", **kw)


def test_hh_helpful_and_harmless_split_by_first_turn_shares_no_conversation():
    from pe_rlhf.data.named import named_dataset
    from pe_rlhf.data.sources import first_human_turn

    data = named_dataset("hh")
    assert {g: sum(e.group == g for e in data.examples) for g in ("helpful", "harmless")} == {
        "helpful": 2052, "harmless": 1800}
    kw = dict(held_out=100, judge_fraction=0.5, seed=0, by="first_human_turn")
    parts = {p: dataset_part(data, p, **kw) for p in ("eval", "judge", "train")}
    held = {e.prompt for e in parts["eval"].examples}
    assert sum(e.group == "helpful" for e in parts["eval"].examples) >= 100
    assert sum(e.group == "harmless" for e in parts["eval"].examples) >= 100
    others = {e.prompt for p in ("judge", "train") for e in parts[p].examples}
    # no held-out conversation is a prefix or an extension of one another part holds (each prompt ends at a
    # turn boundary, "Assistant:"), nor opens with the same human turn
    for a in held:
        for b in others:
            assert not (b.startswith(a) or a.startswith(b)), (a, b)
    assert not {first_human_turn(p) for p in held} & {first_human_turn(p) for p in others}
    # by exact prompt (the harmless-only experiment's split), some would be
    by_prompt = {p: {e.prompt for e in dataset_part(data, p, held_out=200, seed=0).examples} for p in ("eval", "train")}
    assert any(b.startswith(a) or a.startswith(b) for a in by_prompt["eval"] for b in by_prompt["train"])
    assert parts["judge"].examples == dataset_part(data, "judge", **kw).examples  # the same on every call
