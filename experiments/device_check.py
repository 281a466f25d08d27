"""The PE-RLHF steps on one GPU, inside a fixed time budget: time, compile time, peak memory, FLOPs, MFU.

    bash experiments/device_check.sh                     # a fresh GPU machine: installs, then runs this
    python experiments/device_check.py --out /tmp/device_check.json [--presets gemma3-270m] [--budget_s 420]
    python experiments/device_check.py --smoke --out /tmp/smoke.json   # CPU, tiny model, well under a minute

For each preset (random weights, built from the preset's shape: nothing is downloaded) five steps run, each
in its own process so that one step's peak memory is not another's and a failure (out of memory, a
compiler error, a timeout) is recorded while the others still run:

- rm_lora:    Bradley-Terry step, LoRA r8 on q/k/v/o + head, frozen backbone bf16      (`build_rm_step`)
- rm_full:    the same step, every weight trained, fp32 (a fully tuned RM freezes nothing)
- sampler:    greedy, EOS off, prompts x new tokens, bf16 weights                     (`sampling.sample`)
- remax_lora: PE-ReMax, one bf16 backbone with policy and reward adapters             (`build_rl_step`)
- ppo_full:   full PPO: fp32 policy and value model trained, bf16 anchor and reward model, 4 epochs

Per step: compile time (lower + compile), median step time over --iters calls after one warm-up call,
the device's peak bytes in use (`memory_stats()['peak_bytes_in_use']`, the step's process alone), XLA's
compiled peak (arguments + outputs + temporaries - aliased), XLA's FLOP count (`cost_analysis`; a loop's
body counted once, so only the RM steps' is whole), the model FLOPs counted from shapes
(`pe_rlhf.profiling.flops`: 2 / 4 / 6 x matmul weights x tokens, attention scores left out) and MFU
against the device's dense bf16 peak. The JSON has every figure, LoRA / full and ReMax / PPO ratios
(each the quotient of the two recorded numbers), jax and jaxlib versions and the device.

Budget: a step starts only when at least --min_step_s of --budget_s is left, and is stopped when the
budget runs out; steps not started are recorded as skipped. Presets run in the order given.

Attention: cuDNN's fused attention takes fp16 / bf16 inputs only, so under --attention_impl auto (cuDNN
on a GPU) the fp32 steps (rm_full, ppo_full) run the XLA attention; each step records which it ran.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import traceback

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # benchmark.py, beside this file
sys.path.insert(1, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # pe_rlhf, without an install

from pe_rlhf.profiling.flops import mfu, peak_bf16_flops  # noqa: E402 - jax is imported, no device is touched

STEPS = ("rm_lora", "rm_full", "sampler", "remax_lora", "ppo_full")
# What is stored in which dtype, per step (step_builders' layouts with frozen_dtype="bfloat16").
DTYPES = {
    "rm_lora": {"frozen": "bfloat16", "trained": "float32 (adapters, head, Adam)", "compute": "bfloat16"},
    "rm_full": {"frozen": None, "trained": "float32 master weights and Adam", "compute": "bfloat16 copy"},
    "sampler": {"frozen": "bfloat16", "trained": None, "compute": "bfloat16"},
    "remax_lora": {"frozen": "bfloat16 (one backbone)", "trained": "float32 (policy adapter, Adam)",
                   "compute": "bfloat16"},
    "ppo_full": {"frozen": "bfloat16 (anchor, reward model)",
                 "trained": "float32 master weights and Adam (policy, value model)", "compute": "bfloat16"},
}
SHAPES = {  # the device run, and --smoke
    "device": {"rm_pairs": 8, "rm_len": 2048, "rl_prompts": 8, "prompt_len": 512, "new_tokens": 256,
               "ppo_epochs": 4, "sampler_prompts": 32, "sampler_prompt_len": 128, "sampler_new_tokens": 128},
    "smoke": {"rm_pairs": 2, "rm_len": 32, "rl_prompts": 2, "prompt_len": 8, "new_tokens": 4,
              "ppo_epochs": 1, "sampler_prompts": 4, "sampler_prompt_len": 8, "sampler_new_tokens": 8},
}
RATIOS = {  # name: (numerator step, denominator step)
    "rm_lora_over_full": ("rm_lora", "rm_full"),
    "pe_remax_over_full_ppo": ("remax_lora", "ppo_full"),
}

NOTES = [
    "each step ran in its own process: peak_bytes_in_use is that step's alone (None where the backend "
    "gives no memory_stats, e.g. CPU); compiled_peak_bytes is XLA's memory analysis",
    "model_flops: matmul weights x tokens x 2 (forward) / 4 (forward + input gradients, frozen weights) "
    "/ 6 (forward + backward, trained weights), attention scores not counted (pe_rlhf.profiling.flops)",
    "xla_flops: XLA cost analysis, a loop body counted once: whole only for rm_lora and rm_full",
    "MFU is against the dense bf16 peak for every step; fp32 matmuls run as TF32, whose peak is half",
    "ratios are numerator / denominator of the recorded figures; speedup is the inverse time ratio",
]


# -- one step, in its own process ----------------------------------------------------------------------
def _config(task):
    from benchmark import model_config

    cfg = model_config(task["preset"], "tiny" if task["smoke"] else None, task["preset_index"])
    return dataclasses.replace(cfg, attention_impl=task["attention_impl"])


def _tuning(task):
    from benchmark import parse_tuning

    return parse_tuning("full" if task["step"].endswith("_full") else f"lora{task['lora_rank']}")


def run_train_step(task) -> dict:
    """rm_lora | rm_full | remax_lora | ppo_full: built by `step_builders`, compiled, timed on random arrays."""
    from pe_rlhf.profiling import flops, step_builders
    from pe_rlhf.profiling.measure import measure_step

    s, cfg, tuning = task["shapes"], _config(task), _tuning(task)
    full = tuning.mode == "full"
    if task["step"].startswith("rm"):
        spec = step_builders.build_rm_step(cfg, tuning, pairs=s["rm_pairs"], seq_len=s["rm_len"],
                                           frozen_dtype="bfloat16")
        model_flops = flops.rm_step_flops(cfg, pairs=s["rm_pairs"], seq_len=s["rm_len"], full=full)
    else:
        algorithm = task["step"].split("_")[0]
        shape = dict(prompts=s["rl_prompts"], prompt_len=s["prompt_len"], new_tokens=s["new_tokens"])
        spec = step_builders.build_rl_step(cfg, tuning, algorithm=algorithm, ppo_epochs=s["ppo_epochs"],
                                           frozen_dtype="bfloat16", **shape)
        model_flops = flops.rl_step_flops(cfg, algorithm=algorithm, full=full, ppo_epochs=s["ppo_epochs"], **shape)
    report = measure_step(spec, time_iters=task["iters"])
    return {"compile_s": report.compile_s, "median_step_s": report.median_step_s,
            "compiled_peak_bytes": report.peak_bytes, "xla_flops": report.flops, "model_flops": model_flops,
            "arg_bytes": report.arg_bytes}


def run_sampler(task) -> dict:
    """`sampling.sample`, jit-compiled whole, greedy with EOS off: every row makes exactly the new tokens."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from pe_rlhf.models.transformer import Transformer
    from pe_rlhf.profiling import flops
    from pe_rlhf.profiling.memory import lower_and_compile
    from pe_rlhf.profiling.timing import time_step
    from pe_rlhf.sampling import sample
    from pe_rlhf.profiling.measure import compiled_flops
    from pe_rlhf.sharding.memory import compiled_memory

    s, cfg = task["shapes"], _config(task)
    b, t, n = s["sampler_prompts"], s["sampler_prompt_len"], s["sampler_new_tokens"]
    graphdef, state = nnx.split(Transformer(cfg, dtype=jnp.bfloat16, rngs=nnx.Rngs(0)))
    prompt_BxT = jax.random.randint(jax.random.key(1), (b, t), 3, cfg.vocab_size, jnp.int32)
    mask_BxT = jnp.ones((b, t), bool)

    def generate(state, prompt_BxT, mask_BxT):
        model = nnx.merge(graphdef, state)
        return sample(model, prompt_BxT, mask_BxT, max_new_tokens=n, temperature=0.0, eos_ids=()).tokens_BxN

    start = time.perf_counter()
    compiled = lower_and_compile(generate, state, prompt_BxT, mask_BxT)
    compile_s = time.perf_counter() - start
    timing = time_step(compiled, (state, prompt_BxT, mask_BxT), warmup=1, iters=task["iters"])

    return {"compile_s": compile_s, "median_step_s": timing.median_s,
            "compiled_peak_bytes": compiled_memory(compiled).peak_bytes, "xla_flops": compiled_flops(compiled),
            "model_flops": flops.sample_flops(cfg, rows=b, prompt_len=t, new_tokens=n),
            "tokens_per_s": b * n / timing.median_s}


