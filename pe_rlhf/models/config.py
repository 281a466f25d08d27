"""One decoder configuration for every supported family (Gemma 3, Llama 3, Qwen 2.5/3).

The families differ in a handful of switches (norm style, QK-norm, QKV bias,
sliding-window layers, RoPE scaling); `ModelConfig` names each switch once and
`from_hf_config` reads them from a transformers config, which has already
normalised the many spellings found in `config.json` files on the Hub.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np

# model_type in config.json -> our family. The family decides the block layout.
SUPPORTED_MODEL_TYPES = {
    "gemma3_text": "gemma3",
    "gemma3": "gemma3",  # the multimodal wrapper: we take its text_config
    "llama": "llama",
    "qwen2": "qwen2",
    "qwen3": "qwen3",
}


# How attention is computed (see pe_rlhf.models.attention); "auto" picks per backend.
ATTENTION_IMPLS = ("auto", "xla", "mosaic_tpu", "cudnn")
CROSS_ENTROPY_IMPLS = ("auto", "logits", "tokamax_xla", "mosaic_tpu")


class UnsupportedModelError(ValueError):
    """A checkpoint whose architecture this framework does not implement."""


@dataclasses.dataclass(frozen=True)
class RopeConfig:
    """Rotary embedding for one kind of layer (HF `rope_parameters` entry)."""

    theta: float = 10_000.0
    kind: str = "default"  # default | linear | llama3
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192

    def inv_freq(self, head_dim: int) -> np.ndarray:
        """Inverse frequencies [head_dim // 2], float32, as transformers computes them."""
        inv = 1.0 / (self.theta ** (np.arange(0, head_dim, 2, dtype=np.int64).astype(np.float32) / head_dim))
        inv = inv.astype(np.float32)
        if self.kind == "default":
            return inv
        if self.kind == "linear":
            return (inv / self.factor).astype(np.float32)
        if self.kind == "llama3":
            low_wavelen = self.original_max_position_embeddings / self.low_freq_factor
            high_wavelen = self.original_max_position_embeddings / self.high_freq_factor
            wavelen = 2 * math.pi / inv
            scaled = np.where(wavelen > low_wavelen, inv / self.factor, inv)
            smooth = (self.original_max_position_embeddings / wavelen - self.low_freq_factor) / (
                self.high_freq_factor - self.low_freq_factor
            )
            smoothed = (1 - smooth) * scaled / self.factor + smooth * scaled
            medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
            return np.where(medium, smoothed, scaled).astype(np.float32)
        raise UnsupportedModelError(
            f"rope_type {self.kind!r} is not supported; supported: default, linear, llama3"
        )

    @classmethod
    def from_hf(cls, params: dict[str, Any] | None, default_theta: float) -> "RopeConfig":
        params = dict(params or {})
        kind = params.get("rope_type", params.get("type", "default")) or "default"
        rope = cls(
            theta=float(params.get("rope_theta", default_theta)),
            kind=kind,
            factor=float(params.get("factor", 1.0) or 1.0),
            low_freq_factor=float(params.get("low_freq_factor", 1.0)),
            high_freq_factor=float(params.get("high_freq_factor", 4.0)),
            original_max_position_embeddings=int(params.get("original_max_position_embeddings", 8192)),
        )
        rope.inv_freq(2)  # validates kind
        return rope


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Shape and switches of a decoder-only transformer.

    Defaults describe a tiny Llama-style model for tests; `from_hf_config` and the
    presets below give real shapes.
    """

    family: str = "llama"  # gemma3 | llama | qwen2 | qwen3
    vocab_size: int = 256
    hidden_size: int = 64
    intermediate_size: int = 128
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    head_dim: int = 16
    rms_norm_eps: float = 1e-6
    rope: RopeConfig = RopeConfig()
    local_rope: RopeConfig | None = None  # Gemma 3 sliding layers use their own base frequency
    sliding_window: int | None = None
    layer_types: tuple[str, ...] | None = None  # per layer: "full_attention" | "sliding_attention"
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False
    query_pre_attn_scalar: float | None = None  # Gemma: softmax scale is this ** -0.5
    attn_logit_softcap: float | None = None
    final_logit_softcap: float | None = None
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 8192
    initializer_range: float = 0.02  # std of random init (checkpoints overwrite it)
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    pad_token_id: int | None = None
    attention_impl: str = "auto"  # auto | xla | mosaic_tpu | cudnn: see pe_rlhf.models.attention
    cross_entropy_impl: str = "auto"  # auto | logits | tokamax_xla | mosaic_tpu: see train.cross_entropy.token_nll

    def __post_init__(self):
        if self.family not in set(SUPPORTED_MODEL_TYPES.values()):
            raise UnsupportedModelError(
                f"family {self.family!r} is not supported; supported: {sorted(set(SUPPORTED_MODEL_TYPES.values()))}"
            )
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})"
            )
        if self.attention_impl not in ATTENTION_IMPLS:
            raise ValueError(f"attention_impl {self.attention_impl!r} is not one of {', '.join(ATTENTION_IMPLS)}")
        if self.cross_entropy_impl not in CROSS_ENTROPY_IMPLS:
            raise ValueError(f"cross_entropy_impl {self.cross_entropy_impl!r} is not one of "
                             f"{', '.join(CROSS_ENTROPY_IMPLS)}")
        if self.layer_types is not None and len(self.layer_types) != self.num_layers:
            raise ValueError(f"layer_types has {len(self.layer_types)} entries for {self.num_layers} layers")

    # Family switches, named once.
    @property
    def is_gemma(self) -> bool:
        return self.family == "gemma3"

    @property
    def norm_offset(self) -> float:
        """Gemma norms scale by (1 + w); the others by w."""
        return 1.0 if self.is_gemma else 0.0

    @property
    def activation(self) -> str:
        return "gelu_tanh" if self.is_gemma else "silu"

    @property
    def embed_scale(self) -> float | None:
        return math.sqrt(self.hidden_size) if self.is_gemma else None

    @property
    def attn_scale(self) -> float:
        return (self.query_pre_attn_scalar or self.head_dim) ** -0.5

    def layer_is_sliding(self, i: int) -> bool:
        return (
            self.sliding_window is not None
            and self.layer_types is not None
            and self.layer_types[i] == "sliding_attention"
        )

    def layer_rope(self, i: int) -> RopeConfig:
        if self.layer_is_sliding(i) and self.local_rope is not None:
            return self.local_rope
        return self.rope

    def replace(self, **kw) -> "ModelConfig":
        return dataclasses.replace(self, **kw)


def _eos_ids(value) -> tuple[int, ...]:
    if value is None:
        return ()
    if isinstance(value, int):
        return (value,)
    return tuple(int(v) for v in value)


def check_model_type(model_type: str | None, where: str) -> str:
    """Map a config.json `model_type` to our family, or say clearly what is supported."""
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise UnsupportedModelError(
            f"{where}: model_type {model_type!r} is not supported. Supported model_type values: "
            f"{', '.join(sorted(SUPPORTED_MODEL_TYPES))} (families: Gemma 3, Llama 3, Qwen 2.5, Qwen 3)."
        )
    return SUPPORTED_MODEL_TYPES[model_type]


def from_hf_config(hf_config, where: str = "config") -> ModelConfig:
    """Build a `ModelConfig` from a transformers `PretrainedConfig`."""
    if getattr(hf_config, "model_type", None) == "gemma3" and hasattr(hf_config, "text_config"):
        hf_config = hf_config.text_config
    family = check_model_type(getattr(hf_config, "model_type", None), where)
    c = hf_config
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    rope_params = getattr(c, "rope_parameters", None) or {}
    layer_types = tuple(getattr(c, "layer_types", None) or ()) or None
    sliding_window = getattr(c, "sliding_window", None)
    local_rope = None
    if family == "gemma3":
        rope = RopeConfig.from_hf(rope_params.get("full_attention"), 1_000_000.0)
        local_rope = RopeConfig.from_hf(rope_params.get("sliding_attention"), 10_000.0)
    else:
        if "full_attention" in rope_params:
            rope_params = rope_params["full_attention"]
        rope = RopeConfig.from_hf(rope_params, 10_000.0)
    if family in ("qwen2", "qwen3") and not getattr(c, "use_sliding_window", False):
        sliding_window = None  # Qwen configs carry a window they do not use
    if family == "llama":
        sliding_window = None
    try:
        return _model_config(c, family, head_dim, rope, local_rope, sliding_window, layer_types)
    except ValueError as e:
        raise type(e)(f"{where}: {e}") from e


def _model_config(c, family, head_dim, rope, local_rope, sliding_window, layer_types) -> ModelConfig:
    return ModelConfig(
        family=family,
        vocab_size=c.vocab_size,
        hidden_size=c.hidden_size,
        intermediate_size=c.intermediate_size,
        num_layers=c.num_hidden_layers,
        num_heads=c.num_attention_heads,
        num_kv_heads=getattr(c, "num_key_value_heads", None) or c.num_attention_heads,
        head_dim=head_dim,
        rms_norm_eps=float(c.rms_norm_eps),
        rope=rope,
        local_rope=local_rope,
        sliding_window=sliding_window,
        layer_types=layer_types,
        qkv_bias=family == "qwen2" or bool(getattr(c, "attention_bias", False)),
        o_bias=bool(getattr(c, "attention_bias", False)) and family != "qwen2",
        mlp_bias=bool(getattr(c, "mlp_bias", False)),
        qk_norm=family in ("gemma3", "qwen3"),
        query_pre_attn_scalar=getattr(c, "query_pre_attn_scalar", None) if family == "gemma3" else None,
        attn_logit_softcap=getattr(c, "attn_logit_softcapping", None),
        final_logit_softcap=getattr(c, "final_logit_softcapping", None),
        tie_word_embeddings=bool(getattr(c, "tie_word_embeddings", False)),
        max_position_embeddings=int(getattr(c, "max_position_embeddings", 8192) or 8192),
        initializer_range=float(getattr(c, "initializer_range", 0.02) or 0.02),
        bos_token_id=getattr(c, "bos_token_id", None),
        eos_token_ids=_eos_ids(getattr(c, "eos_token_id", None)),
        pad_token_id=getattr(c, "pad_token_id", None),
    )


def _gemma3_layer_types(n: int, pattern: int = 6) -> tuple[str, ...]:
    return tuple("full_attention" if (i + 1) % pattern == 0 else "sliding_attention" for i in range(n))


# Full-size shapes, for eval_shape memory planning and benchmarks (no weights needed).
PRESETS: dict[str, ModelConfig] = {
    "gemma3-270m": ModelConfig(
        family="gemma3", vocab_size=262_144, hidden_size=640, intermediate_size=2048, num_layers=18,
        num_heads=4, num_kv_heads=1, head_dim=256, rope=RopeConfig(theta=1_000_000.0),
        local_rope=RopeConfig(theta=10_000.0), sliding_window=512, layer_types=_gemma3_layer_types(18),
        qk_norm=True, query_pre_attn_scalar=256, tie_word_embeddings=True, bos_token_id=2,
        eos_token_ids=(1, 106), pad_token_id=0,
    ),
    "gemma3-1b": ModelConfig(
        family="gemma3", vocab_size=262_144, hidden_size=1152, intermediate_size=6912, num_layers=26,
        num_heads=4, num_kv_heads=1, head_dim=256, rope=RopeConfig(theta=1_000_000.0),
        local_rope=RopeConfig(theta=10_000.0), sliding_window=512, layer_types=_gemma3_layer_types(26),
        qk_norm=True, query_pre_attn_scalar=256, tie_word_embeddings=True, bos_token_id=2,
        eos_token_ids=(1, 106), pad_token_id=0,
    ),
    "gemma3-4b": ModelConfig(
        family="gemma3", vocab_size=262_208, hidden_size=2560, intermediate_size=10240, num_layers=34,
        num_heads=8, num_kv_heads=4, head_dim=256, rope=RopeConfig(theta=1_000_000.0, kind="linear", factor=8.0),
        local_rope=RopeConfig(theta=10_000.0), sliding_window=1024, layer_types=_gemma3_layer_types(34),
        qk_norm=True, query_pre_attn_scalar=256, tie_word_embeddings=True, bos_token_id=2,
        eos_token_ids=(1, 106), pad_token_id=0,
    ),
    "llama3-8b": ModelConfig(
        family="llama", vocab_size=128_256, hidden_size=4096, intermediate_size=14336, num_layers=32,
        num_heads=32, num_kv_heads=8, head_dim=128, rms_norm_eps=1e-5,
        rope=RopeConfig(theta=500_000.0, kind="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                        original_max_position_embeddings=8192),
        bos_token_id=128000, eos_token_ids=(128001, 128009),
    ),
    "llama3-70b": ModelConfig(
        family="llama", vocab_size=128_256, hidden_size=8192, intermediate_size=28_672, num_layers=80,
        num_heads=64, num_kv_heads=8, head_dim=128, rms_norm_eps=1e-5,
        rope=RopeConfig(theta=500_000.0, kind="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                        original_max_position_embeddings=8192),
        bos_token_id=128000, eos_token_ids=(128001, 128009),
    ),
    "qwen2.5-0.5b": ModelConfig(
        family="qwen2", vocab_size=151_936, hidden_size=896, intermediate_size=4864, num_layers=24,
        num_heads=14, num_kv_heads=2, head_dim=64, rope=RopeConfig(theta=1_000_000.0), qkv_bias=True,
        tie_word_embeddings=True, eos_token_ids=(151643,),
    ),
    "qwen3-0.6b": ModelConfig(
        family="qwen3", vocab_size=151_936, hidden_size=1024, intermediate_size=3072, num_layers=28,
        num_heads=16, num_kv_heads=8, head_dim=128, rope=RopeConfig(theta=1_000_000.0), qk_norm=True,
        tie_word_embeddings=True, eos_token_ids=(151645,),
    ),
}


def preset(name: str) -> ModelConfig:
    if name not in PRESETS:
        raise KeyError(f"unknown model preset {name!r}; presets: {', '.join(sorted(PRESETS))}")
    return PRESETS[name]
