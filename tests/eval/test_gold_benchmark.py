"""Gold-reward benchmark at CI scale: LoRA vs full proxy RMs agree with gold alike; LoRA ReMax raises gold."""

import json
import os

import numpy as np
import pytest

from pe_rlhf.eval.gold import GoldBenchmarkConfig, gold_agreement, markdown


def test_gold_agreement_by_hand():
    # prompt a: pairs (0,1) gold differs, proxy agrees; (0,2) gold equal (skipped); (1,2) gold differs,
    # proxy disagrees. prompt b: (3,4) gold differs, proxy ties -> a disagreement.
    proxy = [2.0, 1.0, 0.5, 0.5, 0.5]
    gold = [1.0, 0.0, 1.0, 1.0, 0.0]
    groups = ["a", "a", "a", "b", "b"]
    agreement, pairs = gold_agreement(proxy, gold, groups)
    assert pairs == 3 and agreement == pytest.approx(1 / 3)
    assert np.isnan(gold_agreement([1.0, 2.0], [1.0, 1.0], ["a", "a"])[0])


def test_config_rejects_a_policy_without_its_proxy():
    with pytest.raises(ValueError, match="cross=False"):
        GoldBenchmarkConfig(rm_tunings=("lora",), policy_tunings=("full",))


@pytest.mark.slow
def test_lora_proxy_agrees_with_gold_within_3_points_of_full(gold_run):
    _, result = gold_run
    rms = {r["proxy_rm"]: r for r in result["reward_models"]}
    print(json.dumps(result["reward_models"], indent=1))
    for key in ("gold_agreement_sft_samples", "heldout_pair_accuracy"):
        assert abs(rms["lora"][key] - rms["full"][key]) <= 0.03, (key, rms)
        assert rms["lora"][key] >= 0.9, (key, rms)  # and both proxies did learn the rule
    assert rms["lora"]["sft_sample_pairs"] >= 100
    assert rms["lora"]["trainable_params"] < 0.15 * rms["full"]["trainable_params"]


@pytest.mark.slow
def test_lora_remax_raises_the_gold_reward_over_sft(gold_run):
    workdir, result = gold_run
    rows = {(r["policy"], r["algorithm"], r["proxy_rm"]): r for r in result["policies"]}
    print(json.dumps(result["policies"], indent=1))
    sft, rl = rows[("SFT", "-", "lora")], rows[("lora", "remax", "lora")]
    assert "error" not in rl, rl
    assert rl["gold_sampled"] >= sft["gold_sampled"] + 0.05, (sft, rl)
    assert rl["proxy_sampled"] > sft["proxy_sampled"], (sft, rl)  # it optimised the proxy, too
    # the written table is the result's
    with open(os.path.join(workdir, "gold_benchmark.md")) as f:
        assert f.read() == markdown(result)
    assert f"| lora | remax | lora | {rl['gold_sampled']:.3f} |" in markdown(result)
