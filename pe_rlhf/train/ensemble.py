"""Reward-model ensembles on one backbone, and WARM: their weight average as one adapter.

`train_reward_ensemble` trains K LoRA reward models (adapters `reward_0` ... `reward_{K-1}`),
each in `members/<k>/` as an ordinary reward-model run (resumable, skipped when done), that
differ in their adapter's initialisation and in the order they see the data (seed + k); the
held-out pairs are the same for all. It then writes:

- `warm/`: a reward-model workdir whose one adapter (rank K*r) is the exact average of the
  members' updates and whose head is the average of their heads (`average_adapters`), usable
  anywhere a reward model is (`train_policy(reward_model=.../warm)`);
- `run_info.json` (stage `reward_ensemble`), so `train_policy(reward_model=<this workdir>)`
  scores with all K members on the policy's backbone and combines them by an `EnsembleRule`;
- `summary.json`: held-out accuracy of each member, of each ensemble rule and of WARM.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from collections.abc import Sequence

import numpy as np
from flax import nnx

from pe_rlhf import data as D
from pe_rlhf.checkpoints.load import load_backbone
from pe_rlhf.checkpoints.orbax_io import RunCheckpointer
from pe_rlhf.models import averaging, lora
from pe_rlhf.models.heads import (ENSEMBLE_RULES, EnsembleRule, RewardModel, combine_rewards, member_stats,
                                  standardise_scores)
from pe_rlhf.train import metrics as M
from pe_rlhf.train.config import DataConfig, LoopConfig, TuningConfig
from pe_rlhf.train.optim import OptimizerConfig
from pe_rlhf.train.records import lora_config_of, read_run_info, same_model, write_run_info
from pe_rlhf.train.stages import run_stage, write_json_atomic
from pe_rlhf.train.supervised import reward_data, restore_reward_model, train_reward_model, trainable_filter

ENSEMBLE_STAGE = "reward_ensemble"
WARM = "warm"


def member_dirs(workdir: str, info: dict | None = None) -> list[str]:
    """The members' workdirs of an ensemble workdir, in order."""
    info = info if info is not None else read_run_info(workdir)
    return [os.path.join(workdir, m) for m in info["members"]]


def restore_members(backbone, member_workdirs: list[str]) -> list[RewardModel]:
    """Each member's adapter and head added to `backbone` and restored from its latest checkpoint."""
    members = []
    for d in member_workdirs:
        info = read_run_info(d)
        if info is None or info.get("stage") != "reward_model" or info.get("tuning") != "lora":
            raise ValueError(f"{d}: not a LoRA reward-model workdir (an ensemble member must be one)")
        members.append(restore_reward_model(backbone, d, info)[0])
    return members


def write_warm(workdir: str, backbone, members: list[RewardModel], member_workdirs: list[str],
               weights=None) -> RewardModel:
    """Average `members` (adapters and heads, on `backbone`) into the reward-model workdir `workdir`.

    The averaged adapter `warm` is added to `backbone`; the returned `RewardModel` scores with it.
    """
    names = [m.adapters[0] for m in members]
    w = np.full(len(members), 1.0 / len(members)) if weights is None else np.asarray(weights, float)
    rank = averaging.average_adapters(backbone, names, WARM, list(w))
    warm = RewardModel(backbone, adapters=(WARM,))
    warm.head.kernel.set_value(sum(float(wk) * m.head.kernel[...] for wk, m in zip(w, members)))
    warm.head.bias.set_value(sum(float(wk) * m.head.bias[...] for wk, m in zip(w, members)))
    first = read_run_info(member_workdirs[0])
    info = {**{k: v for k, v in first.items() if k != "identity"}, "adapter": WARM,
            "lora": dataclasses.asdict(lora.LoRAConfig(rank=rank, alpha=float(rank),
                                                       targets=lora_config_of(first).targets)),
            "warm": {"members": [os.path.relpath(d, workdir) for d in member_workdirs],
                     "weights": [float(x) for x in w]}}
    if os.path.isdir(workdir):  # derived from the members: rebuilt whole, never resumed
        shutil.rmtree(workdir)
    os.makedirs(workdir)
    write_run_info(workdir, info)
    ckpt = RunCheckpointer(os.path.join(workdir, "checkpoints"))
    try:
        ckpt.save(0, {"trainable": nnx.state(warm, trainable_filter(TuningConfig(mode="lora"), WARM))},
                  {"warm": True}, force=True)
        ckpt.wait()
    finally:
        ckpt.close()
    return warm


