"""Over-optimisation study: its measures against hand computation, the noisy pairs, member subsets."""

import json

import numpy as np
import pytest

from pe_rlhf.data import toy
from pe_rlhf.eval.overopt import OveroptConfig, markdown, mean_interval, summarise


def test_label_noise_swaps_a_seeded_fraction_and_zero_is_the_clean_set():
    clean = toy.preference_pairs(n=400, seed=3)
    noisy = toy.preference_pairs(n=400, seed=3, label_noise=0.25)
    assert clean == toy.preference_pairs(n=400, seed=3, label_noise=0.0)
    assert noisy == toy.preference_pairs(n=400, seed=3, label_noise=0.25)  # seeded
    swapped = [(a.prompt, a.chosen, a.rejected) == (b.prompt, b.rejected, b.chosen)
               for a, b in zip(clean.examples, noisy.examples)]
    kept = [a == b for a, b in zip(clean.examples, noisy.examples)]
    assert all(s != k for s, k in zip(swapped, kept))  # every pair is either kept or swapped
    assert 0.2 <= np.mean(swapped) <= 0.3
    # the gold rule prefers the clean set's chosen answer every time, and the swapped ones' rejected
    for ex, s in zip(noisy.examples, swapped):
        assert toy.gold_reward(ex.prompt, ex.chosen) == (0.0 if s else 1.0)
    with pytest.raises(ValueError, match="label_noise=0.5"):
        toy.preference_pairs(n=4, label_noise=0.5)


def test_eval_curve_by_hand(tmp_path):
    from pe_rlhf.eval.experiment import eval_curve

    def write(name, rows):
        (tmp_path / name).write_text("".join(json.dumps(r) + "\n" for r in rows))

    write("samples_0.jsonl", [{"prompt": "p", "response": "good", "reward": 1.0},
                              {"prompt": "p", "response": "bad", "reward": 0.0}])
    write("samples_10.jsonl", [{"prompt": "p", "response": "good", "reward": 3.0}] * 3
          + [{"prompt": "p", "response": "x", "reward": 5.0}])
    # train/kl at steps 5 and 10 (step 10 logged twice, as by a resumed run: the last line counts), an
    # evaluation row without it, and step 15, after the last evaluation
    write("metrics.jsonl", [{"step": 5, "train/kl": 0.2}, {"step": 10, "train/kl": 7.0}, {"step": 10, "train/kl": 0.4},
                            {"step": 10, "eval/reward": 1.0}, {"step": 15, "train/kl": 9.0}])
    gold = lambda ps, rs: [float(r == "good") for r in rs]  # noqa: E731
    points = eval_curve(str(tmp_path), {"gold": gold})
    assert points == [{"step": 0, "proxy": 0.5, "gold": 0.5, "kl": 0.0},
                      {"step": 10, "proxy": 3.5, "gold": 0.75, "kl": pytest.approx(0.3)}]


def test_mean_interval_and_summary_by_hand():
    m = mean_interval([0.5, 0.7, 0.9])
    half = 4.303 * 0.2 / np.sqrt(3)  # t(0.975, 2) * sample std / sqrt(n)
    assert m["mean"] == pytest.approx(0.7) and m["low"] == pytest.approx(0.7 - half)
    assert mean_interval([0.4])["low"] is None
    curves = {"single": {0: [{"step": 0, "gold": 0.6, "proxy": 0.0, "kl": 0.0},
                             {"step": 10, "gold": 0.9, "proxy": 1.0, "kl": 1.0},
                             {"step": 20, "gold": 0.5, "proxy": 2.0, "kl": 3.0}],
                         1: [{"step": 0, "gold": 0.6, "proxy": 0.0, "kl": 0.0},
                             {"step": 10, "gold": 0.7, "proxy": 1.0, "kl": 2.0},
                             {"step": 20, "gold": 0.8, "proxy": 2.0, "kl": 4.0}]}}
    s = summarise(curves)["single"]
    assert s["best_gold"]["mean"] == pytest.approx(0.85) and s["kl_at_best_gold"]["mean"] == pytest.approx(2.5)
    assert s["final_gold"]["mean"] == pytest.approx(0.65) and s["final_kl"]["mean"] == pytest.approx(3.5)
    assert s["drop_from_best"]["mean"] == pytest.approx(0.2)
    assert "| single | 0.850 [" in markdown({"summary": {"single": s}})


def test_config_names_a_bad_line():
    with pytest.raises(ValueError, match="'best'"):
        OveroptConfig(lines=("single", "best"))


@pytest.mark.slow
def test_the_study_end_to_end_on_the_tiny_model(tmp_path):
    from pe_rlhf.eval.overopt import run_overoptimisation

    cfg = OveroptConfig(num_sft_examples=128, sft_steps=4, num_pairs=48, members=2, rm_steps=2, lines=("single", "min"),
                        num_rl_prompts=64, rl_steps=4, eval_every=2, eval_samples=2, batch_size=8, max_response_len=12,
                        seeds=(0,))
    result = run_overoptimisation(str(tmp_path), cfg)
    for line in cfg.lines:
        points = result["curves"][line]["0"]
        assert [p["step"] for p in points] == [0, 2, 4] and points[0]["kl"] == 0.0
        assert all(0.0 <= p["gold"] <= 1.0 for p in points)
    assert set(result["summary"]) == set(cfg.lines)
    warp = {p["eta"]: p for p in result["interpolation"]["0"]}
    assert sorted(warp) == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert warp[0.0]["kl"] == 0.0  # eta 0 is the start itself: the same samples, the same log-probs
    assert json.loads((tmp_path / "overoptimisation.json").read_text())["summary"] == result["summary"]
    # a rerun reuses every stage and the interpolation
    assert run_overoptimisation(str(tmp_path), cfg)["curves"] == result["curves"]
