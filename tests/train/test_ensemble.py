"""Reward ensembles on one backbone, WARM weight averaging, policy interpolation (numbers, tiny models)."""

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pe_rlhf.checkpoints.load import load_backbone
from pe_rlhf.data import toy
from pe_rlhf.eval import winrate
from pe_rlhf.models import averaging, lora, merging
from pe_rlhf.models.heads import (EnsembleRule, RewardEnsemble, RewardModel, combine_rewards, member_stats,
                                  standardise_scores)
from pe_rlhf.train.ensemble import train_reward_ensemble
from pe_rlhf.train.optim import OptimizerConfig
from pe_rlhf.train.policy import RLConfig
from pe_rlhf.train.records import RunIdentityError, read_run_info
from pe_rlhf.train.rl_loop import RewardModelMismatch, attach_reward_model, train_policy
from pe_rlhf.train.supervised import DataConfig, LoopConfig, TuningConfig


def test_combine_rewards_by_hand():
    s = np.array([[1.0, -2.0, 0.5], [3.0, 0.0, 0.5], [2.0, -1.0, 2.0]])
    np.testing.assert_allclose(combine_rewards(s, EnsembleRule("mean")), [2.0, -1.0, 1.0])
    np.testing.assert_allclose(combine_rewards(s, EnsembleRule("min")), [1.0, -2.0, 0.5])
    std = np.sqrt(np.array([(1 + 1 + 0) / 3, (1 + 1 + 0) / 3, (0.25 + 0.25 + 1) / 3]))  # population std
    np.testing.assert_allclose(combine_rewards(s, EnsembleRule("mean_minus_std", 0.5)),
                               np.array([2.0, -1.0, 1.0]) - 0.5 * std, rtol=1e-12)
    with pytest.raises(ValueError, match="rule 'max' is not one of"):
        EnsembleRule("max")
    with pytest.raises(ValueError, match="penalty must be a number >= 0"):
        EnsembleRule("mean_minus_std", -1.0)


def _randomise(model, names, seed):
    """Non-zero adapters (b starts at 0) and heads, so the checks mean something."""
    key = jax.random.key(seed)
    for _, m in lora.lora_modules(model):
        for n in names:
            key, k1, k2 = jax.random.split(key, 3)
            p = m.lora[n]
            p.a.set_value(jax.random.normal(k1, p.a[...].shape) * 0.3)
            p.b.set_value(jax.random.normal(k2, p.b[...].shape) * 0.3)
    return key


def _tokens():
    tokens = jax.random.randint(jax.random.key(7), (3, 10), 3, 200)
    mask = jnp.ones((3, 10), bool).at[0, :3].set(False)  # one left-padded row
    return tokens, mask


def _members(names, rank=4):
    backbone, _ = load_backbone("tiny")
    for i, n in enumerate(names):
        lora.add_lora(backbone, n, lora.LoRAConfig(rank=rank + i, alpha=8.0))  # different ranks on purpose
    key = _randomise(backbone, names, 0)
    members = []
    for n in names:
        rm = RewardModel(backbone, adapters=(n,))
        key, k1, k2 = jax.random.split(key, 3)
        rm.head.kernel.set_value(jax.random.normal(k1, rm.head.kernel[...].shape))
        rm.head.bias.set_value(jax.random.normal(k2, ()))
        members.append(rm)
    return backbone, members


def test_ensemble_scores_equal_separate_scorings_on_their_own_backbones():
    names = ["r0", "r1", "r2"]
    backbone, members = _members(names)
    tokens, mask = _tokens()
    ensemble = RewardEnsemble(members, rule=EnsembleRule("mean_minus_std", 1.0, standardise=False))
    got_KxB = np.asarray(ensemble.member_scores(tokens, mask))
    for k, n in enumerate(names):  # member k alone: a fresh backbone holding only its adapter, same weights
        alone, _ = load_backbone("tiny")
        lora.add_lora(alone, n, lora.LoRAConfig(rank=4 + k, alpha=8.0))
        for (_, theirs), (_, ours) in zip(lora.lora_modules(alone), lora.lora_modules(backbone)):
            theirs.lora[n].a.set_value(ours.lora[n].a[...])
            theirs.lora[n].b.set_value(ours.lora[n].b[...])
        rm = RewardModel(alone, adapters=(n,))
        rm.head = members[k].head
        np.testing.assert_allclose(got_KxB[k], np.asarray(rm(tokens, mask)), atol=1e-5, rtol=0)
    assert np.ptp(got_KxB, axis=0).min() > 1e-3  # the members really differ
    np.testing.assert_allclose(np.asarray(ensemble(tokens, mask)), got_KxB.mean(0) - got_KxB.std(0), atol=1e-5)