def _check_first_members(first_members, members: int, model: str, tuning: TuningConfig,
                         adapter: str) -> dict[str, int | None]:
    """{absolute workdir: examples it held out} of `first_members`, refused unless each is a finished LoRA
    reward model on `model`."""
    dirs = [os.path.abspath(d) for d in first_members]
    if len(dirs) >= members:
        raise ValueError(f"train_reward_ensemble: {len(dirs)} first_members for members={members}; the ensemble "
                         "would train none (use fewer first members or more members)")
    names, held = [], {}
    for k, d in enumerate(dirs):
        where = f"train_reward_ensemble.first_members[{k}] ({d})"
        info = read_run_info(d)
        if info is None:
            raise ValueError(f"{where}: no run_info.json; expected the workdir of a finished reward-model run")
        if info.get("stage") != "reward_model" or info.get("tuning") != "lora":
            raise ValueError(f"{where}: stage {info.get('stage')!r}, tuning {info.get('tuning')!r}; an ensemble "
                             "member must be a LoRA reward model")
        if not same_model(info["model"], model):
            raise ValueError(f"{where}: trained on {info['model']!r}, the ensemble's model is {model!r}; members "
                             "must share one backbone")
        if info.get("quantize") != tuning.quantize:
            raise ValueError(f"{where}: its backbone was stored {info.get('quantize')!r}, the ensemble's "
                             f"TuningConfig.quantize is {tuning.quantize!r}")
        if not os.path.isdir(os.path.join(d, "checkpoints")):
            raise ValueError(f"{where}: no checkpoints/ to restore its adapter from")
        names.append(info["adapter"])
        held[d] = info.get("eval_examples")
    trained = [f"{adapter}_{k}" for k in range(len(dirs), members)]
    clash = sorted({n for n in names if names.count(n) > 1 or n in trained})
    if clash:
        raise ValueError(f"train_reward_ensemble: adapter name(s) {clash} used twice among the first members "
                         f"({names}) and the ones to train ({trained}); every member needs its own adapter on the "
                         "shared backbone (set train_reward_ensemble.adapter to another prefix)")
    return held


