"""Memory of full fine-tuning beside LoRA for a model preset, from shapes alone (no weights).

    python experiments/lora_memory.py --model gemma3-270m --rank 8 [--targets attention] [--dtype bfloat16]

The model and its Adam state are built with `nnx.eval_shape` / `jax.eval_shape`, so
full-size presets cost no memory. Counted: frozen weights, trainable weights,
their gradients and Adam's mu and nu (plus its step count). Activations and
the KV cache are not counted: they depend on batch and sequence length, not on
the choice between full fine-tuning and LoRA.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from pe_rlhf.models.config import PRESETS, preset
from pe_rlhf.models.lora import LoRAConfig, LoRAParam, add_lora, lora_modules
from pe_rlhf.models.transformer import Transformer


def _bytes(tree) -> int:
    return sum(x.size * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def memory_rows(model_name: str, lora_config: LoRAConfig, dtype) -> tuple[dict, dict, str]:
    """Bytes per item for full fine-tuning and for LoRA, and the trainable-fraction line."""
    cfg = preset(model_name)
    report = {}

    def build_lora():
        model = Transformer(cfg, dtype=dtype, rngs=nnx.Rngs(0))
        report["count"] = add_lora(model, "policy", lora_config)
        return model

    full = nnx.eval_shape(lambda: Transformer(cfg, dtype=dtype, rngs=nnx.Rngs(0)))
    with_lora = nnx.eval_shape(build_lora)
    _, full_params = nnx.split(full, nnx.Param)
    _, adapters, frozen = nnx.split(with_lora, LoRAParam, ...)
    adam = optax.adam(1e-5)
    full_rows = {
        "frozen weights": 0,
        "trainable weights": _bytes(full_params),
        "gradients": _bytes(full_params),
        "Adam state (mu, nu, count)": _bytes(jax.eval_shape(adam.init, full_params)),
    }
    lora_rows = {
        "frozen weights": _bytes(frozen),
        "trainable weights": _bytes(adapters),
        "gradients": _bytes(adapters),
        "Adam state (mu, nu, count)": _bytes(jax.eval_shape(adam.init, adapters)),
    }
    n_modules = len(lora_modules(with_lora))
    line = (f"{model_name}: LoRA rank {lora_config.rank}, alpha {lora_config.alpha:g}, targets "
            f"{lora_config.targets!r} on {n_modules} projections; base weights {jnp.dtype(dtype).name}, "
            f"adapters {lora_config.param_dtype}\n{report['count']}")
    return full_rows, lora_rows, line


def _mib(n: int) -> str:
    return f"{n / 2**20:,.2f} MiB"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="gemma3-270m", choices=sorted(PRESETS))
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--alpha", type=float, default=16.0)
    parser.add_argument("--targets", default="attention", help="attention | mlp | all_linear | a regex")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                        help="dtype of the base weights (adapters and their Adam state stay float32)")
    args = parser.parse_args(argv)
    from pe_rlhf.sharding.distributed import quiet_tpu_probe

    quiet_tpu_probe()  # no libtpu errors at start-up on a machine without a TPU
    lora_config = LoRAConfig(rank=args.rank, alpha=args.alpha, targets=args.targets)
    full_rows, lora_rows, line = memory_rows(args.model, lora_config, jnp.dtype(args.dtype))

    print(line)
    print(f"{'':28s}{'full fine-tuning':>20s}{'LoRA':>20s}")
    for key in full_rows:
        print(f"{key:28s}{_mib(full_rows[key]):>20s}{_mib(lora_rows[key]):>20s}")
    full_total, lora_total = sum(full_rows.values()), sum(lora_rows.values())
    print(f"{'total':28s}{_mib(full_total):>20s}{_mib(lora_total):>20s}")
    train_state = lambda rows: rows["gradients"] + rows["Adam state (mu, nu, count)"]
    print(f"gradients + optimizer state: LoRA needs {train_state(lora_rows) / train_state(full_rows):.4%} "
          f"of full fine-tuning; total {lora_total / full_total:.2%}")


if __name__ == "__main__":
    main()