def test_standardised_members_by_hand_and_blind_to_each_members_offset_and_scale():
    s_KxN = np.array([[1.0, 3.0, 2.0, 6.0], [10.0, 10.5, 9.0, 10.5]])
    stats = member_stats(s_KxN)
    assert stats[0] == pytest.approx({"mean": 3.0, "std": np.sqrt((4 + 0 + 1 + 9) / 4)})
    assert stats[1] == pytest.approx({"mean": 10.0, "std": np.sqrt((0 + 0.25 + 1 + 0.25) / 4)})
    z = standardise_scores(s_KxN, stats)
    np.testing.assert_allclose(z[0], (s_KxN[0] - 3.0) / np.sqrt(3.5), rtol=1e-6)
    np.testing.assert_allclose(z.mean(1), 0.0, atol=1e-6)
    np.testing.assert_allclose(z.std(1), 1.0, rtol=1e-6)
    with pytest.raises(ValueError, match=r"member\(s\) \[1\] gave one score"):
        standardise_scores(s_KxN, [stats[0], {"mean": 1.0, "std": 0.0}])

    # raw, `min` follows the member with the lowest offset; standardised, a member's offset and scale
    # (arbitrary for a Bradley-Terry reward) change nothing
    names = ["r0", "r1", "r2"]
    _, members = _members(names)
    tokens, mask = _tokens()
    rule = EnsembleRule("min")
    raw_KxB = np.asarray(RewardEnsemble(members, rule=dataclasses.replace(rule, standardise=False))
                         .member_scores(tokens, mask))
    ours = np.asarray(RewardEnsemble(members, rule=rule, stats=member_stats(raw_KxB))(tokens, mask))
    np.testing.assert_allclose(ours, standardise_scores(raw_KxB, member_stats(raw_KxB)).min(0), atol=1e-5)
    members[1].head.kernel.set_value(members[1].head.kernel[...] * 3.0)
    members[1].head.bias.set_value(members[1].head.bias[...] * 3.0 - 100.0)
    moved = RewardEnsemble(members, rule=dataclasses.replace(rule, standardise=False))
    moved_KxB = np.asarray(moved.member_scores(tokens, mask))
    np.testing.assert_allclose(np.asarray(moved(tokens, mask)), moved_KxB[1], atol=1e-4)  # raw: member 1 alone
    again = RewardEnsemble(members, rule=rule, stats=member_stats(moved_KxB))
    np.testing.assert_allclose(np.asarray(again(tokens, mask)), ours, atol=1e-4)
    with pytest.raises(ValueError, match="needs each member's held-out mean and std"):
        RewardEnsemble(members, rule=rule)
    with pytest.raises(ValueError, match="stats for 2 members, 3 members given"):
        RewardEnsemble(members, rule=rule, stats=stats)


