"""Will a configured run fit? Compile its step for a TPU topology (or the local devices) before renting one.

`plan_step` takes the same options a training job takes (model source, tuning, batch and lengths,
RL algorithm) and builds the step from shapes alone: no weights are read, so an 8B model plans on
a laptop. The report is per-device peak HBM (argument + output + temporaries - aliased) and
whether it fits the chip. `plan_report` is what a training job runs in place of training when
`experiments/run.py --compile_only` hands it one (the job's `plan` argument): it prints the report and
writes it to `plan.json` in the workdir.
"""

from __future__ import annotations

import json
import os

from pe_rlhf.checkpoints.gguf_io import gguf_hf_config
from pe_rlhf.checkpoints.hf import load_hf_config
from pe_rlhf.models.config import PRESETS, ModelConfig, from_hf_config
from pe_rlhf.models.tiny import tiny_config
from pe_rlhf.profiling import step_builders as S
from pe_rlhf.profiling.measure import StepReport, measure_step
from pe_rlhf.train.config import LoopConfig, TuningConfig
from pe_rlhf.train.optim import OptimizerConfig


def model_config(source: str) -> ModelConfig:
    """The architecture of a model source (as `load_backbone` accepts it, or a preset), from metadata only."""
    if source == "tiny" or source.startswith("tiny-"):
        return tiny_config(source.partition("-")[2] or "llama")
    if source in PRESETS:
        return PRESETS[source]
    if os.path.isdir(source):
        return from_hf_config(load_hf_config(source), where=os.path.join(source, "config.json"))
    if source.endswith(".gguf"):
        return from_hf_config(gguf_hf_config(source), where=source)
    raise FileNotFoundError(f"{source}: not a preset ({', '.join(sorted(PRESETS))}), 'tiny', a checkpoint "
                            "directory or a .gguf file")


def plan_step(*, stage: str, model: str, tuning: TuningConfig, batch_size: int, prompt_len: int,
              response_len: int, target: str, dtype: str = "float32", algorithm: str = "remax",
              optimizer: OptimizerConfig = OptimizerConfig()) -> StepReport:
    """Compile the step of `stage` ('reward_model' or 'rl') for `target` ('local' or a topology such as v5e:2x2).

    `dtype` is the job's: the frozen weights' dtype, and when fully tuning the compute copy of the fp32
    master weights (`train.precision`), so a LoRA and a full plan in bf16 compare like with like.
    """
    cfg = model_config(model)
    if stage == "reward_model":
        spec = S.build_rm_step(cfg, tuning, frozen_dtype=dtype, pairs=batch_size,
                               seq_len=prompt_len + response_len, optimizer=optimizer)
    elif stage == "rl":
        spec = S.build_rl_step(cfg, tuning, frozen_dtype=dtype, algorithm=algorithm, prompts=batch_size,
                               prompt_len=prompt_len, new_tokens=response_len, optimizer=optimizer)
    else:
        raise ValueError(f"plan_step: stage {stage!r}; ahead-of-time planning covers 'reward_model' and 'rl'")
    return measure_step(spec, topology=None if target == "local" else target)


def plan_report(workdir: str, *, target: str, stage: str, model: str, dtype: str, tuning: TuningConfig,
                loop: LoopConfig, prompt_len: int, response_len: int, optimizer: OptimizerConfig,
                algorithm: str = "remax") -> dict:
    """Compile a job's step for `target` without weights; print its memory report, write `plan.json` to
    `workdir` and return the job's summary. A training job calls it (as its `plan`) with its own options."""
    report = plan_step(stage=stage, model=model, tuning=tuning, batch_size=loop.batch_size, prompt_len=prompt_len,
                       response_len=response_len, target=target, dtype=dtype, algorithm=algorithm,
                       optimizer=optimizer)
    summary = {"plan": report.as_dict(), "plan/peak_bytes": report.peak_bytes, "plan/fits": str(report.fits),
               "plan/where": report.where}
    print(report)
    if report.memory is not None:
        print(report.memory)
    if report.hbm_bytes_per_device is not None:
        print(f"fits in {report.hbm_bytes_per_device / 2**30:.2f} GiB of HBM per device: {report.fits}")
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "plan.json"), "w") as f:
        json.dump(report.as_dict(), f, indent=2, default=str)
    return summary
