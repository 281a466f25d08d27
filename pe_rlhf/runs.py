"""A finished run's workdir, for using what it trained: which policy or reward model it holds, and its exports.

A workdir is one of
- a stage's: its `run_info.json` names the stage (`sft`, `reward_model`, `rl`);
- a pipeline's (`pe_rlhf.train.pipeline`): `sft/`, `reward_model/`, `rl/`;
- an experiment's (`pe_rlhf.eval.experiment`): `sft/`, `proxy_rm/`, `judge_rm/`, `rl/<line>/`;
and anything else is a model source (`tiny`, `gemma3-270m`, a HF directory, a .gguf file).

`load_run` restores a run's model with its LoRA adapter still attached (not merged), so one load
serves every export: `export_run` writes the merged HF checkpoint, the PEFT adapter (with the base
it applies to) and, for a reward model, the scalar head. Each export carries the tokenizer, and
with it the tokenizer's chat template when it has one.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

from pe_rlhf.checkpoints.export import export_merged, export_peft, export_reward_head
from pe_rlhf.checkpoints.load import load_backbone
from pe_rlhf.models import lora
from pe_rlhf.train.records import lora_config_of, read_run_info

FORMATS = ("merged", "peft", "head")


class RunError(ValueError):
    """A path that does not name the run (or the part of a run) a command needs; the message says what to pass."""


def _stage(path: str) -> str | None:
    info = read_run_info(path) if os.path.isdir(path) else None
    return None if info is None else info.get("stage")


def policy_source(path: str) -> str:
    """What `winrate.load_policy` should load for `path`: a pipeline's `rl/`, an experiment's only `rl/<line>`,
    or `path` itself (a stage's workdir or a model source)."""
    if not os.path.isdir(path) or _stage(path) or os.path.isfile(os.path.join(path, "config.json")):
        return path
    rl = os.path.join(path, "rl")
    if _stage(rl) == "rl":
        return rl
    lines = sorted(d for d in os.listdir(rl) if _stage(os.path.join(rl, d)) == "rl") if os.path.isdir(rl) else []
    if len(lines) == 1:
        return os.path.join(rl, lines[0])
    if lines:
        raise RunError(f"{path}: an experiment workdir with {len(lines)} RL policies ({', '.join(lines)}); "
                       f"name one: {os.path.join(rl, '<line>')}, e.g. {os.path.join(rl, lines[0])}")
    if _stage(os.path.join(path, "sft")) == "sft":
        raise RunError(f"{path}: no RL policy here (the run stopped before RL?); pass {os.path.join(path, 'sft')} "
                       "for the SFT policy")
    raise RunError(f"{path}: a directory with no run_info.json, no config.json and no rl/ or sft/ stage; expected "
                   "a run workdir (SFT, RL, pipeline or experiment) or a Hugging Face checkpoint directory")


def reward_model_workdir(path: str) -> str:
    """The reward-model workdir `path` names: itself, or a pipeline's `reward_model/`."""
    stage = _stage(path)
    if stage == "reward_model":
        return path
    if stage is not None:
        raise RunError(f"{path}: an {stage} run, not a reward model; pass the workdir of a reward-model run")
    if not os.path.isdir(path):
        raise RunError(f"{path}: no such directory; expected the workdir of a reward-model run")
    found = [d for d in ("reward_model", "proxy_rm", "judge_rm") if _stage(os.path.join(path, d)) == "reward_model"]
    if len(found) == 1:
        return os.path.join(path, found[0])
    if found:
        raise RunError(f"{path}: holds {len(found)} reward models; name one: "
                       + " or ".join(os.path.join(path, d) for d in found))
    raise RunError(f"{path}: no run_info.json with stage 'reward_model' here or in reward_model/; expected the "
                   "workdir of a reward-model run")


@dataclasses.dataclass
class TrainedRun:
    """A run's model as trained: the backbone with the run's LoRA adapter attached (when it tuned one)."""

    kind: str  # "sft", "rl", "reward_model" or "model" (a model source: nothing trained)
    model: Any  # Transformer
    tokenizer: Any
    adapter: str | None  # the LoRA adapter that makes the run's model; None when fully tuned or untrained
    base: str  # the model source the run started from
    head: Any = None  # the reward model's ScalarHead
    step: int | None = None
    path: str = ""


def _restore_sft(path: str, info: dict, dtype: str):
    from pe_rlhf.checkpoints.orbax_io import RunCheckpointer
    from pe_rlhf.train.supervised import TuningConfig, trainable_filter

    backbone, tokenizer = load_backbone(info["model"], dtype, quantize=info.get("quantize"))
    adapter = info["adapter"] if info["tuning"] == "lora" else None
    if adapter is not None:
        lora.add_lora(backbone, adapter, lora_config_of(info))
    ckpt = RunCheckpointer(os.path.join(path, "checkpoints"))
    try:
        step = ckpt.restore_module(backbone, trainable_filter(TuningConfig(mode=info["tuning"]), info["adapter"]),
                                   what="SFT")
    finally:
        ckpt.close()
    return backbone, tokenizer, adapter, step


def load_run(path: str, *, dtype: str = "float32") -> TrainedRun:
    """The model a run trained (an SFT, RL or reward-model workdir, or a pipeline's policy), or a model source."""
    from pe_rlhf.eval import winrate

    path = policy_source(path) if os.path.isdir(path) and not _stage(path) else path
    info = read_run_info(path) if os.path.isdir(path) else None
    stage = None if info is None else info.get("stage")
    if stage is None:
        model, tokenizer = load_backbone(path, dtype)
        return TrainedRun("model", model, tokenizer, None, path, path=path)
    adapter = info.get("adapter") if info.get("tuning") == "lora" else None
    if stage == "sft":
        model, tokenizer, adapter, step = _restore_sft(path, info, dtype)
        return TrainedRun("sft", model, tokenizer, adapter, info["model"], step=step, path=path)
    if stage == "rl":
        model, tokenizer, step = winrate.restore_rl_policy(path, info, dtype=dtype, merged=False)
        return TrainedRun("rl", model, tokenizer, adapter, info["model"], step=step, path=path)
    if stage == "reward_model":
        rm, tokenizer, _ = winrate.load_reward_model(path, dtype=dtype)
        return TrainedRun("reward_model", rm.backbone, tokenizer, adapter, info["model"], head=rm.head, path=path)
    raise RunError(f"{path}/run_info.json: stage {stage!r}; expected sft, rl or reward_model")


def _is_hf_dir(source: str) -> bool:
    return os.path.isdir(source) and os.path.isfile(os.path.join(source, "config.json"))


def export_run(run: TrainedRun, out: str, formats: str | tuple[str, ...] = "all") -> dict[str, str]:
    """Write the run's exports under `out`; returns {what: directory}.

    - `merged/`: a HF checkpoint with the adapter merged into the base (the policy, or the reward
      model's backbone), tokenizer included;
    - `peft/`: the adapter in PEFT format, whose `base_model_name_or_path` is the run's base when that
      is a HF directory, else `base/`, written beside it (the base model as a HF checkpoint);
    - `head/`: a reward model's scalar head (`reward_head.safetensors`, `reward_head.json`).
    `formats="all"` writes every one that applies to the run; naming one that does not is an error.
    """
    explicit = formats != "all"
    if not explicit:
        formats = FORMATS
    elif isinstance(formats, str):
        formats = (formats,)
    unknown = [f for f in formats if f not in FORMATS]
    if unknown:
        raise RunError(f"export formats {unknown}: expected some of {', '.join(FORMATS)} or 'all'")
    where = run.path or run.base
    if "peft" in formats and run.adapter is None:
        if explicit:
            raise RunError(f"{where}: no LoRA adapter to export in PEFT format (the run "
                           f"{'tuned every weight' if run.kind != 'model' else 'is a plain model source'}); "
                           "use --format merged")
        formats = tuple(f for f in formats if f != "peft")
    if "head" in formats and run.head is None:
        if explicit:
            raise RunError(f"{where}: a {run.kind} run has no reward head; --format head is for reward-model runs")
        formats = tuple(f for f in formats if f != "head")
    adapters = (run.adapter,) if run.adapter else ()
    written = {}
    if "merged" in formats:
        written["merged"] = export_merged(run.model, os.path.join(out, "merged"), *adapters, tokenizer=run.tokenizer)
    if "peft" in formats:
        base = os.path.abspath(run.base) if _is_hf_dir(run.base) else None
        if base is None:  # `tiny`, `gemma3-270m`, a .gguf: PEFT needs the base as a HF checkpoint
            base = written["base"] = os.path.abspath(export_merged(run.model, os.path.join(out, "base"),
                                                                   tokenizer=run.tokenizer))
        written["peft"] = export_peft(run.model, run.adapter, os.path.join(out, "peft"), base_model_name_or_path=base)
        if run.tokenizer is not None:
            run.tokenizer.save_pretrained(written["peft"])
    if "head" in formats:
        tok = run.tokenizer
        written["head"] = export_reward_head(
            run.head, os.path.join(out, "head"), backbone=os.path.abspath(os.path.join(out, "merged")),
            bos_token_id=getattr(tok, "bos_token_id", None), eos_token_id=getattr(tok, "eos_token_id", None))
    return written


__all__ = ["FORMATS", "RunError", "TrainedRun", "export_run", "load_run", "policy_source", "reward_model_workdir"]