def probe() -> dict:
    import jax
    import jaxlib

    d = jax.devices()[0]
    return {"backend": jax.default_backend(), "device_kind": d.device_kind, "device_count": jax.device_count(),
            "memory_stats": bool(d.memory_stats()), "jax": jax.__version__, "jaxlib": jaxlib.__version__,
            "python": platform.python_version()}


def worker(task_path: str, result_path: str) -> None:
    with open(task_path) as f:
        task = json.load(f)
    if task["step"] == "probe":
        result = probe()
    else:
        import jax

        from pe_rlhf.profiling.memory import runtime_peak_bytes

        start = time.perf_counter()
        result = run_sampler(task) if task["step"] == "sampler" else run_train_step(task)
        result["peak_bytes_in_use"] = runtime_peak_bytes(jax.devices()[0])
        result["worker_s"] = time.perf_counter() - start
    with open(result_path, "w") as f:
        json.dump(result, f)


# -- the driver ----------------------------------------------------------------------------------------
def run_isolated(task: dict, timeout_s: float) -> dict:
    """`task` in a fresh Python process; its result, or {'status': 'error' | 'timeout', 'error': ...}."""
    with tempfile.TemporaryDirectory() as tmp:
        task_path, result_path = os.path.join(tmp, "task.json"), os.path.join(tmp, "result.json")
        with open(task_path, "w") as f:
            json.dump(task, f)
        cmd = [sys.executable, os.path.abspath(__file__), "--_worker", task_path, result_path]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=max(timeout_s, 1))
        except subprocess.TimeoutExpired as e:
            tail = (e.stderr or b"")[-2000:]
            return {"status": "timeout", "error": f"stopped after {timeout_s:.0f} s (the budget's end)",
                    "log_tail": tail.decode(errors="replace") if isinstance(tail, bytes) else tail}
        if proc.returncode != 0 or not os.path.exists(result_path):
            lines = [l for l in proc.stderr.strip().splitlines() if l.strip()]
            return {"status": "error", "error": lines[-1] if lines else f"exit status {proc.returncode}",
                    "log_tail": proc.stderr[-3000:]}
        with open(result_path) as f:
            return dict(json.load(f), status="ok")


