"""A train step before any weights exist: abstract step builders (`profiling.measure` compiles and measures them).

A builder returns a `StepSpec`: the pure step function, its ABSTRACT arguments
(`jax.ShapeDtypeStruct` trees; models come from `nnx.eval_shape`, so a full-size
preset costs no memory) and which arguments are donated (the trainable state and
its optimizer state). Two steps, full or LoRA (`train.config.TuningConfig`, as a job takes it),
built in `frozen_dtype` as a job built in that `dtype` is: frozen weights in it, and what trains in
fp32 (LoRA adapters and heads are fp32; fully tuned weights are fp32 masters of a `frozen_dtype`
compute copy, cast inside the step, as `train.precision` lays them out for training):

- `build_rm_step`: one Bradley-Terry update of a reward model on B pairs x T tokens
  (`train.supervised_steps.train_step` with `pairwise_reward_loss`), the model assembled and
  split as `train_reward_model` does it (`train.supervised.reward_model`, `trainable_filter`).
- `build_packed_rm_step`: the same update on a packed batch (`data.packing`): rows of L tokens
  holding several pairs, the prompt shared by both responses or repeated per response.
- `build_sft_step`: one SFT update (`train.supervised_steps.sft_loss`) on B rows x T tokens, the
  vocabulary projection with its cross-entropy as `ModelConfig.cross_entropy_impl` says.
- `build_rl_step`: one `train.policy.rl_step` (reinforce | remax | ppo) on B prompts
  of T tokens with N new tokens. LoRA ("PE") mode is the PE-RLHF layout: ONE
  frozen backbone carries a `policy` adapter, a `reward` adapter + head (and for
  PPO a `value` adapter + head); the KL anchor is that backbone with adapters off.
  Full mode is the layout the ReMax and PE-RLHF papers compare against: a fully
  tuned policy, a SEPARATE frozen anchor (reference) and reward model, and for
  PPO a separate fully tuned value model. What trains is `train.rl_loop.rl_trainable_filter`'s.

Both take `quantize` (int8 | int4 | nf4: the FROZEN decoder projections stored in that format,
`models.quant`, quantised inside `nnx.eval_shape` so nothing is allocated; the LoRA backbone, or full RL's
anchor and reward model; a fully tuned RM has nothing frozen and refuses it) and `attention_impl`
(`ModelConfig.attention_impl`, e.g. "mosaic_tpu" for the splash kernel); a step's name carries both.

`profiling.measure` compiles a `StepSpec` (`compile_step`) and reports its memory and time (`measure_step`).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable


import jax
import jax.numpy as jnp
from flax import nnx

from pe_rlhf.data.packing import CHUNK
from pe_rlhf.models import lora, quant
from pe_rlhf.models.attention import FUSED_IMPLS
from pe_rlhf.models.config import ModelConfig
from pe_rlhf.models.heads import RewardModel
from pe_rlhf.models.transformer import Transformer
from pe_rlhf.train import supervised_steps
from pe_rlhf.train.config import TuningConfig
from pe_rlhf.train.optim import OptimizerConfig, make_optimizer
from pe_rlhf.train.policy import RLConfig, RLModules, rl_step
from pe_rlhf.train.precision import Precision, master_weights
from pe_rlhf.train.rl_loop import rl_trainable_filter
from pe_rlhf.train.sharded import BATCH, REPLICATED
from pe_rlhf.train.supervised import reward_model, trainable_filter

RL_ALGORITHMS = ("reinforce", "remax", "ppo")
FROZEN_DTYPES = ("float32", "bfloat16")  # the model dtype: of what stays frozen and of the compute copy


def tuning_label(tuning: TuningConfig) -> str:
    """'full', 'lora-r8', 'lora-r8-remat': how a step's name and a benchmark row name what trains."""
    return ("full" if tuning.mode == "full" else f"lora-r{tuning.lora.rank}") + ("-remat" if tuning.remat else "")


def _frozen(frozen_dtype: str):
    if frozen_dtype not in FROZEN_DTYPES:
        raise ValueError(f"frozen_dtype={frozen_dtype!r}; choose {' or '.join(FROZEN_DTYPES)}")
    return jnp.dtype(frozen_dtype)