def test_warm_adapter_is_the_exact_average_of_the_members_updates():
    names = ["r0", "r1", "r2"]
    backbone, _ = _members(names)
    weights = [0.5, 0.3, 0.2]
    rank = averaging.average_adapters(backbone, names, "warm", weights)
    assert rank == 4 + 5 + 6
    base = {p + ("kernel",): m.kernel[...] for p, m in lora.lora_modules(backbone)}
    warm = merging.merged_kernels(backbone, "warm")
    members = [merging.merged_kernels(backbone, n) for n in names]
    for path, w in warm.items():
        expected = base[path] + sum(wk * (mk[path] - base[path]) for wk, mk in zip(weights, members))
        np.testing.assert_allclose(np.asarray(w), np.asarray(expected), atol=1e-6, rtol=0)
    # the forward pass with the averaged adapter equals the model with the averaged kernels merged
    tokens, mask = _tokens()
    with lora.use_adapters(backbone, "warm"):
        ours = backbone(tokens, input_mask_BxT=mask)[0]
    plain = merging.merged_model(backbone, "warm")
    np.testing.assert_allclose(np.asarray(ours), np.asarray(plain(tokens, input_mask_BxT=mask)[0]), atol=2e-4, rtol=0)
    with pytest.raises(lora.LoRAError, match="already exists"):
        averaging.average_adapters(backbone, names, "warm")
    with pytest.raises(lora.LoRAError, match="2 weights for 3 adapters"):
        averaging.average_adapters(backbone, names, "w2", [0.5, 0.5])


def test_adapters_on_different_projections_are_not_averaged():
    backbone, _ = load_backbone("tiny")
    lora.add_lora(backbone, "att", lora.LoRAConfig(targets="attention"))
    lora.add_lora(backbone, "mlp", lora.LoRAConfig(targets="mlp"))
    with pytest.raises(lora.LoRAError, match="do not cover the same projections"):
        averaging.average_adapters(backbone, ["att", "mlp"], "avg")


def test_dora_adapters_are_not_averaged():
    backbone, _ = load_backbone("tiny")
    lora.add_lora(backbone, "d0", lora.LoRAConfig(dora=True))
    lora.add_lora(backbone, "d1", lora.LoRAConfig(dora=True))
    with pytest.raises(lora.LoRAError, match="'d0' is a DoRA adapter"):
        averaging.average_adapters(backbone, ["d0", "d1"], "avg")


def test_scale_adapter_interpolates_the_update_exactly():
    backbone, _ = _members(["p"])
    base = {p + ("kernel",): m.kernel[...] for p, m in lora.lora_modules(backbone)}
    full = merging.merged_kernels(backbone, "p")
    averaging.scale_adapter(backbone, "p", 0.25)
    for path, w in merging.merged_kernels(backbone, "p").items():
        np.testing.assert_allclose(np.asarray(w), np.asarray(base[path] + 0.25 * (full[path] - base[path])),
                                   atol=1e-6, rtol=0)


# -- end to end on the tiny model ------------------------------------------------------------------------
def _train_ensemble(workdir, steps=6):
    return train_reward_ensemble(
        workdir=str(workdir), dataset=toy.preference_pairs(n=96), members=2, model="tiny",
        tuning=TuningConfig(mode="lora", lora=lora.LoRAConfig(rank=4, alpha=8.0)),
        optimizer=OptimizerConfig(learning_rate=3e-3, schedule="constant"),
        loop=LoopConfig(num_steps=steps, batch_size=8, eval_every=0, log_every=2, checkpoint_every=steps,
                        progress_bar=False),
        data=DataConfig(max_prompt_len=40, max_response_len=32, eval_size=24))


