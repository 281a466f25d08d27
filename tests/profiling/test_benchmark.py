"""experiments/benchmark.py end to end on a tiny grid (CPU, in a subprocess): JSON, table, plots, ratios."""

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow  # every test runs experiments/benchmark.py in a subprocess

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(REPO, "experiments", "benchmark.py")


@pytest.fixture(scope="module")
def grid(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    cmd = [sys.executable, SCRIPT, "--local", "--preset-override", "tiny", "--presets", "gemma3-270m",
           "--tunings", "full", "lora4", "--rl-tunings", "lora4", "--stages", "rm", "remax", "ppo",
           "--rm-pairs", "2", "--rm-len", "16", "--rl-prompts", "2", "--prompt-len", "8", "--new-tokens", "4",
           "--ppo-epochs", "1", "--time-iters", "1", "--out", str(out)]
    env = dict(os.environ, JAX_PLATFORMS="cpu", MPLBACKEND="Agg")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, proc.stdout


def test_outputs_parse_and_lora_is_below_full(grid):
    out, stdout = grid
    with open(out / "results.json") as f:
        results = json.load(f)
    rows = {(r["stage"], r["tuning"]): r for r in results["rows"]}
    assert set(rows) == {("rm", "full"), ("rm", "lora-r4"), ("remax", "lora-r4"), ("ppo", "lora-r4")}
    for r in rows.values():
        m = r["memory"]
        assert r["peak_bytes"] == m["argument_bytes"] + m["output_bytes"] + m["temp_bytes"] - m["alias_bytes"] > 0
        assert r["median_step_s"] > 0
    assert rows[("rm", "lora-r4")]["peak_bytes"] < rows[("rm", "full")]["peak_bytes"]
    # the tiny gemma3: V=512, D=64, 2 layers, 4 heads x 16, 2 KV heads, F=128, tied; plus 2 qk-norms and
    # 4 block norms per layer and the final norm
    per_layer = 64 * 64 * 2 + 64 * 32 * 2 + 3 * 64 * 128 + 2 * 16 + 4 * 64
    assert results["param_counts"] == {"gemma3-270m": 512 * 64 + 2 * per_layer + 64}
    assert rows[("rm", "full")]["arg_bytes"]["trainable"] == (512 * 64 + 2 * per_layer + 64 + 65) * 4

    ratios = {r["comparison"]: r for r in results["ratios"]}
    rm_ratio = ratios["RM lora-r4 xla / RM full xla"]
    assert rm_ratio["memory"] == pytest.approx(rows[("rm", "lora-r4")]["peak_bytes"] / rows[("rm", "full")]["peak_bytes"])
    assert rm_ratio["memory"] < 1
    assert rm_ratio["speedup"] == pytest.approx(rows[("rm", "full")]["median_step_s"]
                                                / rows[("rm", "lora-r4")]["median_step_s"])
    remax_ppo = ratios["ReMax lora-r4 xla / PPO lora-r4 xla"]
    assert remax_ppo["memory"] == pytest.approx(rows[("remax", "lora-r4")]["peak_bytes"]
                                                / rows[("ppo", "lora-r4")]["peak_bytes"])
    assert "RM lora-r4 xla / RM full xla" in stdout and "ReMax lora-r4 xla / PPO lora-r4 xla" in stdout
    assert all(r["quantize"] == "none" and r["attention"] == "xla" for r in rows.values())  # 'auto' on a CPU


def test_table_plots_and_resume(grid):
    out, _ = grid
    table = (out / "table.md").read_text()
    assert table.count("| gemma3-270m |") == 4 + 2  # four rows of the grid, two ratio rows
    for name in ("peak_by_rank.png", "lora_full_ratio_by_size.png", "remax_ppo_ratio.png", "ratio_by_format.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    lines = (out / "rows.jsonl").read_text().splitlines()
    assert len(lines) == 4 and all(json.loads(line)["preset"] == "gemma3-270m" for line in lines)


def test_bad_arguments_are_clear_errors(tmp_path):
    run = lambda *a: subprocess.run([sys.executable, SCRIPT, *a, "--out", str(tmp_path)], capture_output=True,
                                    text=True, env=dict(os.environ, JAX_PLATFORMS="cpu"))
    proc = run("--topology", "v5e:2x2", "--time-iters", "2")
    assert proc.returncode == 2 and "--time-iters needs --local" in proc.stderr
    proc = run("--local", "--tunings", "lora", "--presets", "gemma3-270m")
    assert proc.returncode != 0 and "'lora' is not 'full' or 'lora<rank>'" in proc.stderr


def test_remat_rows_pair_with_the_remat_baseline_and_reports_reread_without_compiling(tmp_path):
    """--remat rows are compared with the full-remat row; --no-compile reports saved rows; other shapes are refused."""
    base = [sys.executable, SCRIPT, "--local", "--preset-override", "tiny", "--presets", "gemma3-270m",
            "--stages", "rm", "--rm-pairs", "2", "--rm-len", "16", "--out", str(tmp_path)]
    env = dict(os.environ, JAX_PLATFORMS="cpu", MPLBACKEND="Agg")
    run = lambda *a: subprocess.run(base + list(a), capture_output=True, text=True, env=env, timeout=600)
    proc = run("--tunings", "full", "lora4", "--remat")
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {r["tuning"]: r for r in json.load(open(tmp_path / "results.json"))["rows"]}
    assert set(rows) == {"full-remat", "lora-r4-remat"}
    ratios = json.load(open(tmp_path / "results.json"))["ratios"]
    assert len(ratios) == 1 and "full-remat" in ratios[0]["comparison"]
    assert ratios[0]["memory"] == pytest.approx(rows["lora-r4-remat"]["peak_bytes"] / rows["full-remat"]["peak_bytes"])

    (tmp_path / "results.json").unlink()
    proc = run("--tunings", "full", "lora4", "--remat", "--no-compile")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "[benchmark] gemma3-270m" not in proc.stdout  # nothing compiled, the saved rows reported
    assert json.load(open(tmp_path / "results.json"))["ratios"][0]["memory"] == ratios[0]["memory"]

    proc = subprocess.run([*base[:-4], "--rm-len", "32", "--out", str(tmp_path), "--tunings", "full", "--remat"],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode != 0 and "give another --out" in proc.stderr


def test_quantised_rows_are_compared_with_the_unquantised_full_baseline(tmp_path):
    """--quantize none nf4: the full RM is measured unquantised only; both LoRA rows are over that one row."""
    cmd = [sys.executable, SCRIPT, "--local", "--preset-override", "tiny", "--presets", "gemma3-270m", "--stages", "rm",
           "--tunings", "full", "lora4", "--frozen-dtype", "bfloat16", "--quantize", "none", "nf4",
           "--attention", "xla", "--rm-pairs", "2", "--rm-len", "16", "--out", str(tmp_path)]
    env = dict(os.environ, JAX_PLATFORMS="cpu", MPLBACKEND="Agg")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.load(open(tmp_path / "results.json"))
    rows = {(r["tuning"], r["quantize"]): r for r in results["rows"]}
    assert set(rows) == {("full", "none"), ("lora-r4", "none"), ("lora-r4", "nf4")}
    assert all(r["attention"] == "xla" for r in rows.values())
    # the tiny gemma3's decoder projections per layer (q/o 64x64, k/v 64x32, gate/up 64x128, down 128x64):
    # bf16 dense against nf4 (half a byte each, one bf16 scale per 64 inputs per output column)
    weights = 2 * (2 * 64 * 64 + 2 * 64 * 32 + 3 * 64 * 128)
    scales = 2 * ((64 + 32 + 32 + 64 + 128 + 128) + 2 * 64)
    frozen = {q: rows[("lora-r4", q)]["arg_bytes"]["frozen"] for q in ("none", "nf4")}
    assert frozen["none"] - frozen["nf4"] == weights * 2 - (weights // 2 + scales * 2)
    ratios = {r["comparison"]: r["memory"] for r in results["ratios"]}
    full = rows[("full", "none")]["peak_bytes"]
    assert ratios["RM lora-r4 bf16 nf4 xla / RM full bf16 xla"] == pytest.approx(rows[("lora-r4", "nf4")]["peak_bytes"]
                                                                                 / full)
    assert ratios["RM lora-r4 bf16 xla / RM full bf16 xla"] == pytest.approx(rows[("lora-r4", "none")]["peak_bytes"]
                                                                             / full)
    table = (tmp_path / "table.md").read_text()
    assert "| quantize | attention |" in table and "unquantised, XLA attention" in table