@dataclasses.dataclass(frozen=True)
class StepSpec:
    """A step function, its abstract arguments (named), the argument indices it donates, and how each argument
    after (trainable, opt_state, frozen) is placed on a mesh (`train.sharded.BATCH` or `REPLICATED`)."""

    name: str
    fn: Callable
    args: tuple
    arg_names: tuple[str, ...]
    donate_argnums: tuple[int, ...]
    vocab_size: int
    estimates: dict[str, int]  # bytes of named buffers the step creates (global, not per device)
    placement: tuple[str, ...]

    def arg_bytes(self) -> dict[str, int]:
        """Global bytes of each argument, e.g. {'trainable': ..., 'opt_state': ..., 'frozen': ..., 'batch': ...}."""
        return {name: tree_bytes(arg) for name, arg in zip(self.arg_names, self.args)}


def tree_bytes(tree) -> int:
    """Bytes of every array (or ShapeDtypeStruct) leaf; PRNG keys count as their raw data."""
    total = 0
    for x in jax.tree.leaves(tree):
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            total += math.prod(x.shape) * 8
        else:
            total += math.prod(x.shape) * jnp.dtype(x.dtype).itemsize
    return total


def _transformer(cfg: ModelConfig, dtype, seed: int, remat: bool, quantize: str | None = None) -> Transformer:
    model = Transformer(cfg, dtype=dtype, rngs=nnx.Rngs(seed), remat=remat)
    if quantize is not None:
        quant.quantize_projections(model, quantize)
    return model


def _reward_model_builder(cfg: ModelConfig, dtype, tuning: TuningConfig, fmt: str | None):
    """The RM steps' model builder: the backbone (frozen projections in `fmt`) with the head and `tuning`."""
    return lambda: reward_model(_transformer(cfg, dtype, 0, False, fmt), tuning, "reward")


def _options(where: str, cfg: ModelConfig, tuning: TuningConfig, quantize: str | None,
             attention_impl: str | None, *, frozen_models: bool) -> tuple[ModelConfig, TuningConfig, str | None]:
    """(cfg with `attention_impl` set, tuning, the frozen weights' format) after checking `quantize`.

    `quantize` is the storage of FROZEN projections: the LoRA backbone's or, with `frozen_models` (full RL),
    the anchor's and reward model's. Fully tuned weights train in fp32, so a full step without frozen
    models (the RM) refuses it; so does a `tuning.quantize` that names another format.
    """
    if quantize is not None and quantize not in quant.FORMATS:
        raise ValueError(f"{where}: quantize={quantize!r}; choose None or one of {', '.join(quant.FORMATS)}")
    if tuning.quantize is not None and quantize not in (None, tuning.quantize):
        raise ValueError(f"{where}: quantize={quantize!r} but tuning.quantize={tuning.quantize!r}; give one")
    fmt = quantize or tuning.quantize
    if fmt is not None and tuning.mode == "full" and not frozen_models:
        raise ValueError(f"{where}: quantize={fmt!r} with tuning mode 'full': every weight of this model trains "
                         "(fp32 masters), and trainable weights cannot be stored quantised. Use a LoRA tuning "
                         "(QLoRA) or quantize=None")
    if attention_impl is not None:
        cfg = dataclasses.replace(cfg, attention_impl=attention_impl)  # ModelConfig checks the name
    return cfg, dataclasses.replace(tuning, quantize=None), fmt


def _variant(cfg: ModelConfig, quantize: str | None) -> str:
    """'' by default; ' nf4', ' mosaic_tpu', ' nf4 mosaic_tpu': how a step's name gives the frozen format and
    a fused attention kernel."""
    return (f" {quantize}" if quantize else "") + (f" {cfg.attention_impl}" if cfg.attention_impl != "auto" else "")


def _compute_copy_bytes(trainable, precision: Precision) -> dict[str, int]:
    """{'compute_copy': bytes of the masters' cast inside the step} when mixed (full tuning in bf16), else {}."""
    return {"compute_copy": precision.compute_bytes(trainable)} if precision.mixed else {}