@pytest.mark.slow
def test_ensemble_job_members_warm_and_an_rl_run_against_them(tmp_path):
    ens = tmp_path / "ens"
    summary = _train_ensemble(ens)
    info = read_run_info(str(ens))
    assert info["stage"] == "reward_ensemble" and info["members"] == ["members/0", "members/1"]
    members = [json.loads((ens / "members" / str(k) / "summary.json").read_text()) for k in range(2)]
    for k in range(2):  # the ensemble's per-member metrics are the members' own held-out metrics
        assert summary["members"][k]["pairwise_accuracy"] == pytest.approx(members[k]["eval/pairwise_accuracy"])
        assert summary["members"][k]["num_pairs"] == 24
    assert {"ensemble_mean", "ensemble_min", "ensemble_mean_minus_1std", "warm"} <= set(summary)

    # WARM is an ordinary reward-model workdir: loading it gives the average of the members' weights
    warm_rm, tok, warm_info = winrate.load_reward_model(str(ens / "warm"))
    assert warm_info["lora"]["rank"] == 8 and warm_info["adapter"] == "warm"
    backbone, _ = load_backbone("tiny")
    ensemble = attach_reward_model(backbone, tok, str(ens), policy_model="tiny", dtype="float32",
                                   rule=EnsembleRule("min"))
    assert isinstance(ensemble, RewardEnsemble) and len(ensemble.members) == 2
    heads = np.stack([np.asarray(m.head.kernel[...]) for m in ensemble.members])
    np.testing.assert_allclose(np.asarray(warm_rm.head.kernel[...]), heads.mean(0), atol=1e-7)
    averaging.average_adapters(backbone, [m.adapters[0] for m in ensemble.members], "avg")
    tokens, mask = _tokens()
    again = RewardModel(backbone, adapters=("avg",))
    again.head = warm_rm.head
    np.testing.assert_allclose(np.asarray(warm_rm(tokens, mask)), np.asarray(again(tokens, mask)), atol=1e-5)
    stats = info["member_stats"]  # each member's units: mean and std over the 48 held-out responses
    assert len(stats) == 2 and all(st["std"] > 0 for st in stats) and stats[0] != stats[1]
    raw_KxB = np.asarray(ensemble.member_scores(tokens, mask))
    by_hand = np.stack([(raw_KxB[k] - st["mean"]) / st["std"] for k, st in enumerate(stats)]).min(0)
    np.testing.assert_allclose(np.asarray(ensemble(tokens, mask)), by_hand, atol=1e-5)

    # a rerun finds the members done and rebuilds the same WARM and summary
    assert _train_ensemble(ens) == summary

    # RL against the ensemble: the rule is part of the run's identity
    def rl(workdir, rule, steps=2):
        return train_policy(
            workdir=str(workdir), prompts=toy.prompts(32), model="tiny", reward_model=str(ens), reward_rule=rule,
            tuning=TuningConfig(mode="lora", lora=lora.LoRAConfig(rank=4, alpha=8.0)),
            rl=RLConfig(algorithm="remax", max_new_tokens=6),
            optimizer=OptimizerConfig(learning_rate=1e-3, schedule="constant"),
            loop=LoopConfig(num_steps=steps, batch_size=4, eval_every=0, log_every=1, checkpoint_every=2,
                            progress_bar=False),
            data=DataConfig(max_prompt_len=40, eval_size=4))

    out = rl(tmp_path / "rl", EnsembleRule("mean_minus_std", 0.5))
    assert out["step"] == 2
    assert read_run_info(str(tmp_path / "rl"))["reward_rule"] == {"rule": "mean_minus_std", "penalty": 0.5,
                                                                   "standardise": True}
    with pytest.raises(RunIdentityError, match="reward_rule.rule: was 'mean_minus_std', now 'min'"):
        rl(tmp_path / "rl", EnsembleRule("min"), steps=4)
    with pytest.raises(RewardModelMismatch, match="not an ensemble"):
        attach_reward_model(backbone, tok, str(ens / "warm"), policy_model="tiny", dtype="float32",
                            rule=EnsembleRule("min"))
    assert os.path.isdir(tmp_path / "rl" / "checkpoints")