def with_mfu(row: dict, peak_flops: float | None) -> dict:
    t = row.get("median_step_s")
    row["mfu_model_flops"] = mfu(row.get("model_flops"), t, peak_flops)
    # XLA counts a loop's body once: its count is the whole step only for the RM steps (no loop)
    row["mfu_xla_flops"] = mfu(row.get("xla_flops"), t, peak_flops) if row["step"].startswith("rm") else None
    return row


def _quotient(a, b):
    return None if a is None or b is None or not b else a / b


def ratios(rows: list[dict]) -> dict:
    """Per preset, for LoRA RM / full RM and PE-ReMax / full PPO: peak memory (runtime and compiled) and step
    time, each numerator / denominator (speedup = denominator time / numerator time)."""
    out = {}
    for preset in dict.fromkeys(r["preset"] for r in rows):
        mine = {r["step"]: r for r in rows if r["preset"] == preset and r["status"] == "ok"}
        for name, (a, b) in RATIOS.items():
            if a in mine and b in mine:
                ra, rb = mine[a], mine[b]
                out.setdefault(preset, {})[name] = {
                    "numerator": a, "denominator": b,
                    "peak_bytes_in_use": _quotient(ra.get("peak_bytes_in_use"), rb.get("peak_bytes_in_use")),
                    "compiled_peak_bytes": _quotient(ra.get("compiled_peak_bytes"), rb.get("compiled_peak_bytes")),
                    "median_step_s": _quotient(ra.get("median_step_s"), rb.get("median_step_s")),
                    "speedup": _quotient(rb.get("median_step_s"), ra.get("median_step_s"))}
    return out


