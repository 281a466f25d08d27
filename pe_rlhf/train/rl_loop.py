"""The RL stage of PE-RLHF: a LoRA policy optimised against a reward model (or a reward function).

Reads in the order of the run: build the backbone and the policy adapter, attach
the reward (on the same backbone when the reward model shares its base
checkpoint), tokenise the prompts, restore or start, then loop: step, log,
evaluate, checkpoint.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pe_rlhf import data as D
from pe_rlhf.checkpoints.load import load_backbone
from pe_rlhf.models import lora, quant
from pe_rlhf.models.heads import EnsembleRule, RewardEnsemble, RewardModel
from pe_rlhf.sampling.sampler import SamplingConfig
from pe_rlhf.train.loop import Job, train_loop
from pe_rlhf.train.optim import OptimizerConfig, guard_nonfinite, make_optimizer
from pe_rlhf.train.precision import master_weights
from pe_rlhf.train.rollout import RLConfig, RLModules, rollout
from pe_rlhf.train.records import read_run_info, run_identity, same_model
from pe_rlhf.train.sharded import sharded_rl_step
from pe_rlhf.train.config import DataConfig, LoopConfig, TuningConfig
from pe_rlhf.train.ensemble import ENSEMBLE_STAGE, member_dirs, restore_members
from pe_rlhf.train.supervised import restore_reward_model

log = logging.getLogger(__name__)


class RewardModelMismatch(ValueError):
    """A reward model that cannot score this policy's tokens."""


def _same_vocab(a, b) -> bool:
    return a is b or (len(a) == len(b) and a.get_vocab() == b.get_vocab())


def _own_backbone(info: dict, tokenizer, rm_workdir: str, policy_model: str, dtype: str):
    """A frozen backbone of the reward model's own base (quantised as it trained), refused when its tokenizer
    differs from the policy's."""
    rm_backbone, rm_tokenizer = load_backbone(info["model"], dtype, quantize=info.get("quantize"))
    if not _same_vocab(tokenizer, rm_tokenizer):
        raise RewardModelMismatch(
            f"{rm_workdir}: the reward model's tokenizer ({info['model']}, {len(rm_tokenizer)} tokens) differs "
            f"from the policy's ({policy_model}, {len(tokenizer)} tokens); responses would have to be "
            "re-tokenised, which this step (jit-compiled end to end) does not do. Train the reward model on "
            "the policy's base checkpoint or one with the same tokenizer."
        )
    return rm_backbone


def attach_reward_model(backbone, tokenizer, rm_workdir: str, *, policy_model: str, dtype: str,
                        policy_tuning: str = "lora", rule: EnsembleRule | None = None,
                        policy_quantize: str | None = None) -> RewardModel | RewardEnsemble:
    """The reward model trained in `rm_workdir`, restored from its latest checkpoint.

    If it is a LoRA reward model on the same base checkpoint as a LoRA policy, its adapter and
    head are added to the policy's backbone (one copy of the base weights serves both), provided
    both store it alike (`TuningConfig.quantize`, `policy_quantize` for the policy); otherwise (a
    full RM, another base or quantisation, or a fully tuned policy whose backbone moves) it gets
    its own frozen backbone, quantised as the reward model trained. An ensemble workdir (`train_reward_ensemble`) gives a
    `RewardEnsemble` of its members, all on that one backbone, combined by `rule` (default mean);
    `rule` is an error for a single reward model.
    """
    info = read_run_info(rm_workdir)
    if info is None:
        raise FileNotFoundError(f"{rm_workdir}: no run_info.json; expected the workdir of a reward-model run")
    stage = info.get("stage")
    if stage not in ("reward_model", ENSEMBLE_STAGE):
        raise RewardModelMismatch(f"{rm_workdir}/run_info.json: stage is {stage!r}, not a reward model")
    if rule is not None and stage != ENSEMBLE_STAGE:
        raise RewardModelMismatch(f"{rm_workdir} holds one reward model, not an ensemble; an ensemble rule "
                                  f"({rule}) applies only to a train_reward_ensemble workdir")
    shared = (info["tuning"] == "lora" and same_model(info["model"], policy_model) and policy_tuning == "lora"
              and info.get("quantize") == policy_quantize)
    rm_backbone = backbone if shared else _own_backbone(info, tokenizer, rm_workdir, policy_model, dtype)
    where = "shares the policy backbone" if shared else "own backbone"
    if stage == ENSEMBLE_STAGE:
        rule = rule or EnsembleRule()
        stats = info.get("member_stats")
        if rule.standardise and stats is None:
            raise RewardModelMismatch(
                f"{rm_workdir}/run_info.json has no member_stats (the members' held-out means and stds), which "
                f"the rule {rule} needs to standardise their scores: it was written before they were recorded. "
                "Run train_reward_ensemble on it again (finished members are skipped: only WARM and the scoring "
                "rerun; inside a staged experiment, delete its DONE first), or use EnsembleRule(standardise=False) "
                "for raw scores")
        members = restore_members(rm_backbone, member_dirs(rm_workdir, info))
        print(f"reward ensemble from {rm_workdir}: {len(members)} members, rule {rule.rule}"
              f"{f' (penalty {rule.penalty:g})' if rule.rule == 'mean_minus_std' else ''}"
              f"{', standardised' if rule.standardise else ', raw scores'}, {where}")
        return RewardEnsemble(members, rule=rule, stats=stats)
    rm, step = restore_reward_model(rm_backbone, rm_workdir, info)
    print(f"reward model from {rm_workdir} (step {step}, {info['tuning']}, {where})")
    return rm


