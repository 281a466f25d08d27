"""A run's record in its workdir, `run_info.json`: written by the training loop, read by every consumer.

The record is a flat dict (stage, model, tuning, adapter, lora, ...) with one nested part, `identity`:
everything whose change makes the workdir's checkpoints meaningless for the new run (another base model,
another LoRA shape, another data split or order). A rerun whose identity differs from the record's is
refused before anything is written (`check_identity`); settings outside it (more steps, logging and
evaluation intervals, learning rate) may change on resume and are logged.
"""

from __future__ import annotations

import os

from pe_rlhf.models import lora
from pe_rlhf.train.stages import read_json, strict_json, write_json_atomic

RUN_INFO = "run_info.json"


class RunIdentityError(ValueError):
    """A workdir holds checkpoints of another run."""


def read_run_info(workdir: str) -> dict | None:
    return read_json(os.path.join(workdir, RUN_INFO))


def write_run_info(workdir: str, info: dict) -> None:
    write_json_atomic(os.path.join(workdir, RUN_INFO), info)


def same_model(a: str, b: str) -> bool:
    """Whether two model sources name the same checkpoint (a relative and an absolute path may)."""
    if a == b:
        return True
    return os.path.exists(a) and os.path.exists(b) and os.path.samefile(a, b)


def lora_config_of(info: dict) -> lora.LoRAConfig | None:
    """The LoRA options a run trained with, from its record (None for a fully tuned run)."""
    cfg = info.get("lora")
    if info.get("tuning") != "lora" or cfg is None:
        return None
    return lora.LoRAConfig(**cfg)


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


# Identity keys added after identities were first recorded, with the value their absence stands for:
# a workdir recorded before `LoRAConfig` had rsLoRA and DoRA trained plain LoRA, and resumes as such.
ADDED_KEYS = {"lora.rslora": False, "lora.dora": False, "data.train_fraction": 1.0,
              "reward_rule.standardise": False}


def identity_differences(old: dict, new: dict) -> list[tuple[str, object, object]]:
    """(key, old value, new value) of every identity key that differs (nested keys dotted).

    A key of `ADDED_KEYS` absent from `old` (recorded before it existed) reads as its listed value.
    """
    old, new = _flat(strict_json(old)), _flat(strict_json(new))
    old = {**{k: v for k, v in ADDED_KEYS.items() if k in new}, **old}
    return [(k, old.get(k, "<absent>"), new.get(k, "<absent>")) for k in sorted(set(old) | set(new))
            if old.get(k, "<absent>") != new.get(k, "<absent>")]


def check_identity(workdir: str, info: dict, *, has_checkpoint: bool) -> None:
    """Refuse to resume `workdir` for a run whose identity differs from the recorded one.

    A workdir without checkpoints holds no run yet, so its record (of a run that never saved a step)
    is simply replaced.
    """
    old = read_run_info(workdir)
    if not has_checkpoint or old is None:
        return
    if "identity" not in old:
        raise RunIdentityError(
            f"{workdir}: its {RUN_INFO} records no run identity (written by an older version), so resuming it "
            "cannot be checked; start afresh in a new workdir (or delete this one)")
    diffs = identity_differences(old["identity"], info["identity"])
    if diffs:
        lines = "\n".join(f"  {k}: was {a!r}, now {b!r}" for k, a, b in diffs)
        raise RunIdentityError(
            f"{workdir} holds checkpoints of another run ({os.path.join(workdir, RUN_INFO)}); these settings "
            f"differ:\n{lines}\nResuming would mix the two runs. Use a new --workdir to start afresh, delete this "
            "one, or set the values back to resume it.")


def run_identity(*, stage: str, model: str, dtype: str, tuning, adapter: str, source: str, data, loop,
                 train_examples: int, eval_examples: int, **extra) -> dict:
    """What defines a run for resuming: base model, what trains, the data, its split and its order.

    `tuning`, `data` and `loop` are the stage's TuningConfig, DataConfig and LoopConfig; `extra` adds
    the stage's own keys (the reward-model kind, the RL algorithm and reward model...). A quantised
    backbone (`TuningConfig.quantize`) adds `quantize`; without one the identity is as it always was.
    """
    import dataclasses

    quantized = {"quantize": tuning.quantize} if tuning.quantize is not None else {}
    return {"stage": stage, "model": model, "dtype": dtype, "tuning": tuning.mode, **quantized, "adapter": adapter,
            "lora": dataclasses.asdict(tuning.lora) if tuning.mode == "lora" else None,
            "data": {"source": source, **dataclasses.asdict(data), "train_examples": train_examples,
                     "eval_examples": eval_examples},
            "batch_size": loop.batch_size, "seed": loop.seed, "mesh": None if loop.mesh is None else str(loop.mesh),
            **extra}
