"""The options every training stage takes: what trains, how long and how (the loop), and the data budgets.

Small frozen dataclasses, bound by gin in `experiments/run.py`; each checks its own values when built.
"""

from __future__ import annotations

import dataclasses

from pe_rlhf.config_checks import boolean, check_fields, choice, either, instance, integer, number, optional
from pe_rlhf.data.batching import PADDING_SIDES
from pe_rlhf.data.packing import CHUNK
from pe_rlhf.models import lora, quant
from pe_rlhf.sharding.mesh import MeshConfig


@dataclasses.dataclass(frozen=True)
class TuningConfig:
    """What trains. PE-RLHF (arXiv 2403.10704): LoRA on the attention projections, backbone frozen;
    `mode="full"` is the paper's fully tuned baseline. `quantize` stores the frozen backbone's decoder
    projections in int8, int4 or nf4 (QLoRA, arXiv 2305.14314; `pe_rlhf.models.quant`), LoRA mode only;
    None (the default) keeps them in the model dtype."""

    mode: str = "lora"  # lora | full
    lora: lora.LoRAConfig = lora.LoRAConfig()
    remat: bool = False  # recompute each decoder block in the backward pass: less activation memory, more FLOPs
    quantize: str | None = None  # None | int8 | int4 | nf4

    def __post_init__(self):
        check_fields(self, mode=choice("lora", "full"), lora=instance(lora.LoRAConfig), remat=boolean(),
                     quantize=optional(choice(*quant.FORMATS)))
        if self.mode == "full" and self.quantize is not None:
            raise ValueError(f"TuningConfig(mode='full', quantize={self.quantize!r}): a quantised backbone is frozen, "
                             "but full tuning trains every weight; use mode='lora' with quantize (QLoRA), or "
                             "quantize=None for full tuning")


@dataclasses.dataclass(frozen=True)
class LoopConfig:
    num_steps: int = 100
    batch_size: int = 8
    eval_every: int = 50  # 0: only at the end
    eval_batch_size: int = 16
    max_eval_examples: int | None = None
    log_every: int = 10
    checkpoint_every: int = 100
    keep_checkpoints: int = 3
    seed: int = 0
    progress_bar: bool = True
    mesh: MeshConfig | None = None  # None: one device; e.g. MeshConfig(data=-1): data parallel over all
    # updates with a non-finite loss or gradient are skipped and counted; this many in a row stop the run,
    # and so do more than half of all updates skipped, once this many were or at the last step (`train.loop`)
    max_nonfinite_updates: int = 10

    def __post_init__(self):
        check_fields(self, num_steps=integer(ge=1), batch_size=integer(ge=1), eval_every=integer(ge=0),
                     eval_batch_size=integer(ge=1), max_eval_examples=optional(integer(ge=1)),
                     log_every=integer(ge=1), checkpoint_every=integer(ge=1), keep_checkpoints=integer(ge=1),
                     seed=integer(ge=0), progress_bar=boolean(), mesh=optional(instance(MeshConfig)),
                     max_nonfinite_updates=integer(ge=1))


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Token budgets, padding side and the held-out split."""

    max_prompt_len: int = 256
    max_response_len: int = 128
    padding: str = "right"
    eval_size: float | int = 0.1
    split_seed: int = 0
    eos_id: int | None = None
    # SFT: keep only examples whose response ends (EOS) within max_response_len, so the policy learns to
    # end its turn within the budget it will be sampled with (truncated targets would teach it not to).
    drop_long_responses: bool = False
    # Reward models only: pack items to their real length in `pack_rows` rows of `pack_length` tokens
    # (a multiple of 64), each pair's prompt computed once (`pe_rlhf.data.packing`). A batch then holds
    # up to LoopConfig.batch_size items, as many as fit. None: one padded row per sequence.
    pack_length: int | None = None
    pack_rows: int = 1
    # False: each response packed as its own sequence, its prompt repeated ([prompt | response] per
    # response): more tokens per pair, but plain causal segments that a fused attention kernel
    # (ModelConfig.attention_impl "mosaic_tpu", "cudnn") runs; a shared prompt runs the XLA path.
    pack_share_prompt: bool = True
    # Reward models, SFT and DPO: train on this fraction of the training part, drawn with LoopConfig.seed
    # (the held-out part is unchanged); the members of a reward ensemble (seeds seed + k) then each see
    # their own subset. RL refuses a value below 1 (pass fewer prompts instead).
    train_fraction: float = 1.0

    def __post_init__(self):
        check_fields(self, max_prompt_len=integer(ge=1), max_response_len=integer(ge=1),
                     padding=choice(*PADDING_SIDES), eval_size=either(number(gt=0, lt=1), integer(ge=1)),
                     split_seed=integer(ge=0), eos_id=optional(integer(ge=0)), drop_long_responses=boolean(),
                     pack_length=optional(integer(ge=CHUNK, multiple_of=CHUNK)), pack_rows=integer(ge=1),
                     pack_share_prompt=boolean(),
                     train_fraction=number(gt=0, le=1))
