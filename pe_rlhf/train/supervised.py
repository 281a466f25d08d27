"""The supervised stages of PE-RLHF: SFT and reward models (pairwise or classification), LoRA or full.

`train_reward_model` and `train_sft` read top to bottom in the order of the run:
build the model, tokenise the data, split trainable from frozen, restore or
start, then loop (step, log, evaluate, checkpoint) and finish with a summary.
This module and `experiments/run.py` are the only places with host I/O.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
from typing import Any, Callable, Sequence

import jax
import numpy as np
from flax import nnx

from pe_rlhf import data as D
from pe_rlhf.checkpoints.export import export_merged
from pe_rlhf.checkpoints.load import load_backbone
from pe_rlhf.checkpoints.orbax_io import RunCheckpointer
from pe_rlhf.models import lora, quant
from pe_rlhf.models.heads import RewardModel
from pe_rlhf.train import metrics as M
from pe_rlhf.train import supervised_steps
from pe_rlhf.train.config import DataConfig, LoopConfig, TuningConfig  # noqa: F401 (re-exported)
from pe_rlhf.train.loop import Job, train_loop
from pe_rlhf.train.optim import OptimizerConfig, guard_nonfinite, make_optimizer
from pe_rlhf.train.precision import master_weights
from pe_rlhf.train.records import lora_config_of, run_identity
from pe_rlhf.train.sharded import sharded_train_step
from pe_rlhf.train.supervised_losses import token_logprobs

log = logging.getLogger(__name__)


# -- what trains ------------------------------------------------------------------------------
def trainable_filter(tuning: TuningConfig, adapter: str):
    """Adapter + heads in LoRA mode; every parameter when fully tuning."""
    if tuning.mode == "full":
        return nnx.Param
    return nnx.Any(lora.adapter_filter(adapter), nnx.PathContains("head"))


def prepare(module: nnx.Module, backbone, tuning: TuningConfig, adapter: str) -> None:
    """Quantise the frozen projections (`tuning.quantize`), add the adapter for LoRA mode, set
    rematerialisation, and log what trains."""
    backbone.remat = tuning.remat
    if tuning.quantize is not None:
        quant.quantize_projections(backbone, tuning.quantize)
        print(f"[{adapter}] backbone projections stored {tuning.quantize}: {quant.projection_bytes(backbone)}")
    if tuning.mode == "lora":
        count = lora.add_lora(backbone, adapter, tuning.lora)
        log.info("trainable: %s", count)
        print(f"[{adapter}] LoRA rank {tuning.lora.rank} on {tuning.lora.targets}: {count}")
    else:
        n = sum(x.size for x in jax.tree.leaves(nnx.state(module, nnx.Param)))
        print(f"[{adapter}] full fine-tuning: {n:,} trainable parameters")


def reward_model(backbone, tuning: TuningConfig, adapter: str) -> RewardModel:
    """The reward model `train_reward_model` trains: `backbone` with a scalar head and, in LoRA mode, the
    adapter `adapter` (`prepare`). Profiling builds the same one from shapes to plan its step."""
    rm = RewardModel(backbone, adapters=(adapter,) if tuning.mode == "lora" else None)
    prepare(rm, backbone, tuning, adapter)
    return rm


def restore_reward_model(backbone, workdir: str, info: dict) -> tuple[RewardModel, int]:
    """(the reward model trained in `workdir`, its step): its adapter (LoRA) and head added to `backbone` and
    restored from the latest checkpoint; `info` is the workdir's run record."""
    adapter, cfg = info["adapter"], lora_config_of(info)
    if cfg is not None:
        lora.add_lora(backbone, adapter, cfg)
    rm = RewardModel(backbone, adapters=(adapter,) if cfg is not None else None)
    ckpt = RunCheckpointer(os.path.join(workdir, "checkpoints"))
    try:
        step = ckpt.restore_module(rm, trainable_filter(TuningConfig(mode=info["tuning"]), adapter),
                                   what="reward-model")
    finally:
        ckpt.close()
    return rm, step


