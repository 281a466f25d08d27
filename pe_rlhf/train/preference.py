"""Direct preference optimisation of a policy on preference pairs: DPO and IPO, no reward model, no sampling.

`train_dpo` reads in the order of the run: build the backbone and the policy adapter, tokenise the
pairs, then `supervised.fit` (restore or start, step, log, evaluate, checkpoint). The reference model
costs nothing in LoRA mode: it is the same backbone with every adapter off, scored in the same jitted
step as the policy (`supervised_steps.preference_loss`). A fully tuned policy needs a frozen copy of
the base weights as its reference (twice the parameter memory), as full-tuning RL does.

The workdir is recorded as a policy run (`stage: "rl"`, `algorithm: "dpo"` or `"ipo"`) laid out like
an RL run's (`RLModules`, the policy's parameters under `policy.`), so everything that loads a trained
policy, `winrate.load_policy`, `runs.load_run`, the HH experiment's evaluation, loads it as it loads
the RL lines.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable, Sequence

import jax
import numpy as np
from flax import nnx

from pe_rlhf import data as D
from pe_rlhf.checkpoints.load import load_backbone
from pe_rlhf.models import lora
from pe_rlhf.train import supervised_steps
from pe_rlhf.train.config import DataConfig, LoopConfig, TuningConfig
from pe_rlhf.train.optim import OptimizerConfig
from pe_rlhf.train.records import run_identity
from pe_rlhf.train.rollout import RLModules
from pe_rlhf.train.supervised import _eval_batches, _pad_id, _split, _tokenize_options, fit
from pe_rlhf.train.supervised_losses import PREFERENCE_LOSSES


def batch_pairs(pairs: Sequence[D.TokenizedPair], *, prompt_len: int, response_len: int,
                pad_id: int = 0) -> dict[str, np.ndarray]:
    """Tokenised pairs in the RL layout: prompt_BxT left-padded to `prompt_len` (the response starts at
    the same column in every row), chosen_BxN and rejected_BxN right-padded to `response_len`, with masks."""
    batch = D.batch_prompts([p.prompt for p in pairs], prompt_len=prompt_len, pad_id=pad_id)
    for side in ("chosen", "rejected"):
        arrays = D.pad_sequences([((), getattr(p, side)) for p in pairs], seq_len=response_len, pad_id=pad_id)
        batch[f"{side}_BxN"], batch[f"{side}_mask_BxN"] = arrays["tokens_BxT"], arrays["mask_BxT"]
    return batch


def policy_filter(tuning: TuningConfig, adapter: str):
    """What trains in an `RLModules`: the policy adapter (LoRA), or every parameter of the policy (full)."""
    if tuning.mode == "lora":
        return lora.adapter_filter(adapter)
    return nnx.All(nnx.Param, nnx.PathContains("policy"))


def check_options(*, beta: float, loss: str, label_smoothing: float) -> None:
    if loss not in PREFERENCE_LOSSES:
        raise ValueError(f"train_dpo.loss={loss!r}: expected one of {PREFERENCE_LOSSES}")
    if not beta > 0:
        raise ValueError(f"train_dpo.beta={beta!r}: expected a number > 0 (DPO's usual value is 0.1)")
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"train_dpo.label_smoothing={label_smoothing!r}: expected 0 <= label_smoothing < 0.5 "
                         "(the probability that a preference label is flipped)")
    if loss == "ipo" and label_smoothing:
        raise ValueError(f"train_dpo.label_smoothing={label_smoothing!r} applies to loss='dpo' only (conservative "
                         "DPO); IPO has no label smoothing: set it to 0.0")


@functools.partial(jax.jit, static_argnums=(0, 4))
def _eval_pairs(graphdef, trainable, frozen, batch, loss_fn):
    return supervised_steps.eval_step(trainable, frozen, batch, graphdef=graphdef, loss_fn=loss_fn)


def evaluate_pairs(graphdef, trainable, frozen, batches, loss_fn) -> dict:
    """`loss_fn`'s metrics (loss, implicit-reward accuracy, rewards, margin) over every real pair of
    `batches`, and how many pairs there were."""
    sums, pairs = {}, 0.0
    for b in batches:
        n = float(np.sum(b["valid_B"]))
        for k, v in jax.device_get(_eval_pairs(graphdef, trainable, frozen, b, loss_fn)).items():
            sums[k] = sums.get(k, 0.0) + float(v) * n
        pairs += n
    return {**{k: v / max(pairs, 1.0) for k, v in sums.items()}, "pairs": pairs}


def train_dpo(*, workdir: str, dataset: D.Loaded, model: str = "tiny", dtype: str = "float32",
              tuning: TuningConfig = TuningConfig(), optimizer: OptimizerConfig = OptimizerConfig(),
              loop: LoopConfig = LoopConfig(), data: DataConfig = DataConfig(), beta: float = 0.1,
              loss: str = "dpo", label_smoothing: float = 0.0, adapter: str = "policy",
              reward_model: str | None = None, plan: Callable[..., dict] | None = None) -> dict:
    """Train a policy on preference pairs with DPO (Rafailov et al., 2023) or IPO (Azar et al., 2023).

    The reference is the starting model `model` (an SFT export, usually): in LoRA mode the backbone with
    the adapter off, when fully tuning a frozen copy. `beta` = 0.1 is DPO's usual value (its paper and
    TRL's default); for IPO it is the paper's τ. `label_smoothing` > 0 is conservative DPO (`dpo_loss`).
    Prompts are cut from the left to `data.max_prompt_len` tokens and responses (with EOS) to
    `data.max_response_len`, as for SFT and reward models; `data.padding` and packing do not apply (the
    pairs take the RL layout, `batch_pairs`). Held-out pairs (`data.eval_size`) give the evaluation: the
    loss and the implicit-reward accuracy (chosen's β (log π - log π_ref) above rejected's).

    `reward_model` is accepted and ignored, so a DPO job can stand in a list of RL jobs that are all
    called with one (`rlhf_experiment.rl_jobs`); DPO needs none. `plan` (`run.py --compile_only`) is
    not supported for DPO yet and is an error.
    """
    del reward_model  # DPO's reward is implicit in the policy
    if plan is not None:
        raise ValueError("train_dpo: --compile_only has no plan for DPO yet; plan the RL stage (train_policy) of "
                         "the same model and budget for an estimate, or drop --compile_only")
    check_options(beta=beta, loss=loss, label_smoothing=label_smoothing)
    examples = list(dataset.examples)
    if not examples:
        raise D.DataError(f"{dataset.source}: the dataset is empty")
    if not isinstance(examples[0], D.PreferenceExample):
        raise D.DataError(f"{dataset.source}: train_dpo needs preference pairs (prompt, chosen, rejected), got "
                          f"{type(examples[0]).__name__}; read them with read_preference_jsonl or read_hh_harmless")

    # MODELS: the policy (backbone + adapter) and its reference (adapters off, or a frozen copy)
    backbone, tokenizer = load_backbone(model, dtype, quantize=tuning.quantize)  # QLoRA: the reference reads it too
    backbone.remat = tuning.remat
    reference = None
    if tuning.mode == "lora":
        print(f"[{adapter}] {lora.add_lora(backbone, adapter, tuning.lora)}")
    else:
        reference, _ = load_backbone(model, dtype)
        n = sum(x.size for x in jax.tree.leaves(nnx.state(backbone, nnx.Param)))
        print(f"[{adapter}] full fine-tuning: {n:,} trainable parameters; the reference is a frozen copy")
    modules = RLModules(backbone, policy_adapters=(adapter,) if tuning.mode == "lora" else (), anchor=reference)

    # PAIRS: tokenised as for reward models, split, batched in the RL layout
    tokenized, stats = D.tokenize_preferences(examples, tokenizer, _tokenize_options(data))
    train_items, eval_items = _split(tokenized, data, loop)
    print(f"data {dataset.source}: {stats.summary()}; train {len(train_items)}, eval {len(eval_items)}")
    collate = functools.partial(batch_pairs, prompt_len=data.max_prompt_len, response_len=data.max_response_len,
                                pad_id=_pad_id(tokenizer))
    train_iter = D.BatchIterator(train_items, loop.batch_size, collate, seed=loop.seed,
                                 process_index=jax.process_index(), process_count=jax.process_count())
    loss_fn = functools.partial(supervised_steps.preference_loss, beta=beta, loss=loss,
                                label_smoothing=label_smoothing)

    def evaluate(graphdef, trainable, frozen):
        return evaluate_pairs(graphdef, trainable, frozen, _eval_batches(eval_items, loop, collate), loss_fn)

    # RECORD: a policy run, loadable as the RL runs are
    options = {"beta": beta, "loss": loss, "label_smoothing": label_smoothing}
    run_info = {"stage": "rl", "algorithm": loss, "model": model, "dtype": dtype, "tuning": tuning.mode,
                "quantize": tuning.quantize,
                "adapter": adapter, "lora": dataclasses.asdict(tuning.lora) if tuning.mode == "lora" else None,
                "dpo": options, "data_stats": dataclasses.asdict(stats), "train_examples": len(train_items),
                "eval_examples": len(eval_items)}
    run_info["identity"] = run_identity(stage="rl", model=model, dtype=dtype, tuning=tuning, adapter=adapter,
                                        source=dataset.source, data=data, loop=loop,
                                        train_examples=len(train_items), eval_examples=len(eval_items),
                                        algorithm=loss, dpo=options)
    return fit(modules, filter_=policy_filter(tuning, adapter), loss_fn=loss_fn, train_iter=train_iter,
               evaluate=evaluate, optimizer=optimizer, loop=loop, workdir=workdir, run_info=run_info)