def rl_trainable_filter(tuning: TuningConfig, rl: RLConfig, adapter: str = "policy"):
    """The policy adapter (LoRA) or the policy's parameters (full), and PPO's value adapter/model and head."""
    if tuning.mode == "lora":
        adapters = lora.adapter_filter(adapter, "value") if rl.algorithm == "ppo" else lora.adapter_filter(adapter)
        return nnx.Any(adapters, nnx.All(nnx.Param, nnx.PathContains("value")))
    return nnx.All(nnx.Param, nnx.Any(nnx.PathContains("policy"), nnx.PathContains("value")))


@functools.partial(jax.jit, static_argnums=(0, 6))
def _eval_rollout(graphdef, trainable, frozen, prompt_PxT, prompt_mask_PxT, rng, static):
    """Responses of the policy (or the anchor) on eval prompts (greedy at temperature 0), and their rewards."""
    reward_fn, eos_ids, pad_id, max_new_tokens, use_anchor, temperature = static
    ro = rollout(nnx.merge(graphdef, trainable, frozen), prompt_PxT, prompt_mask_PxT, rng,
                 SamplingConfig(max_new_tokens=max_new_tokens, temperature=temperature), reward_fn=reward_fn,
                 eos_ids=eos_ids, pad_id=pad_id, use_anchor=use_anchor)
    return ro.tokens_BxN, ro.mask_BxN, ro.rewards_B


EVAL_PROMPTS = "eval_prompts.jsonl"


def split_prompts(prompts: D.Loaded, tokenizer, data: DataConfig) -> tuple[tuple[str, ...], list, list]:
    """(distinct prompt texts, train ids, held-out ids): `[BOS] prompt` cut from the left, then a seeded split."""
    texts = D.prompts_of(prompts.examples)
    if not texts:
        raise D.DataError(f"{prompts.source}: no prompts")
    options = D.TokenizeOptions(max_prompt_len=data.max_prompt_len, max_response_len=1)
    ids, stats = D.tokenize_prompts(texts, tokenizer, options)
    print(f"prompts {prompts.source}: {stats.kept}/{stats.examples} kept, {stats.prompts_truncated} truncated "
          f"from the left to {data.max_prompt_len} tokens, {stats.dropped_empty} empty dropped")
    train_ids, eval_ids = D.train_eval_split(list(ids), eval_size=data.eval_size, seed=data.split_seed)
    return texts, train_ids, eval_ids


def write_eval_prompts(path: str, eval_ids, tokenizer) -> None:
    """The held-out prompts as text, one `{prompt}` line each, as the policy saw them (already cut
    from the left to `max_prompt_len`): `read_prompts_jsonl` gives them to a judged evaluation."""
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        for ids in eval_ids:
            f.write(json.dumps({"prompt": tokenizer.decode(list(ids), skip_special_tokens=True)}) + "\n")
    os.replace(tmp, path)


