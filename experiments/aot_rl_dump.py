"""One PE-ReMax step (LoRA r8 on attention, per-block remat, bf16 frozen weights) compiled ahead of time for a
TPU slice with XLA's buffer dump: per-chip arguments and temporaries, and the top of the compiler's breakdown of
the peak (which operations hold the bytes live at the peak).

    python experiments/aot_rl_dump.py --preset gemma3-1b --topology v5e:2x2 --prompt-len 256 --new-tokens 128 \\
        --dump runs/aot/dump_rl

`--no-rules` compiles with the activations left to XLA (`sharding.rules.activation_rules(None)`).
The TPU compiler reads its flags from LIBTPU_INIT_ARGS (e.g. `--xla_tpu_enable_latency_hiding_scheduler=false`).
"""

from __future__ import annotations

import argparse
import glob
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402

from pe_rlhf.models.config import preset  # noqa: E402
from pe_rlhf.models.lora import LoRAConfig  # noqa: E402
from pe_rlhf.profiling.aot import topology_devices  # noqa: E402
from pe_rlhf.profiling.measure import arg_shardings  # noqa: E402
from pe_rlhf.profiling.step_builders import build_rl_step  # noqa: E402
from pe_rlhf.sharding.mesh import MeshConfig, make_mesh  # noqa: E402
from pe_rlhf.sharding.rules import DEFAULT_RULES, activation_rules  # noqa: E402
from pe_rlhf.train.config import TuningConfig  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="gemma3-1b")
    p.add_argument("--topology", default="v5e:2x2")
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--prompt-len", type=int, default=256)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--quantize", default="nf4", choices=["none", "int8", "int4", "nf4"])
    p.add_argument("--attention", default="mosaic_tpu", choices=["xla", "mosaic_tpu"])
    p.add_argument("--no-rules", action="store_true", help="leave the activations to XLA")
    p.add_argument("--dump", required=True, help="folder for XLA's dump (*live-range.txt, *memory-usage-report.txt)")
    p.add_argument("--lines", type=int, default=12, help="lines of the peak's breakdown to print")
    args = p.parse_args(argv)
    tuning = TuningConfig(mode="lora", lora=LoRAConfig(rank=8, alpha=16.0, targets="attention"), remat=True)
    spec = build_rl_step(preset(args.preset), tuning, algorithm="remax", prompts=args.prompts,
                         prompt_len=args.prompt_len, new_tokens=args.new_tokens, frozen_dtype="bfloat16",
                         quantize=None if args.quantize == "none" else args.quantize, attention_impl=args.attention)
    mesh = make_mesh(MeshConfig(data=1, fsdp=-1), topology_devices(args.topology))
    start = time.time()
    with jax.set_mesh(mesh), jax.default_device(mesh.devices.flat[0]), \
            activation_rules(None if args.no_rules else DEFAULT_RULES):
        compiled = jax.jit(spec.fn, in_shardings=arg_shardings(spec, mesh), donate_argnums=spec.donate_argnums).lower(
            *spec.args).compile(compiler_options={"xla_dump_to": args.dump})
    m = compiled.memory_analysis()
    print(f"{spec.name} on {args.topology}, {args.prompts} x ({args.prompt_len} + {args.new_tokens}), rules "
          f"{'off' if args.no_rules else 'on'}, LIBTPU_INIT_ARGS={os.environ.get('LIBTPU_INIT_ARGS', '')!r}: "
          f"arguments {m.argument_size_in_bytes / 2**30:.3f} GiB, temporaries {m.temp_size_in_bytes / 2**30:.3f} GiB, "
          f"compile {time.time() - start:.0f} s")
    text = open(sorted(glob.glob(os.path.join(args.dump, "*live-range.txt")))[-1]).read()
    print("\n".join(text[text.index("Stack trace breakdown"):].splitlines()[:args.lines]))


if __name__ == "__main__":
    main()