# -- builders ---------------------------------------------------------------------------------
def build_rm_step(cfg: ModelConfig, tuning: TuningConfig = TuningConfig(), *, pairs: int, seq_len: int,
                  frozen_dtype: str = "float32", optimizer: OptimizerConfig = OptimizerConfig(),
                  quantize: str | None = None, attention_impl: str | None = None) -> StepSpec:
    """The Bradley-Terry step on `pairs` x `seq_len`: LoRA adapter + head train, or every parameter.

    The model is built in `frozen_dtype`: in LoRA mode the frozen backbone; fully tuned, the compute copy of
    fp32 master weights (a float32 full RM is fp32 throughout), as `train_reward_model` trains it.
    `quantize` (int8 | int4 | nf4; or `tuning.quantize`) stores the LoRA backbone's projections in that
    format (`models.quant`); a fully tuned RM refuses it. `attention_impl` replaces `cfg.attention_impl`.
    """
    dtype = _frozen(frozen_dtype)
    cfg, tuning, fmt = _options("build_rm_step", cfg, tuning, quantize, attention_impl, frozen_models=False)

    build = _reward_model_builder(cfg, dtype, tuning, fmt)
    tokens = jax.ShapeDtypeStruct((pairs, seq_len), jnp.int32)
    batch = {"chosen_tokens_BxT": tokens, "rejected_tokens_BxT": tokens,
             "chosen_mask_BxT": tokens, "rejected_mask_BxT": tokens}
    rows = 2 * pairs
    fused = cfg.attention_impl in FUSED_IMPLS  # no [rows, N, T, T] probabilities are stored
    estimates = {"hidden_per_layer": rows * seq_len * cfg.hidden_size * 4,
                 **({} if fused else {"attention_probs_per_layer": rows * cfg.num_heads * seq_len * seq_len * 4})}
    return _supervised_spec(f"rm/{tuning_label(tuning)}{_variant(cfg, fmt)}", build, trainable_filter(tuning, "reward"),
                            optimizer, supervised_steps.pairwise_reward_loss, batch, cfg, estimates)