def train_policy(*, workdir: str, prompts: D.Loaded, model: str = "tiny", dtype: str = "float32",
                 tuning: TuningConfig = TuningConfig(), rl: RLConfig = RLConfig(),
                 optimizer: OptimizerConfig = OptimizerConfig(), loop: LoopConfig = LoopConfig(),
                 data: DataConfig = DataConfig(), reward_model: str | None = None,
                 reward_fn: Callable | None = None, adapter: str = "policy", eval_temperature: float = 0.0,
                 eval_samples: int = 1, reward_rule: EnsembleRule | None = None,
                 plan: Callable[..., dict] | None = None) -> dict:
    """Optimise a policy with REINFORCE/ReMax/RLOO/GRPO against `reward_model` (an RM workdir) or `reward_fn`.

    `reward_model` may be an ensemble workdir (`train_reward_ensemble`): its members score every
    response and `reward_rule` combines them (mean by default; mean - penalty * std; min).

    `reward_fn(prompt_BxT, prompt_mask_BxT, response_BxN, response_mask_BxN) -> rewards_B` must be
    traceable by JAX (it runs inside the compiled step). Evaluation: responses on held-out prompts
    (greedy, or `eval_samples` samples each at `eval_temperature`), their mean reward against the
    starting policy's, written to `samples_<step>.jsonl`. The held-out prompts themselves go to
    `eval_prompts.jsonl`, for a judged comparison on prompts the policy never trained on.
    """
    if plan is not None:  # compile the step from shapes (`train_reward_model` says how); train nothing
        return plan(workdir, stage="rl", model=model, dtype=dtype, tuning=tuning, loop=loop,
                    prompt_len=data.max_prompt_len, response_len=rl.max_new_tokens, optimizer=optimizer,
                    algorithm=rl.algorithm)
    if (reward_model is None) == (reward_fn is None):
        raise ValueError("train_policy needs exactly one of reward_model (an RM workdir) or reward_fn")
    if data.train_fraction != 1.0:
        raise ValueError(f"train_policy: DataConfig.train_fraction={data.train_fraction!r} subsets the pairs or "
                         "demonstrations of supervised runs; RL trains on all its prompts (pass fewer to use fewer)")
    # MODELS: one backbone for policy and anchor (and the reward model when it shares the base)
    # QLoRA: policy, anchor and a shared reward model read one quantised copy
    backbone, tokenizer = load_backbone(model, dtype, quantize=tuning.quantize)
    backbone.remat = tuning.remat
    if tuning.quantize is not None:
        print(f"[{adapter}] backbone projections stored {tuning.quantize}: {quant.projection_bytes(backbone)}")
    anchor = None
    if tuning.mode == "lora":
        print(f"[{adapter}] {lora.add_lora(backbone, adapter, tuning.lora)}")
    else:
        anchor, _ = load_backbone(model, dtype)  # fully tuned policy: the anchor is a frozen copy
    rm = None if reward_model is None else attach_reward_model(backbone, tokenizer, reward_model,
                                                               policy_model=model, dtype=dtype,
                                                               policy_tuning=tuning.mode, rule=reward_rule,
                                                               policy_quantize=tuning.quantize)
    value = None
    if rl.algorithm == "ppo":  # PPO's value model: a `value` adapter + head on the backbone, or a full copy
        if tuning.mode == "lora":
            lora.add_lora(backbone, "value", tuning.lora)
            value = RewardModel(backbone, adapters=("value",))
        else:
            value = RewardModel(load_backbone(model, dtype)[0])
    modules = RLModules(backbone, policy_adapters=(adapter,) if tuning.mode == "lora" else (), anchor=anchor,
                        reward=rm, value=value)

    # PROMPTS
    texts, train_ids, eval_ids = split_prompts(prompts, tokenizer, data)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    collate = functools.partial(D.batch_prompts, prompt_len=data.max_prompt_len, pad_id=pad_id)
    train_iter = D.BatchIterator(train_ids, loop.batch_size, collate, seed=loop.seed,
                                 process_index=jax.process_index(), process_count=jax.process_count())
    eval_items = eval_ids[: loop.max_eval_examples] if loop.max_eval_examples else eval_ids
    eval_batch = collate([p for p in eval_items for _ in range(eval_samples)])
    eos_ids = tuple(backbone.config.eos_token_ids) or ((tokenizer.eos_token_id,) if tokenizer.eos_token_id is not None
                                                        else ())

    # STATE: what trains, its optimizer state, the REINFORCE baseline and the RNG (as key data, to checkpoint)
    filter_ = rl_trainable_filter(tuning, rl, adapter)
    graphdef, trainable, frozen = nnx.split(modules, filter_, ...)
    trainable, precision = master_weights(trainable)  # full tuning in bf16: fp32 masters (`train.precision`)
    if precision.mixed:
        nnx.update(modules, trainable)  # the modules hold the masters, not a second (bf16) copy
        print(f"mixed precision: {precision.describe(trainable)}")
    tx = guard_nonfinite(make_optimizer(optimizer, loop.num_steps))
    rl_state = {"baseline": jnp.zeros((), jnp.float32)}
    fresh = train_iter.state()
    example = next(train_iter)  # one batch's shapes; the iterator is rewound below
    train_iter.restore(fresh)
    stepper = sharded_rl_step(loop.mesh, graphdef=graphdef, tx=tx, cfg=rl, trainable=trainable,
                              opt_state=jax.eval_shape(tx.init, trainable), frozen=frozen, rl_state=rl_state,
                              batch=example, reward_fn=reward_fn, eos_ids=eos_ids, pad_id=pad_id,
                              precision=precision)
    trainable, _, frozen = stepper.place(trainable, None, frozen)
    state = {"trainable": trainable, "opt_state": stepper.init_opt_state(tx, trainable), "rl_state": rl_state,
             "rng": jax.random.key_data(jax.random.key(loop.seed))}
    run_info = {"stage": "rl", "algorithm": rl.algorithm, "model": model, "dtype": dtype, "tuning": tuning.mode,
                "quantize": tuning.quantize,
                "adapter": adapter, "lora": dataclasses.asdict(tuning.lora) if tuning.mode == "lora" else None,
                "reward_model": reward_model, "rl": dataclasses.asdict(rl),
                "reward_rule": dataclasses.asdict(rm.rule) if isinstance(rm, RewardEnsemble) else None,
                "prompts": len(texts), "train_prompts": len(train_ids), "eval_prompts": len(eval_items)}
    run_info["identity"] = run_identity(
        stage="rl", model=model, dtype=dtype, tuning=tuning, adapter=adapter, source=prompts.source, data=data,
        loop=loop, train_examples=len(train_ids), eval_examples=len(eval_ids), algorithm=rl.algorithm,
        rl=dataclasses.asdict(rl), reward_model=None if reward_model is None else os.path.abspath(reward_model),
        reward_fn=None if reward_fn is None else getattr(reward_fn, "__qualname__", repr(reward_fn)),
        **({"reward_rule": dataclasses.asdict(rm.rule)} if isinstance(rm, RewardEnsemble) else {}))

    def step(state, batch):
        rng, step_rng = jax.random.split(jax.random.wrap_key_data(state["rng"]))
        trainable, opt_state, rl_state, metrics = stepper(state["trainable"], state["opt_state"], frozen,
                                                          state["rl_state"], batch, step_rng)
        return {"trainable": trainable, "opt_state": opt_state, "rl_state": rl_state,
                "rng": jax.random.key_data(rng)}, metrics

    def place(restored):
        trainable, opt_state, _ = stepper.place(restored["trainable"], restored["opt_state"], None)
        return {**restored, "trainable": trainable, "opt_state": opt_state}

    # EVALUATION: greedy responses to the held-out prompts, their rewards, samples_<step>.jsonl to read
    def responses(trainable, step, use_anchor=False):
        static = (reward_fn, eos_ids, pad_id, rl.max_new_tokens, use_anchor, float(eval_temperature))
        tokens, mask, rewards = _eval_rollout(graphdef, precision.cast(trainable), frozen,
                                              eval_batch["prompt_BxT"], eval_batch["prompt_mask_BxT"],
                                              jax.random.key(0), static)
        rewards = np.asarray(rewards)
        if jax.process_index() == 0:
            with open(os.path.join(workdir, f"samples_{step}.jsonl"), "w") as f:
                for i, r in enumerate(rewards):
                    prompt = [t for t, m in zip(eval_batch["prompt_BxT"][i], eval_batch["prompt_mask_BxT"][i]) if m]
                    resp = np.asarray(tokens[i])[np.asarray(mask[i])].tolist()
                    f.write(json.dumps({"prompt": tokenizer.decode(prompt, skip_special_tokens=True),
                                        "response": tokenizer.decode(resp, skip_special_tokens=True),
                                        "reward": float(r)}) + "\n")
        return float(rewards.mean())

    start = {}

    def on_start(state, _):  # the starting policy (adapters off): samples_0.jsonl
        if jax.process_index() == 0:
            write_eval_prompts(os.path.join(workdir, EVAL_PROMPTS), eval_ids, tokenizer)
        start["reward"] = responses(state["trainable"], 0, use_anchor=True)

    def evaluate(state, step):
        reward = responses(state["trainable"], step)
        return {"reward": reward, "start_reward": start["reward"], "reward_gain": reward - start["reward"]}

    # LOOP
    job = Job(state=state, step=step, batches=train_iter, evaluate=evaluate, place=place, info=run_info,
              examples=lambda _: loop.batch_size, memory=stepper.memory(), on_start=on_start,
              progress_keys=("reward_mean", "kl"))
    state, summary = train_loop(workdir, loop, job)
    nnx.update(modules, state["trainable"])
    return summary