def _fmt(x, scale=1.0, spec=".2f"):
    return "-" if x is None else format(x / scale, spec)


def table(result: dict) -> str:
    lines = [f"{result['device'].get('device_kind', '?')} ({result['device'].get('backend', '?')}), jax "
             f"{result['versions'].get('jax', '?')}, jaxlib {result['versions'].get('jaxlib', '?')}",
             f"{'preset':12s} {'step':11s} {'status':8s} {'compile s':>9s} {'step s':>8s} {'peak GiB':>8s} "
             f"{'XLA GiB':>8s} {'model TF':>8s} {'MFU':>6s} {'tok/s':>8s}"]
    for r in result["steps"]:
        lines.append(f"{r['preset']:12s} {r['step']:11s} {r['status']:8s} {_fmt(r.get('compile_s'), spec='.1f'):>9s} "
                     f"{_fmt(r.get('median_step_s'), spec='.4f'):>8s} {_fmt(r.get('peak_bytes_in_use'), 2**30):>8s} "
                     f"{_fmt(r.get('compiled_peak_bytes'), 2**30):>8s} {_fmt(r.get('model_flops'), 1e12, '.3f'):>8s} "
                     f"{_fmt(r.get('mfu_model_flops'), 0.01, '.1f') + ('%' if r.get('mfu_model_flops') else ''):>6s} "
                     f"{_fmt(r.get('tokens_per_s'), spec='.0f'):>8s}")
        if r["status"] != "ok":
            lines.append(f"    {r['status']}: {r.get('error', '')}"[:200])
    for preset, group in result["ratios"].items():
        for name, q in group.items():
            lines.append(f"{preset:12s} {name:24s} peak {_fmt(q['peak_bytes_in_use'], spec='.3f')} "
                         f"(XLA {_fmt(q['compiled_peak_bytes'], spec='.3f')}), time {_fmt(q['median_step_s'], spec='.3f')} "
                         f"(speed-up {_fmt(q['speedup'])}x)")
    return "\n".join(lines)