# -- the generic loop ---------------------------------------------------------------------------
def fit(module: nnx.Module, *, filter_, loss_fn: Callable, train_iter: D.BatchIterator,
        evaluate: Callable[[Any, Any, Any], dict], optimizer: OptimizerConfig, loop: LoopConfig,
        workdir: str, run_info: dict) -> dict:
    """Train `module`'s `filter_` partition on `train_iter` through `train_loop`; returns the summary.

    `evaluate(graphdef, trainable, frozen) -> metrics` runs on the held-out set (the trainable weights in the
    model dtype). Resumes from the latest checkpoint in `workdir/checkpoints` (step, optimizer state and data
    position), so a killed run continues exactly; `module` ends with the trained weights. Trainable weights
    stored below fp32 (full tuning in bf16) train as fp32 masters (`precision.master_weights`): the state,
    the checkpoints and the weights `module` ends with are the masters.
    """
    graphdef, trainable, frozen = nnx.split(module, filter_, ...)
    trainable, precision = master_weights(trainable)
    if precision.mixed:
        nnx.update(module, trainable)  # the module holds the masters, not a second (bf16) copy
        print(f"mixed precision: {precision.describe(trainable)}")
    tx = guard_nonfinite(make_optimizer(optimizer, loop.num_steps))
    fresh = train_iter.state()
    example = next(train_iter)  # one batch's shapes; the iterator is rewound below
    train_iter.restore(fresh)
    stepper = sharded_train_step(loop.mesh, graphdef=graphdef, tx=tx, loss_fn=loss_fn, trainable=trainable,
                                 opt_state=jax.eval_shape(tx.init, trainable), frozen=frozen, batch=example,
                                 precision=precision)
    trainable, _, frozen = stepper.place(trainable, None, frozen)

    def step(state, batch):
        trainable, opt_state, metrics = stepper(state["trainable"], state["opt_state"], frozen, batch)
        return {"trainable": trainable, "opt_state": opt_state}, metrics

    def place(state):
        trainable, opt_state, _ = stepper.place(state["trainable"], state["opt_state"], None)
        return {"trainable": trainable, "opt_state": opt_state}

    def examples(batch) -> int:
        return int(np.sum(batch["valid_RxP"])) if "valid_RxP" in batch else loop.batch_size

    job = Job(state={"trainable": trainable, "opt_state": stepper.init_opt_state(tx, trainable)}, step=step,
              batches=train_iter,
              evaluate=lambda state, _: evaluate(graphdef, precision.cast(state["trainable"]), frozen),
              place=place, info=run_info, examples=examples, memory=stepper.memory())
    state, summary = train_loop(workdir, loop, job)
    nnx.update(module, state["trainable"])
    return summary


def _eval_batches(items: Sequence, loop: LoopConfig, collate, fits=None) -> D.BatchIterator:
    items = list(items)[: loop.max_eval_examples] if loop.max_eval_examples else list(items)
    return D.BatchIterator(items, min(loop.eval_batch_size, len(items)), collate, shuffle=False,
                           num_epochs=1, drop_remainder=False, fits=fits)