def train_reward_ensemble(*, workdir: str, dataset: D.Loaded, members: int = 4, model: str = "tiny",
                          dtype: str = "float32", tuning: TuningConfig = TuningConfig(),
                          optimizer: OptimizerConfig = OptimizerConfig(), loop: LoopConfig = LoopConfig(),
                          data: DataConfig = DataConfig(), center_coef: float = 0.0, adapter: str = "reward",
                          rules: tuple[EnsembleRule, ...] = tuple(EnsembleRule(r) for r in ENSEMBLE_RULES),
                          first_members: Sequence[str] = ()) -> dict:
    """Train `members` LoRA reward models (seeds `loop.seed + k`), their WARM average, and score them all.

    Every member is a `train_reward_model` run with adapter `<adapter>_<k>`; LoRA only (K fully tuned
    copies would not share a backbone). `first_members` are finished LoRA reward-model workdirs on the
    same base, taken as members 0, 1, ... as they are (e.g. an experiment's single reward model, so
    that the ensemble contains it); they keep their adapter names and stay where they are, and should
    follow the members' recipe and held-out part (the number held out is checked). Returns (and writes to
    summary.json) held-out metrics of each member, of the ensemble under each of `rules`, and of
    WARM; run_info.json records each member's mean and std over the held-out responses (what a
    standardising `EnsembleRule` divides out).
    """
    if tuning.mode != "lora":
        raise ValueError(f"train_reward_ensemble: TuningConfig.mode={tuning.mode!r}; an ensemble here is K LoRA "
                         "adapters on one frozen backbone, so use mode='lora'")
    if not isinstance(members, int) or members < 2:
        raise ValueError(f"train_reward_ensemble: members={members!r}; an ensemble needs at least 2")
    reused_held = _check_first_members(first_members, members, model, tuning, adapter)
    reused = list(reused_held)
    dirs = reused + [os.path.join(workdir, "members", str(k)) for k in range(len(reused), members)]
    # MEMBERS: ordinary reward-model runs, each skipped when done and resumed when interrupted
    for k, d in enumerate(dirs[len(reused):], start=len(reused)):
        run_stage(f"member {k}", d, train_reward_model, dataset=dataset, model=model, dtype=dtype, tuning=tuning,
                  optimizer=optimizer, loop=dataclasses.replace(loop, seed=loop.seed + k), data=data,
                  center_coef=center_coef, adapter=f"{adapter}_{k}")

    # the held-out part every member held out (a first member that held out another is refused before WARM)
    backbone, tokenizer = load_backbone(model, dtype, quantize=tuning.quantize)  # as the members trained
    rd = reward_data(dataset, tokenizer, data, loop, center_coef)
    for d, n in reused_held.items():
        if n != len(rd.eval_items):
            raise ValueError(f"train_reward_ensemble.first_members: {d} held out {n} examples, the ensemble's data "
                             f"holds out {len(rd.eval_items)}; members must share the held-out part")

    # WARM and the ensemble, on one backbone
    rms = restore_members(backbone, dirs)
    warm = write_warm(os.path.join(workdir, WARM), backbone, rms, dirs)

    # EVALUATION
    scores = [rd.eval_scores(*nnx.split(m, trainable_filter(tuning, m.adapters[0]), ...), loop) for m in rms]
    a_KxN = np.stack([s[0] for s in scores])
    b_KxN = np.stack([s[1] for s in scores])
    # each member's units: its scores on every held-out response (pairwise: chosen and rejected)
    stats = member_stats(np.concatenate([a_KxN, b_KxN], axis=1) if rd.pairwise else a_KxN)
    summary = {"members": [M.reward_metrics(rd.pairwise, a, b) for a, b in zip(a_KxN, b_KxN)]}
    for rule in rules:
        key = rule.rule if rule.rule != "mean_minus_std" else f"mean_minus_{rule.penalty:g}std"
        key += "" if rule.standardise else "_raw"
        a = standardise_scores(a_KxN, stats) if rule.standardise else a_KxN
        if rd.pairwise:
            b = standardise_scores(b_KxN, stats) if rule.standardise else b_KxN
            summary[f"ensemble_{key}"] = M.pairwise_metrics(combine_rewards(a, rule), combine_rewards(b, rule))
        else:
            summary[f"ensemble_{key}"] = M.classification_metrics(combine_rewards(a, rule), b_KxN[0])
    summary[WARM] = M.reward_metrics(rd.pairwise, *rd.eval_scores(*nnx.split(warm, trainable_filter(tuning, WARM),
                                                                             ...), loop))
    info = {"stage": ENSEMBLE_STAGE, "model": model, "dtype": dtype, "tuning": "lora", "quantize": tuning.quantize,
            "members": [os.path.relpath(d, workdir) for d in dirs], "adapter": adapter,
            "lora": dataclasses.asdict(tuning.lora), "warm": WARM, "member_stats": stats}
    write_run_info(workdir, info)
    write_json_atomic(os.path.join(workdir, "summary.json"), summary)
    return summary


__all__ = ["ENSEMBLE_STAGE", "WARM", "member_dirs", "restore_members", "train_reward_ensemble", "write_warm"]