def build_packed_rm_step(cfg: ModelConfig, tuning: TuningConfig = TuningConfig(), *, rows: int, length: int,
                         pairs_per_row: int, span: int, share_prompt: bool = True, frozen_dtype: str = "float32",
                         optimizer: OptimizerConfig = OptimizerConfig(), quantize: str | None = None,
                         attention_impl: str | None = None) -> StepSpec:
    """The Bradley-Terry step on a packed batch (`data.packing`, as `DataConfig.pack_length` trains): `rows`
    rows of `length` tokens holding up to `pairs_per_row` pairs each, no segment longer than `span`.

    `share_prompt`: each pair `[prompt | chosen | rejected]`, which only the XLA path attends (windows of
    `span` keys per chunk of queries); False: `[prompt | chosen][prompt | rejected]` as plain causal
    segments, which a fused kernel (`attention_impl`) takes by segment ids. Otherwise as `build_rm_step`.
    """
    dtype = _frozen(frozen_dtype)
    cfg, tuning, fmt = _options("build_packed_rm_step", cfg, tuning, quantize, attention_impl, frozen_models=False)

    build = _reward_model_builder(cfg, dtype, tuning, fmt)
    tokens = jax.ShapeDtypeStruct((rows, length), jnp.int32)
    per_item = jax.ShapeDtypeStruct((rows, pairs_per_row), jnp.float32)
    batch = {"tokens_RxN": tokens, "positions_RxN": tokens, "segment_RxN": tokens,
             "read_RxPxK": jax.ShapeDtypeStruct((rows, pairs_per_row, 2), jnp.int32), "valid_RxP": per_item,
             "margin_RxP": per_item, **({"branch_RxN": tokens} if share_prompt else {})}
    fused = cfg.attention_impl in FUSED_IMPLS and not share_prompt
    blocks = -(-(span - 1) // CHUNK) + 1  # key chunks per query chunk of the XLA path (`attention.packed_masks`)
    estimates = {"hidden_per_layer": rows * length * cfg.hidden_size * 4,
                 **({} if fused else {"attention_probs_per_layer": rows * cfg.num_heads * length * blocks * CHUNK * 4})}
    layout = "shared prompt" if share_prompt else "prompt per response"
    loss_fn = functools.partial(supervised_steps.packed_pairwise_reward_loss, span=span)
    return _supervised_spec(f"rm packed ({layout})/{tuning_label(tuning)}{_variant(cfg, fmt)}", build,
                            trainable_filter(tuning, "reward"), optimizer, loss_fn, batch, cfg, estimates)


def build_sft_step(cfg: ModelConfig, tuning: TuningConfig = TuningConfig(), *, rows: int, seq_len: int,
                   response_len: int | None = None, frozen_dtype: str = "float32",
                   optimizer: OptimizerConfig = OptimizerConfig(), quantize: str | None = None,
                   attention_impl: str | None = None, cross_entropy_impl: str | None = None) -> StepSpec:
    """One SFT update (`sft_loss`) on `rows` x `seq_len` tokens, as `train_sft` trains: the LoRA adapter
    `policy` or every weight; with `response_len` the vocabulary projection runs at that many positions
    per row (`train_sft` passes `DataConfig.max_response_len`), else at every position.
    `cross_entropy_impl` replaces `cfg.cross_entropy_impl` ("logits", or tokamax's fused "mosaic_tpu")."""
    dtype = _frozen(frozen_dtype)
    cfg, tuning, fmt = _options("build_sft_step", cfg, tuning, quantize, attention_impl, frozen_models=False)
    if cross_entropy_impl is not None:
        cfg = dataclasses.replace(cfg, cross_entropy_impl=cross_entropy_impl)  # ModelConfig checks the name

    def build():
        backbone = _transformer(cfg, dtype, 0, tuning.remat, fmt)
        if tuning.mode == "lora":
            lora.add_lora(backbone, "policy", tuning.lora)
        return backbone

    tokens = jax.ShapeDtypeStruct((rows, seq_len), jnp.int32)
    batch = {"tokens_BxT": tokens, "mask_BxT": tokens, "response_mask_BxT": tokens}
    positions = response_len or seq_len - 1
    fused_ce = cfg.cross_entropy_impl not in ("auto", "logits")
    estimates = {"hidden_per_layer": rows * seq_len * cfg.hidden_size * 4,
                 **({} if fused_ce else {"logits": rows * positions * cfg.vocab_size * 4})}
    ce = f" ce={cfg.cross_entropy_impl}" if cfg.cross_entropy_impl != "auto" else ""
    return _supervised_spec(f"sft/{tuning_label(tuning)}{_variant(cfg, fmt)}{ce}", build,
                            trainable_filter(tuning, "policy"), optimizer,
                            functools.partial(supervised_steps.sft_loss, response_window=response_len), batch, cfg,
                            estimates)


def _supervised_spec(name: str, build: Callable, filter_, optimizer: OptimizerConfig, loss_fn: Callable, batch: dict,
                     cfg: ModelConfig, estimates: dict[str, int]) -> StepSpec:
    """The `supervised_steps.train_step` of the model `build()` makes (from shapes), `filter_` training."""
    graphdef, trainable, frozen = nnx.split(nnx.eval_shape(build), filter_, ...)
    trainable, precision = master_weights(trainable)
    tx = make_optimizer(optimizer, num_steps=1)  # from shapes: a schedule's length changes no shape
    opt_state = jax.eval_shape(tx.init, trainable)

    def step(trainable, opt_state, frozen, batch):
        return supervised_steps.train_step(trainable, opt_state, frozen, batch, graphdef=graphdef, tx=tx,
                                           loss_fn=loss_fn, precision=precision)

    return StepSpec(name, step, (trainable, opt_state, frozen, batch), ("trainable", "opt_state", "frozen", "batch"),
                    (0, 1), cfg.vocab_size, {**estimates, **_compute_copy_bytes(trainable, precision)}, (BATCH,))


def build_rl_step(cfg: ModelConfig, tuning: TuningConfig = TuningConfig(), *, algorithm: str = "remax",
                  prompts: int, prompt_len: int, new_tokens: int, ppo_epochs: int = 4, frozen_dtype: str = "float32",
                  optimizer: OptimizerConfig = OptimizerConfig(), quantize: str | None = None,
                  attention_impl: str | None = None) -> StepSpec:
    """One RL update (reinforce | remax | ppo) on `prompts` x `prompt_len` + `new_tokens` sampled tokens.

    The shared backbone (LoRA), or the anchor and reward model (full), are `frozen_dtype`; what trains is float32:
    adapters and heads, or (full) the policy's and value model's fp32 master weights of a `frozen_dtype` copy.
    `quantize` (int8 | int4 | nf4) stores the frozen projections in that format: the shared backbone's (LoRA),
    or the anchor's and reward model's (full; the policy and value model train dense). `attention_impl`
    replaces `cfg.attention_impl` (the sampler's cached decoding always runs the XLA path).
    """
    if algorithm not in RL_ALGORITHMS:
        raise ValueError(f"build_rl_step: algorithm={algorithm!r}; choose one of {', '.join(RL_ALGORITHMS)}")
    ppo = algorithm == "ppo"
    frozen_dtype = _frozen(frozen_dtype)
    cfg, tuning, fmt = _options("build_rl_step", cfg, tuning, quantize, attention_impl, frozen_models=True)

    def build_pe():
        backbone = _transformer(cfg, frozen_dtype, 0, tuning.remat, fmt)
        for name in ("policy", "reward") + (("value",) if ppo else ()):
            lora.add_lora(backbone, name, tuning.lora)
        value = RewardModel(backbone, adapters=("value",)) if ppo else None
        return RLModules(backbone, policy_adapters=("policy",), anchor=None,
                         reward=RewardModel(backbone, adapters=("reward",)), value=value)

    def build_full():
        model = lambda seed, fmt=None: _transformer(cfg, frozen_dtype, seed, tuning.remat, fmt)
        value = RewardModel(model(3)) if ppo else None  # policy and value train: dense
        return RLModules(model(0), policy_adapters=(), anchor=model(1, fmt), reward=RewardModel(model(2, fmt)),
                         value=value)

    rl_cfg = RLConfig(algorithm=algorithm, max_new_tokens=new_tokens, ppo_epochs=ppo_epochs)
    modules = nnx.eval_shape(build_pe if tuning.mode == "lora" else build_full)
    graphdef, trainable, frozen = nnx.split(modules, rl_trainable_filter(tuning, rl_cfg, "policy"), ...)
    trainable, precision = master_weights(trainable)
    tx = make_optimizer(optimizer, num_steps=1)  # from shapes: a schedule's length changes no shape
    opt_state = jax.eval_shape(tx.init, trainable)
    prompt = jax.ShapeDtypeStruct((prompts, prompt_len), jnp.int32)
    batch = {"prompt_BxT": prompt, "prompt_mask_BxT": prompt}
    rl_state = {"baseline": jax.ShapeDtypeStruct((), jnp.float32)}
    rng = jax.eval_shape(lambda: jax.random.key(0))
    step = functools.partial(rl_step, graphdef=graphdef, tx=tx, cfg=rl_cfg, reward_fn=None,
                             eos_ids=tuple(cfg.eos_token_ids), pad_id=cfg.pad_token_id or 0, precision=precision)

    rows = 2 * prompts if algorithm == "remax" else prompts  # ReMax adds one greedy rollout per prompt
    length = prompt_len + new_tokens
    compute_itemsize = frozen_dtype.itemsize  # the policy samples in the model dtype (full: the compute copy)
    estimates = {**_compute_copy_bytes(trainable, precision),
        "prefill_logits": rows * cfg.vocab_size * 4,  # the sampler's prefill: the last prompt position only
        # the response log-probs run over 16 positions at a time (rollout.token_logprobs): one [rows, 16, V]
        # float32 block; the whole [rows, N, V] is what an unchunked projection would hold
        "response_logits": rows * min(16, new_tokens) * cfg.vocab_size * 4,
        "kv_cache": 2 * cfg.num_layers * rows * length * cfg.num_kv_heads * cfg.head_dim * compute_itemsize,
    }
    return StepSpec(f"{algorithm}/{tuning_label(tuning)}{_variant(cfg, fmt)}", step,
                    (trainable, opt_state, frozen, rl_state, batch, rng),
                    ("trainable", "opt_state", "frozen", "rl_state", "batch", "rng"), (0, 1), cfg.vocab_size,
                    estimates, (REPLICATED, BATCH, REPLICATED))


__all__ = ["FROZEN_DTYPES", "RL_ALGORITHMS", "StepSpec", "build_rl_step", "build_rm_step", "tree_bytes",
           "tuning_label"]
