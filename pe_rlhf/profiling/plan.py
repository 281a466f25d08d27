"""Will a configured run fit? Compile its step for a TPU topology (or the local devices) before renting one.

`plan_step` takes the same options a training job takes (model source, tuning, batch and lengths,
RL algorithm) and builds the step from shapes alone: no weights are read, so an 8B model plans on
a laptop. The report is per-device peak HBM (argument + output + temporaries - aliased) and
whether it fits the chip.
"""

from __future__ import annotations

import os

from pe_rlhf.models.config import PRESETS, ModelConfig, from_hf_config
from pe_rlhf.profiling import steps as S


def model_config(source: str) -> ModelConfig:
    """The architecture of a model source (as `load_backbone` accepts it), from metadata only."""
    from pe_rlhf.models.tiny import tiny_config

    if source == "tiny" or source.startswith("tiny-"):
        return tiny_config(source.partition("-")[2] or "llama")
    if source in PRESETS:
        return PRESETS[source]
    if os.path.isdir(source):
        from pe_rlhf.checkpoints.hf import load_hf_config

        return from_hf_config(load_hf_config(source), where=os.path.join(source, "config.json"))
    if source.endswith(".gguf"):
        from pe_rlhf.checkpoints.gguf_io import gguf_hf_config

        return from_hf_config(gguf_hf_config(source), where=source)
    raise FileNotFoundError(f"{source}: not a preset ({', '.join(sorted(PRESETS))}), 'tiny', a checkpoint "
                            "directory or a .gguf file")


def plan_step(*, stage: str, model: str, tuning, batch_size: int, prompt_len: int, response_len: int,
              target: str, dtype: str = "float32", algorithm: str = "remax", optimizer=None) -> S.StepReport:
    """Compile the step of `stage` ('reward_model' or 'rl') for `target` ('local' or a topology such as v5e:2x2)."""
    cfg = model_config(model)
    frozen_dtype = dtype if tuning.mode == "lora" else "float32"
    t = S.Tuning(mode=tuning.mode, rank=tuning.lora.rank, targets=tuning.lora.targets, frozen_dtype=frozen_dtype)
    extra = {} if optimizer is None else {"optimizer": optimizer}
    if stage == "reward_model":
        spec = S.build_rm_step(cfg, t, pairs=batch_size, seq_len=prompt_len + response_len, **extra)
    elif stage == "rl":
        spec = S.build_rl_step(cfg, t, algorithm=algorithm, prompts=batch_size, prompt_len=prompt_len,
                               new_tokens=response_len, **extra)
    else:
        raise ValueError(f"plan_step: stage {stage!r}; ahead-of-time planning covers 'reward_model' and 'rl'")
    return S.measure_step(spec, topology=None if target == "local" else target)