def _packed(data: DataConfig, loop: LoopConfig, pairwise: bool, pad_id: int, center_coef: float):
    """(batching, loss_fn, span) of packed reward-model batches (`pe_rlhf.data.packing`)."""
    from pe_rlhf.data import packing

    batch_sizes = {"LoopConfig.batch_size": loop.batch_size, "LoopConfig.eval_batch_size": loop.eval_batch_size}
    for name, size in batch_sizes.items():
        if size % data.pack_rows:
            raise ValueError(f"{name}={size} must be a multiple of DataConfig.pack_rows={data.pack_rows}: "
                             "each packed row holds an equal share of a batch's items")
    responses = 2 if pairwise else 1
    span = packing.span(data.max_prompt_len, data.max_response_len, responses, data.pack_share_prompt)
    longest = packing.longest(data.max_prompt_len, data.max_response_len, responses, data.pack_share_prompt)
    if data.pack_length < longest:
        how = (f"max_prompt_len + {responses} x max_response_len" if data.pack_share_prompt else
               f"{responses} x (max_prompt_len + max_response_len), pack_share_prompt=False")
        raise ValueError(f"DataConfig.pack_length={data.pack_length} is shorter than the longest item the "
                         f"config allows ({longest} tokens = {how}); raise it")

    def batching(size):  # (collate, fits) of batches of up to `size` items: one shape for each size
        options = packing.PackOptions(rows=data.pack_rows, length=data.pack_length,
                                      items_per_row=size // data.pack_rows, share_prompt=data.pack_share_prompt)
        return (functools.partial(packing.pack, options=options, pad_id=pad_id),
                functools.partial(packing.fits, options=options))

    if pairwise:
        loss_fn = functools.partial(supervised_steps.packed_pairwise_reward_loss, span=span, center_coef=center_coef)
    else:
        loss_fn = functools.partial(supervised_steps.packed_classification_reward_loss, span=span)
    return batching, loss_fn, span


def _split(examples, data: DataConfig, loop: LoopConfig, group=None):
    """The held-out part (`DataConfig.eval_size`, `split_seed`) and the training part, of which a run keeps
    `DataConfig.train_fraction` (drawn with `LoopConfig.seed`, in the original order)."""
    train, held = D.train_eval_split(list(examples), eval_size=data.eval_size, seed=data.split_seed, group=group)
    if data.train_fraction < 1.0:
        n = max(1, round(data.train_fraction * len(train)))
        keep = np.sort(np.random.default_rng(loop.seed).permutation(len(train))[:n])
        train = [train[i] for i in keep]
    return train, held


def _tokenize_options(data: DataConfig) -> D.TokenizeOptions:
    return D.TokenizeOptions(max_prompt_len=data.max_prompt_len, max_response_len=data.max_response_len,
                             eos_id=data.eos_id, drop_long_responses=data.drop_long_responses)


def _pad_id(tokenizer) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0


# -- reward models ------------------------------------------------------------------------------
@functools.partial(jax.jit, static_argnums=0)
def _score(graphdef, trainable, frozen, tokens_BxT, mask_BxT):
    return nnx.merge(graphdef, trainable, frozen)(tokens_BxT, mask_BxT)


@functools.partial(jax.jit, static_argnums=(0, 4))
def _score_packed(graphdef, trainable, frozen, batch, span):
    return nnx.merge(graphdef, trainable, frozen).score_packed(batch, span)


def _packed_scores(graphdef, trainable, frozen, batches, span: int, value_key: str) -> tuple[np.ndarray, np.ndarray]:
    """Scores [n, K] and `value_key` values [n] (margins or labels) of every packed batch's real items."""
    scores, values = [], []
    for b in batches:
        keep = b["valid_RxP"] > 0
        scores.append(np.asarray(_score_packed(graphdef, trainable, frozen, b, span))[keep])
        values.append(b[value_key][keep])
    return np.concatenate(scores), np.concatenate(values)


def score_pairs(graphdef, trainable, frozen, batches, span: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Chosen and rejected scores of every real pair (padded batches, or packed ones with `span`)."""
    if span is not None:
        scores_nx2, _ = _packed_scores(graphdef, trainable, frozen, batches, span, "margin_RxP")
        return scores_nx2[:, 0], scores_nx2[:, 1]
    chosen, rejected = [], []
    for b in batches:
        keep = b["valid_B"] > 0
        chosen.append(np.asarray(_score(graphdef, trainable, frozen, b["chosen_tokens_BxT"], b["chosen_mask_BxT"]))[keep])
        rejected.append(np.asarray(_score(graphdef, trainable, frozen, b["rejected_tokens_BxT"],
                                          b["rejected_mask_BxT"]))[keep])
    return np.concatenate(chosen), np.concatenate(rejected)


def score_labeled(graphdef, trainable, frozen, batches, span: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Scores and labels of every real example (padded batches, or packed ones with `span`)."""
    if span is not None:
        scores_nx1, labels = _packed_scores(graphdef, trainable, frozen, batches, span, "label_RxP")
        return scores_nx1[:, 0], labels
    scores, labels = [], []
    for b in batches:
        keep = b["valid_B"] > 0
        scores.append(np.asarray(_score(graphdef, trainable, frozen, b["tokens_BxT"], b["mask_BxT"]))[keep])
        labels.append(b["label_B"][keep])
    return np.concatenate(scores), np.concatenate(labels)


@dataclasses.dataclass(frozen=True)
class RewardData:
    """A reward dataset tokenised, split and laid out for training and evaluation (`reward_data`)."""

    pairwise: bool
    train_items: list
    eval_items: list
    stats: Any
    collate: Callable
    fits: Callable | None
    eval_collate: Callable
    eval_fits: Callable | None
    loss_fn: Callable
    span: int | None

    def eval_scores(self, graphdef, trainable, frozen, loop: LoopConfig) -> tuple[np.ndarray, np.ndarray]:
        """(chosen, rejected) scores of the held-out pairs, or (scores, labels) of the held-out examples."""
        batches = _eval_batches(self.eval_items, loop, self.eval_collate, self.eval_fits)
        score = score_pairs if self.pairwise else score_labeled
        return score(graphdef, trainable, frozen, batches, self.span)


def reward_data(dataset: D.Loaded, tokenizer, data: DataConfig, loop: LoopConfig, center_coef: float = 0.0
                ) -> RewardData:
    """Tokenise `dataset` (pairs: Bradley-Terry; 0/1 labels: BCE), split off the held-out part and choose the
    batch layout (padded, or packed with `DataConfig.pack_length`) and the loss that goes with it."""
    examples = list(dataset.examples)
    if not examples:
        raise D.DataError(f"{dataset.source}: the dataset is empty")
    pairwise = isinstance(examples[0], D.PreferenceExample)
    options = _tokenize_options(data)
    seq_len = data.max_prompt_len + data.max_response_len
    pad = _pad_id(tokenizer)
    if pairwise:
        tokenized, stats = D.tokenize_preferences(examples, tokenizer, options)
        collate = functools.partial(D.batch_preferences, seq_len=seq_len, pad_id=pad, padding=data.padding)
        train_items, eval_items = _split(tokenized, data, loop)
        loss_fn = functools.partial(supervised_steps.pairwise_reward_loss, center_coef=center_coef)
    else:
        tokenized, stats = D.tokenize_labeled(examples, tokenizer, options)
        collate = functools.partial(D.batch_labeled, seq_len=seq_len, pad_id=pad, padding=data.padding)
        train_items, eval_items = _split(tokenized, data, loop, group=lambda e: e.prompt)
        loss_fn = supervised_steps.classification_reward_loss
    print(f"data {dataset.source}: {stats.summary()}; train {len(train_items)}, eval {len(eval_items)}")
    span, fits, eval_collate, eval_fits = None, None, collate, None
    if data.pack_length is not None:
        batching, loss_fn, span = _packed(data, loop, pairwise, pad, center_coef)
        (collate, fits), (eval_collate, eval_fits) = batching(loop.batch_size), batching(loop.eval_batch_size)
    return RewardData(pairwise=pairwise, train_items=train_items, eval_items=eval_items, stats=stats,
                      collate=collate, fits=fits, eval_collate=eval_collate, eval_fits=eval_fits, loss_fn=loss_fn,
                      span=span)


def train_reward_model(*, workdir: str, dataset: D.Loaded, model: str = "tiny", dtype: str = "float32",
                       tuning: TuningConfig = TuningConfig(), optimizer: OptimizerConfig = OptimizerConfig(),
                       loop: LoopConfig = LoopConfig(), data: DataConfig = DataConfig(),
                       center_coef: float = 0.0, adapter: str = "reward", plan: Callable[..., dict] | None = None
                       ) -> dict:
    """Train a reward model: Bradley-Terry on preference pairs, or BCE on 0/1-labelled responses.

    The kind follows the dataset's examples (`PreferenceExample` or `LabeledExample`). With `plan`
    (`run.py --compile_only` passes `pe_rlhf.profiling.plan.plan_report` for a target) nothing trains:
    `plan(workdir, stage=..., model=..., ...)` compiles the step from shapes alone and its report is returned.
    """
    if plan is not None:
        return plan(workdir, stage="reward_model", model=model, dtype=dtype, tuning=tuning, loop=loop,
                    prompt_len=data.max_prompt_len, response_len=data.max_response_len, optimizer=optimizer)
    backbone, tokenizer = load_backbone(model, dtype)
    rd = reward_data(dataset, tokenizer, data, loop, center_coef)
    rm = reward_model(backbone, tuning, adapter)
    pairwise, train_items, eval_items, stats, span = rd.pairwise, rd.train_items, rd.eval_items, rd.stats, rd.span
    train_iter = D.BatchIterator(train_items, loop.batch_size, rd.collate, seed=loop.seed,
                                 process_index=jax.process_index(), process_count=jax.process_count(), fits=rd.fits)

    def evaluate(graphdef, trainable, frozen):
        return M.reward_metrics(rd.pairwise, *rd.eval_scores(graphdef, trainable, frozen, loop))

    run_info = {"stage": "reward_model", "kind": "pairwise" if pairwise else "classification", "model": model,
                "dtype": dtype, "tuning": tuning.mode, "quantize": tuning.quantize, "adapter": adapter,
                "lora": dataclasses.asdict(tuning.lora) if tuning.mode == "lora" else None,
                "data_stats": dataclasses.asdict(stats), "train_examples": len(train_items),
                "eval_examples": len(eval_items), "skipped_identical": dataset.skipped_identical,
                "skipped_long": dataset.skipped_long,
                "packing": {"length": data.pack_length, "rows": data.pack_rows, "span": span,
                            "share_prompt": data.pack_share_prompt} if span else None}
    run_info["identity"] = run_identity(stage="reward_model", model=model, dtype=dtype, tuning=tuning, adapter=adapter,
                                        source=dataset.source, data=data, loop=loop, train_examples=len(train_items),
                                        eval_examples=len(eval_items), kind=run_info["kind"])
    return fit(rm, filter_=trainable_filter(tuning, adapter), loss_fn=rd.loss_fn, train_iter=train_iter,
               evaluate=evaluate, optimizer=optimizer, loop=loop, workdir=workdir, run_info=run_info)


# -- SFT ------------------------------------------------------------------------------------------
@functools.partial(jax.jit, static_argnums=0)
def _sft_eval(graphdef, trainable, frozen, batch):
    model = nnx.merge(graphdef, trainable, frozen)
    logits = model(batch["tokens_BxT"], input_mask_BxT=batch["mask_BxT"].astype(bool))
    logp = token_logprobs(logits[:, :-1], batch["tokens_BxT"][:, 1:])
    mask = batch["response_mask_BxT"][:, 1:] * batch["valid_B"][:, None]
    return -(logp * mask).sum(), mask.sum()


def train_sft(*, workdir: str, dataset: D.Loaded, model: str = "tiny", dtype: str = "float32",
              tuning: TuningConfig = TuningConfig(), optimizer: OptimizerConfig = OptimizerConfig(),
              loop: LoopConfig = LoopConfig(), data: DataConfig = DataConfig(), adapter: str = "policy",
              export: bool = True) -> dict:
    """Supervised fine-tuning on prompt/response pairs; the loss counts response tokens only.

    With `export`, the tuned model (LoRA merged into the base) is written to
    `workdir/export` as a Hugging Face checkpoint: the RL stage starts from it.
    """
    examples = list(dataset.examples)
    if not examples:
        raise D.DataError(f"{dataset.source}: the dataset is empty")
    if isinstance(examples[0], D.PreferenceExample):
        examples = list(D.sft_from_preferences(examples))
    elif isinstance(examples[0], D.LabeledExample):
        examples = list(D.sft_from_labeled(examples))
    backbone, tokenizer = load_backbone(model, dtype)
    prepare(backbone, backbone, tuning, adapter)
    tokenized, stats = D.tokenize_sft(examples, tokenizer, _tokenize_options(data))
    seq_len = data.max_prompt_len + data.max_response_len
    collate = functools.partial(D.batch_sft, seq_len=seq_len, pad_id=_pad_id(tokenizer), padding=data.padding)
    train_items, eval_items = _split(tokenized, data, loop)
    print(f"data {dataset.source}: {stats.summary()}; train {len(train_items)}, eval {len(eval_items)}")
    train_iter = D.BatchIterator(train_items, loop.batch_size, collate, seed=loop.seed,
                                 process_index=jax.process_index(), process_count=jax.process_count())

    def evaluate(graphdef, trainable, frozen):
        nll, count = 0.0, 0.0
        for b in _eval_batches(eval_items, loop, collate):
            s, c = _sft_eval(graphdef, trainable, frozen, b)
            nll, count = nll + float(s), count + float(c)
        loss = nll / max(count, 1.0)
        return {"loss": loss, "perplexity": float(np.exp(loss)), "tokens": count}

    run_info = {"stage": "sft", "model": model, "dtype": dtype, "tuning": tuning.mode, "quantize": tuning.quantize,
                "adapter": adapter,
                "lora": dataclasses.asdict(tuning.lora) if tuning.mode == "lora" else None,
                "data_stats": dataclasses.asdict(stats), "train_examples": len(train_items),
                "eval_examples": len(eval_items)}
    run_info["identity"] = run_identity(stage="sft", model=model, dtype=dtype, tuning=tuning, adapter=adapter,
                                        source=dataset.source, data=data, loop=loop, train_examples=len(train_items),
                                        eval_examples=len(eval_items))
    loss_fn = functools.partial(supervised_steps.sft_loss, response_window=data.max_response_len)
    summary = fit(backbone, filter_=trainable_filter(tuning, adapter), loss_fn=loss_fn,
                  train_iter=train_iter, evaluate=evaluate, optimizer=optimizer, loop=loop, workdir=workdir,
                  run_info=run_info)
    if export and jax.process_index() == 0:
        adapters = (adapter,) if tuning.mode == "lora" else ()
        summary["export"] = export_merged(backbone, os.path.join(workdir, "export"), *adapters, tokenizer=tokenizer)
    return summary