@pytest.mark.slow
def test_an_existing_reward_model_is_member_0_and_the_rest_train_as_the_ensemble_would(tmp_path):
    from pe_rlhf.train.supervised import train_reward_model

    plain = _train_ensemble(tmp_path / "plain")
    kw = dict(dataset=toy.preference_pairs(n=96), model="tiny",
              tuning=TuningConfig(mode="lora", lora=lora.LoRAConfig(rank=4, alpha=8.0)),
              optimizer=OptimizerConfig(learning_rate=3e-3, schedule="constant"),
              loop=LoopConfig(num_steps=6, batch_size=8, eval_every=0, log_every=2, checkpoint_every=6,
                              progress_bar=False),
              data=DataConfig(max_prompt_len=40, max_response_len=32, eval_size=24))
    train_reward_model(workdir=str(tmp_path / "single"), adapter="mine", **kw)  # seed 0, as member 0 would be
    ens = tmp_path / "ens"
    summary = train_reward_ensemble(workdir=str(ens), members=2, first_members=[str(tmp_path / "single")], **kw)
    info = read_run_info(str(ens))
    assert info["members"] == ["../single", "members/1"] and not (ens / "members" / "0").exists()
    assert read_run_info(str(ens / "members" / "1"))["adapter"] == "reward_1"
    # member 0 is the existing run as it is; member 1 trained exactly as the plain ensemble's did
    single = json.loads((tmp_path / "single" / "summary.json").read_text())
    assert summary["members"][0]["pairwise_accuracy"] == pytest.approx(single["eval/pairwise_accuracy"])
    assert summary["members"][0]["margin_mean"] == pytest.approx(single["eval/margin_mean"], abs=1e-6)
    assert summary["members"][1] == pytest.approx(plain["members"][1], abs=1e-6)

    def refused(match, **over):
        before = sorted(os.listdir(tmp_path))
        with pytest.raises(ValueError, match=match):
            train_reward_ensemble(workdir=str(tmp_path / "bad"), **{**kw, "members": 2, **over})
        assert sorted(os.listdir(tmp_path)) == before  # refused before anything was written

    refused(r"adapter name\(s\) \['reward_1'\] used twice", first_members=[str(ens / "members" / "1")])
    refused("2 first_members for members=2", first_members=[str(tmp_path / "single"), str(ens / "members" / "1")])
    refused(r"first_members\[0\] .*no run_info.json", first_members=[str(tmp_path / "nowhere")])
    refused(r"first_members\[0\] .*stage 'reward_ensemble'", first_members=[str(ens)])
    refused(r"trained on 'tiny', the ensemble's model is 'tiny-llama'", model="tiny-llama",
            first_members=[str(tmp_path / "single")])


@pytest.mark.slow
def test_an_ensemble_recorded_without_member_stats_needs_them_to_standardise(tmp_path):
    ens = tmp_path / "ens"
    _train_ensemble(ens)
    info = read_run_info(str(ens))
    del info["member_stats"]
    with open(ens / "run_info.json", "w") as f:
        json.dump(info, f)
    backbone, tok = load_backbone("tiny")
    with pytest.raises(RewardModelMismatch, match="no member_stats"):
        attach_reward_model(backbone, tok, str(ens), policy_model="tiny", dtype="float32", rule=EnsembleRule("min"))
    raw = attach_reward_model(backbone, tok, str(ens), policy_model="tiny", dtype="float32",
                              rule=EnsembleRule("min", standardise=False))
    tokens, mask = _tokens()
    np.testing.assert_allclose(np.asarray(raw(tokens, mask)), np.asarray(raw.member_scores(tokens, mask)).min(0),
                               atol=1e-6)


def test_members_train_on_their_own_subsets_and_hold_out_the_same_pairs():
    from pe_rlhf.train.supervised import reward_data

    from pe_rlhf.data.examples import Loaded, PreferenceExample

    _, tok = load_backbone("tiny")
    pairs = Loaded(examples=tuple(PreferenceExample(f"Human: item {i}?\n\nAssistant:", " yes", " no")
                                  for i in range(96)), source="distinct pairs")
    data = DataConfig(max_prompt_len=40, max_response_len=32, eval_size=24, train_fraction=0.5)
    parts = [reward_data(pairs, tok, data, LoopConfig(batch_size=8, seed=k)) for k in range(2)]
    full = reward_data(pairs, tok, dataclasses.replace(data, train_fraction=1.0), LoopConfig(batch_size=8))
    assert [len(p.train_items) for p in parts] == [36, 36] and len(full.train_items) == 72
    assert all(p.eval_items == full.eval_items for p in parts)  # the held-out part is unchanged
    index = [[full.train_items.index(x) for x in p.train_items] for p in parts]
    assert all(i == sorted(i) for i in index)  # a subset in the original order
    assert index[0] != index[1]  # members (seeds 0, 1) draw different subsets
    assert reward_data(pairs, tok, data, LoopConfig(batch_size=8, seed=0)).train_items == parts[0].train_items
    with pytest.raises(ValueError, match="train_fraction"):
        DataConfig(train_fraction=0.0)