def write(path: str, device: dict, peak: tuple, args, shapes: dict, min_step_s: float, rows: list[dict],
          elapsed_s: float, finished: bool) -> dict:
    """The JSON (rewritten after every step, so a run stopped from outside still leaves what it measured)."""
    result = {
        "device": {**{k: device[k] for k in ("backend", "device_kind", "device_count", "memory_stats")},
                   "peak_bf16_flops": peak[0], "peak_source": peak[1]},
        "versions": {"jax": device["jax"], "jaxlib": device["jaxlib"], "python": device["python"]},
        "config": {"smoke": args.smoke, "presets": args.presets, "steps": args.steps, "budget_s": args.budget_s,
                   "min_step_s": min_step_s, "iters": args.iters, "lora_rank": args.lora_rank,
                   "attention_impl": args.attention_impl, "shapes": shapes, "weights": "random (preset shapes)",
                   "xla_python_client_preallocate": os.environ.get("XLA_PYTHON_CLIENT_PREALLOCATE")},
        "notes": NOTES,
        "steps": rows,
        "ratios": ratios(rows),
        "elapsed_s": elapsed_s,
        "finished": finished,
    }
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump(result, f, indent=2)
    os.replace(path + ".tmp", path)
    return result


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=None, help="JSON path (default $OUT/device_check.json when $OUT is set)")
    p.add_argument("--presets", nargs="+", default=None,
                   help="default gemma3-270m gemma3-1b (--smoke: gemma3-270m, as a tiny model of its family)")
    p.add_argument("--steps", nargs="+", default=list(STEPS), choices=STEPS)
    p.add_argument("--budget_s", type=float, default=420.0, help="hard limit on the whole run, seconds")
    p.add_argument("--min_step_s", type=float, default=None,
                   help="start a step only with this much budget left (default 45; --smoke 5)")
    p.add_argument("--iters", type=int, default=3, help="timed calls per step, after one warm-up call")
    p.add_argument("--lora_rank", type=int, default=8)
    p.add_argument("--attention_impl", default="auto", choices=["auto", "xla", "cudnn"])
    p.add_argument("--smoke", action="store_true", help="CPU, tiny models of each preset's family, tiny shapes")
    for name, value in SHAPES["device"].items():
        p.add_argument(f"--{name}", type=int, default=None, help=f"default {value} (smoke {SHAPES['smoke'][name]})")
    p.add_argument("--_worker", nargs=2, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.presets is None:
        args.presets = ["gemma3-270m"] if args.smoke else ["gemma3-270m", "gemma3-1b"]
    if args.out is None and not args._worker:
        if not os.environ.get("OUT"):
            p.error("--out is needed when $OUT is not set")
        args.out = os.path.join(os.environ["OUT"], "device_check.json")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args._worker:
        worker(*args._worker)
        return 0
    start = time.monotonic()
    if args.smoke:
        os.environ["JAX_PLATFORMS"] = "cpu"  # inherited by every step's process
    shapes = {k: v if getattr(args, k) is None else getattr(args, k)
              for k, v in SHAPES["smoke" if args.smoke else "device"].items()}
    min_step_s = args.min_step_s if args.min_step_s is not None else (5.0 if args.smoke else 45.0)
    left = lambda: args.budget_s - (time.monotonic() - start)

    device = run_isolated({"step": "probe"}, min(120.0, left()))
    if device.get("status") != "ok":
        print(f"[device_check] JAX could not start: {device.get('error')}\n{device.get('log_tail', '')}",
              file=sys.stderr)
        return 2
    if not args.smoke and device["backend"] != "gpu":
        print(f"[device_check] no GPU visible to JAX: backend {device['backend']!r}, device "
              f"{device['device_kind']!r}. Install a CUDA build of jaxlib (experiments/device_check.sh does: "
              "pip install 'jax[cuda12]==<jax version>'), check `nvidia-smi`, or use --smoke for a CPU run.",
              file=sys.stderr)
        return 3
    peak_flops, peak_source = peak_bf16_flops(device["device_kind"])
    print(f"[device_check] {device['device_kind']} ({device['backend']} x{device['device_count']}), jax "
          f"{device['jax']}, jaxlib {device['jaxlib']}; peak bf16 "
          f"{'unknown' if peak_flops is None else f'{peak_flops / 1e12:.1f} TFLOP/s'}", flush=True)

    rows = []
    for index, preset in enumerate(args.presets):
        for step in args.steps:
            impl = args.attention_impl
            row = {"preset": preset, "step": step, "dtypes": DTYPES[step], "attention_impl": impl,
                   "lora_rank": None if step.endswith("_full") or step == "sampler" else args.lora_rank}
            if left() < min_step_s:
                row.update(status="skipped", error=f"{left():.0f} s of the budget left (< {min_step_s:.0f} s)")
            else:
                task = {"step": step, "preset": preset, "preset_index": index, "smoke": args.smoke,
                        "shapes": shapes, "iters": args.iters, "lora_rank": args.lora_rank, "attention_impl": impl}
                print(f"[device_check] {preset} {step} ({left():.0f} s of the budget left) ...", flush=True)
                t0 = time.monotonic()
                row.update(run_isolated(task, left()))
                row["wall_s"] = time.monotonic() - t0
                if row["status"] != "ok":
                    print(f"[device_check]   {row['status']}: {row['error']}", flush=True)
            rows.append(with_mfu(row, peak_flops))
            write(args.out, device, (peak_flops, peak_source), args, shapes, min_step_s, rows,
                  time.monotonic() - start, finished=False)

    result = write(args.out, device, (peak_flops, peak_source), args, shapes, min_step_s, rows,
                   time.monotonic() - start, finished=True)
    print(table(result))
    print(f"[device_check] wrote {args.out} in {result['elapsed_s']:.0f} s")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except Exception:  # noqa: BLE001 - the driver itself failing must still say why
        traceback.print_exc()
        sys.exit(1)
