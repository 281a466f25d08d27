"""experiments/report.py: figures, report.md and report.json from a hand-made workdir (numbers known)
and from the benchmark's real one."""

import importlib.util
import json
import os

import pytest

from pe_rlhf.data import toy

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PNG = b"\x89PNG\r\n\x1a\n"


def _report_module():
    spec = importlib.util.spec_from_file_location("report", os.path.join(REPO, "experiments", "report.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _jsonl(path, rows):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)


def _json(path, obj):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(obj, f)


@pytest.fixture
def handmade(tmp_path):
    """A pipeline-like workdir: an RL run, a reward-model run and a judged comparison."""
    harmful, benign = toy.prompt_text("steal", "a car"), toy.prompt_text("bake", "a cake")
    refuse, comply = toy.REFUSAL, toy.COMPLY
    rl = tmp_path / "rl"
    _json(str(rl / "run_info.json"), {"stage": "rl", "algorithm": "remax"})
    _jsonl(str(rl / "metrics.jsonl"), [
        {"step": 10, "train/reward_mean": 0.5, "train/kl": 0.01, "train/loss": 1.0},
        {"step": 20, "train/reward_mean": 1.5, "train/kl": None, "train/loss": 0.5},  # non-finite logged as null
        {"step": 20, "eval/reward": 2.0}])
    # gold: step 0 one of two right (0.5), step 20 both right (1.0), step 5 none right (0.0)
    _jsonl(str(rl / "samples_0.jsonl"), [{"prompt": harmful, "response": comply, "reward": 0.1},
                                        {"prompt": benign, "response": comply, "reward": 0.2}])
    _jsonl(str(rl / "samples_5.jsonl"), [{"prompt": harmful, "response": comply, "reward": 0.0},
                                        {"prompt": benign, "response": refuse, "reward": 0.0}])
    _jsonl(str(rl / "samples_20.jsonl"), [{"prompt": harmful, "response": refuse, "reward": 0.9},
                                         {"prompt": benign, "response": comply, "reward": 0.8}])
    _json(str(rl / "summary.json"), {"step": 20, "eval/reward": 2.0})
    rm = tmp_path / "reward_model"
    _json(str(rm / "run_info.json"), {"stage": "reward_model"})
    _jsonl(str(rm / "metrics.jsonl"), [{"step": 5, "train/loss": 0.69, "train/accuracy": 0.5},
                                       {"step": 10, "train/loss": 0.3, "train/accuracy": 0.9},
                                       {"step": 10, "eval/pairwise_accuracy": 0.95}])
    judged = tmp_path / "judged"
    _jsonl(str(judged / "judgements.jsonl"), [{"prompt": harmful, "policy": refuse, "baseline": comply,
                                               "outcome": "win"}])
    _json(str(judged / "summary.json"), {"policy": "rl", "baseline": "sft", "judge": "rule", "comparisons": 10,
                                         "wins": 6, "ties": 3, "losses": 1, "win_rate": 0.6, "tie_rate": 0.3,
                                         "loss_rate": 0.1, "win_rate_ci": [0.31, 0.83], "ci_method": "wilson",
                                         "first_position_rate": 0.2, "harmless_rate_policy": 0.9,
                                         "harmless_rate_baseline": 0.5})
    _json(str(tmp_path / "summary.json"), {"gold_sft": 0.5, "gold_rl": 1.0})
    return tmp_path


def test_report_on_a_handmade_workdir(handmade):
    report = _report_module()
    data = report.main(["--workdir", str(handmade)])
    out = handmade / "report"
    for name in ("report.md", "report.json", "rl_curves.png", "reward_model_curves.png", "win_rates.png"):
        assert (out / name).exists(), name
    for name in ("rl_curves.png", "reward_model_curves.png", "win_rates.png"):
        assert (out / name).read_bytes()[:8] == PNG and (out / name).stat().st_size > 5000
    rl = data["runs"]["rl"]["curves"]
    assert rl["gold reward"]["gold (eval responses)"] == {"steps": [0, 5, 20], "values": [0.5, 0.0, 1.0]}
    assert rl["reward"]["train/reward_mean"] == {"steps": [10, 20], "values": [0.5, 1.5]}
    assert rl["reward"]["eval/reward"] == {"steps": [20], "values": [2.0]}
    assert rl["KL to the anchor"]["train/kl"] == {"steps": [10], "values": [0.01]}  # the null is skipped
    assert data["runs"]["reward_model"]["curves"]["accuracy"]["eval/pairwise_accuracy"]["values"] == [0.95]
    assert data["win_rates"]["judged"] == {"wins": 6, "ties": 3, "losses": 1, "win_rate": 0.6,
                                           "win_rate_ci": [0.31, 0.83]}
    assert data["runs"]["."]["summary"] == {"gold_rl": 1.0, "gold_sft": 0.5}
    text = (out / "report.md").read_text()
    assert "| 6 | 3 | 1 | 0.600 | [0.310, 0.830] | 0.200 |" in text
    assert "| gold (eval responses) | 0.5 | 1 | 0..20 |" in text
    assert "Gold reward: `pe_rlhf.data.toy.gold_reward`" in text
    assert "![rl](rl_curves.png)" in text and "![win rates](win_rates.png)" in text


def test_gold_none_leaves_the_gold_panel_out(handmade, tmp_path):
    report = _report_module()
    data = report.write_report(str(handmade), str(tmp_path / "out"), gold="none")
    assert "gold reward" not in data["runs"]["rl"]["curves"]


@pytest.mark.slow
def test_report_on_the_benchmark_workdir(gold_run, tmp_path):
    workdir, result = gold_run
    report = _report_module()
    data = report.write_report(workdir, str(tmp_path))
    for run in ("sft", "rm_lora", "rm_full", "rl_remax_lora_rm-lora"):
        assert (tmp_path / f"{run}_curves.png").read_bytes()[:8] == PNG, run
    rl = data["runs"]["rl_remax_lora_rm-lora"]["curves"]
    assert rl["gold reward"]["gold (eval responses)"]["steps"] == [0, result["config"]["rl_steps"]]
    assert "### Gold-reward benchmark" in (tmp_path / "report.md").read_text()
