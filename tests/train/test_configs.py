"""The experiment configs: every .gin parses through run.py's registration; tiny_sft.gin runs end to end."""

import glob
import importlib
import json
import math
import os
import subprocess
import sys

import gin
import jax.numpy as jnp
import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIGS = sorted(glob.glob(os.path.join(REPO, "experiments", "configs", "*.gin")))
REAL = ["hh_harmless", "taskmaster_coffee", "taskmaster_ticketing"]
DATACLASSES = ("TuningConfig", "LoopConfig", "DataConfig", "OptimizerConfig")
OWN = {f"{d}_{m}.gin" for d in REAL for m in ("lora", "full")} | {"tiny_sft.gin"}  # single-stage runs


@pytest.fixture(scope="module")
def registered():
    """run.py imported once (its `run` is gin-configurable) and its `_register` applied once per process."""
    sys.path.insert(0, os.path.join(REPO, "experiments"))
    try:
        run = importlib.import_module("run")
    finally:
        sys.path.pop(0)
    try:
        gin.get_configurable("train_reward_model")
    except ValueError:  # not yet registered in this process
        run._register()
    yield run
    gin.clear_config()


def parse(path):
    """The configured option dataclasses of one config, built (their __post_init__ checks run)."""
    gin.clear_config()
    gin.parse_config_files_and_bindings([path], [], skip_unknown=False)
    job = gin.query_parameter("run.job").selector
    return job, {name: gin.get_configurable(name)() for name in DATACLASSES}


def bindings(path):
    gin.clear_config()
    gin.parse_config_files_and_bindings([path], [], skip_unknown=False)
    return {line for line in gin.config_str().splitlines() if line and not line.startswith("#")}


def test_every_config_parses(registered):
    names = {os.path.basename(p) for p in CONFIGS}
    assert OWN <= names
    for path in CONFIGS:
        job, built = parse(path)
        gin.get_configurable(job)  # the job is one of run.py's registered functions
        if os.path.basename(path) in OWN:
            opt, loop = built["OptimizerConfig"], built["LoopConfig"]
            # The schedule decays over exactly the run (its length, not repeated), after a shorter warm-up.
            assert opt.total_steps is None, path
            assert 0 <= opt.warmup_steps < loop.num_steps, path


def test_every_config_builds_every_option_in_every_scope(registered):
    """Each option dataclass a config binds, built in each gin scope it is bound in (its checks run)."""
    for path in CONFIGS:
        gin.clear_config()
        gin.parse_config_files_and_bindings([path], [], skip_unknown=False)
        assert registered.bound_options(), path  # every config binds some options
        registered.check_options()  # raises on the first wrong value
    gin.clear_config()
    gin.parse_config_files_and_bindings([os.path.join(REPO, "experiments", "configs", "quickstart.gin")], [])
    assert {("rl", "LoopConfig"), ("rm", "DataConfig"), ("sft", "OptimizerConfig")} <= set(registered.bound_options())


@pytest.mark.parametrize("binding, message", [
    ("LoopConfig.batch_size='four'", "LoopConfig.batch_size='four': expected an integer >= 1"),
    ("rl/LoopConfig.num_steps=5.5", "rl/LoopConfig.num_steps=5.5: expected an integer >= 1"),
    ("sft/OptimizerConfig.learning_rate=1e999", "sft/OptimizerConfig.learning_rate=inf: expected a finite number > 0"),
    ("rl/MeshConfig.data=0", "rl/MeshConfig.data=0: expected an integer >= 1 or -1"),
])
def test_a_wrong_value_names_its_gin_key_with_its_scope(registered, binding, message):
    gin.clear_config()
    gin.parse_config_files_and_bindings([os.path.join(REPO, "experiments", "configs", "quickstart.gin")], [binding])
    with pytest.raises(ValueError) as e:
        registered.check_options()
    assert str(e.value) == message


def test_a_config_without_a_job_is_an_error(registered):
    gin.clear_config()
    gin.parse_config_files_and_bindings([], ["LoopConfig.num_steps = 3"])
    with pytest.raises(ValueError, match=r"^the config names no job: bind run.job"):
        registered.check_options()


def _run_py(*args):
    env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"} | {"PYTHONPATH": REPO}
    return subprocess.run([sys.executable, os.path.join(REPO, "experiments", "run.py"), *args],
                          capture_output=True, text=True, env=env, timeout=300)


def test_a_wrong_value_fails_before_the_workdir_is_written(tmp_path):
    proc = _run_py("--gin_file", os.path.join(REPO, "experiments", "configs", "tiny_rm.gin"), "--workdir",
                   str(tmp_path / "wd"), "--gin_param", "LoopConfig.batch_size='four'")
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1] == "ValueError: LoopConfig.batch_size='four': expected an integer >= 1"
    assert not (tmp_path / "wd").exists()


def test_an_include_found_on_the_search_path_logs_no_error(tmp_path):
    """gin tries `include 'hh_rlhf.gin'` as a package resource first and logs "ERROR:root:Path not found";
    run.py drops that line, and the include is still read (its options reach the value check)."""
    proc = _run_py("--gin_file", os.path.join(REPO, "experiments", "configs", "hh_rlhf_rm.gin"), "--workdir",
                   str(tmp_path / "wd"),
                   "--gin_param", "rm/LoopConfig.batch_size='four'")
    assert proc.returncode == 1
    assert "Path not found" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == (
        "ValueError: rm/LoopConfig.batch_size='four': expected an integer >= 1")
    assert not (tmp_path / "wd").exists()


def test_a_missing_gin_file_is_named_with_the_shipped_configs(registered, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        registered.parse_args(["--gin_file", "experiments/configs/quikstart.gin", "--workdir", str(tmp_path / "wd")])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert ("--gin_file experiments/configs/quikstart.gin: no such file. Did you mean "
            "experiments/configs/quickstart.gin? Configs shipped in experiments/configs: hh_harmless_full.gin, ") in err
    assert all(os.path.basename(c) in err for c in CONFIGS)
    assert not (tmp_path / "wd").exists()


def test_help_lists_the_shipped_configs(registered, capsys):
    with pytest.raises(SystemExit) as e:
        registered.parse_args(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "configs shipped in experiments/configs:" in out
    for path in CONFIGS:
        assert f"  {os.path.basename(path)} " in out
    assert "\n  tiny_rm.gin                    A tiny LoRA Bradley-Terry reward model on 200 HH-harmless ...\n" in out


@pytest.mark.parametrize("dataset", REAL)
def test_real_reward_model_configs(registered, dataset):
    lora_path, full_path = (os.path.join(REPO, "experiments", "configs", f"{dataset}_{m}.gin")
                            for m in ("lora", "full"))
    job, lora_cfg = parse(lora_path)
    assert job == "train_reward_model"
    assert gin.query_parameter("train_reward_model.model") == "gemma3-270m"
    assert gin.query_parameter("named_dataset.name") == dataset
    tuning = lora_cfg["TuningConfig"]
    assert (tuning.mode, tuning.lora.rank, tuning.lora.alpha, tuning.lora.targets) == ("lora", 8, 16.0, "attention")
    assert 1e-4 <= lora_cfg["OptimizerConfig"].learning_rate <= 5e-4
    if dataset == "hh_harmless":
        assert lora_cfg["DataConfig"].eval_size == 300  # of the 1,800 pairs
    _, full_cfg = parse(full_path)
    assert full_cfg["TuningConfig"].mode == "full"
    assert 1e-5 <= full_cfg["OptimizerConfig"].learning_rate <= 3e-5
    # The pair differs in what trains and the learning rates only (full tuning gives the head its own).
    tuning_only = ("TuningConfig.", "LoRAConfig.", "OptimizerConfig.learning_rate",
                   "OptimizerConfig.head_learning_rate")
    same = lambda path: {b for b in bindings(path) if not b.startswith(tuning_only)}
    assert same(lora_path) == same(full_path)


@pytest.mark.slow
def test_tiny_sft_runs_end_to_end_and_exports(registered, tmp_path):
    from flax import nnx

    from pe_rlhf.checkpoints.orbax_io import RunCheckpointer
    from pe_rlhf.checkpoints import from_pretrained
    from pe_rlhf.models import lora, merging
    from pe_rlhf.models.tiny import tiny_model
    from pe_rlhf.train.optim import guard_nonfinite, make_optimizer
    from pe_rlhf.train.supervised import trainable_filter

    path = os.path.join(REPO, "experiments", "configs", "tiny_sft.gin")
    _, built = parse(path)
    workdir = tmp_path / "run"
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO)
    proc = subprocess.run([sys.executable, os.path.join(REPO, "experiments", "run.py"), "--gin_file", path,
                           "--workdir", str(workdir)], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.load(open(workdir / "summary.json"))
    vocab = tiny_model()[0].config.vocab_size
    assert summary["step"] == built["LoopConfig"].num_steps
    assert math.isfinite(summary["eval/perplexity"]) and 1.0 < summary["eval/perplexity"] < vocab, summary
    assert summary["eval/perplexity"] == pytest.approx(math.exp(summary["eval/loss"]), rel=1e-6)
    evals = [json.loads(line)["eval/loss"] for line in open(workdir / "metrics.jsonl") if "eval/loss" in line]
    assert len(evals) == 2 and evals[1] < evals[0]  # steps 20 and 40: still learning

    # The trained model, rebuilt here: the same base (load_backbone("tiny") = tiny_model seed 0), the
    # same adapter, and the trained adapter restored from the run's final checkpoint.
    tuning = built["TuningConfig"]
    model, tokenizer = tiny_model()
    lora.add_lora(model, "policy", tuning.lora)
    graphdef, trainable, frozen = nnx.split(model, trainable_filter(tuning, "policy"), ...)
    tx = guard_nonfinite(make_optimizer(built["OptimizerConfig"], built["LoopConfig"].num_steps))
    template = {"trainable": trainable, "opt_state": tx.init(trainable)}
    ckpt = RunCheckpointer(str(workdir / "checkpoints"))
    step, state, _ = ckpt.restore(template)
    ckpt.close()
    assert step == built["LoopConfig"].num_steps
    b_norm = sum(float(jnp.abs(v[...]).sum()) for p, v in nnx.to_flat_state(state["trainable"]) if p[-1] == "b")
    assert b_norm > 0.0  # b starts at zero: a trained adapter has moved it
    nnx.update(model, state["trainable"])

    exported, exported_tokenizer = from_pretrained(str(workdir / "export"))
    ids = tokenizer("Human: how do I bake bread?\n\nAssistant: Mix flour", add_special_tokens=False)["input_ids"]
    tokens_1xT = jnp.asarray([[tokenizer.bos_token_id] + ids], jnp.int32)
    assert exported_tokenizer(" Mix", add_special_tokens=False)["input_ids"] == tokenizer(
        " Mix", add_special_tokens=False)["input_ids"]
    trained = np.asarray(model(tokens_1xT))  # adapter applied as x@W + s*(x@a)@b
    merged = np.asarray(merging.merged_model(model, "policy")(tokens_1xT))  # W + s*a@b
    loaded = np.asarray(exported(tokens_1xT))
    with lora.use_adapters(model):
        base = np.asarray(model(tokens_1xT))
    np.testing.assert_array_equal(loaded, merged)  # the export is exactly the merged model
    np.testing.assert_allclose(loaded, trained, atol=1e-5, rtol=0)
    assert np.abs(loaded - base).max() > 1e-3  # and it carries the training, not the base alone


def test_tldr_config_data_stages_resolve(registered, shared_data, monkeypatch):
    """The draft TL;DR experiment: every stage's data, built from the config on the real files, split by post."""
    import copy

    from pe_rlhf.data import sources

    monkeypatch.setenv("PE_RLHF_DATA_DIR", shared_data)
    gin.clear_config()
    gin.parse_config_files_and_bindings([os.path.join(REPO, "experiments", "configs", "tldr.gin")], [],
                                        skip_unknown=False)
    registered.check_options()
    data = {key: copy.deepcopy(gin.query_parameter(key)) for key in (
        "sft/train_sft.dataset", "proxy/train_reward_model.dataset", "judge/train_reward_model.dataset",
        "train_policy.prompts", "lora_vs_full.held_out")}
    with gin.config_scope("refs_eval"):
        data["references"] = gin.get_configurable("dataset_part")()
    sizes = {key: len(d) for key, d in data.items()}
    assert sizes == {"sft/train_sft.dataset": 400 + 2068, "proxy/train_reward_model.dataset": 4183,
                     "judge/train_reward_model.dataset": 4255, "train_policy.prompts": 4183,
                     "lora_vs_full.held_out": 597, "references": 100}
    posts = {key: {sources.tldr_post(e.prompt) for e in d.examples} for key, d in data.items()}
    held = posts["lora_vs_full.held_out"] | posts["references"]
    for key in ("sft/train_sft.dataset", "proxy/train_reward_model.dataset", "judge/train_reward_model.dataset"):
        assert not posts[key] & held, key  # no stage trains on a held-out post
    assert not posts["judge/train_reward_model.dataset"] & posts["proxy/train_reward_model.dataset"]
    assert all(e.prompt.endswith("\n\nTL;DR:") for d in data.values() for e in d.examples)
    assert gin.query_parameter("lora_vs_full.arms").keys() == {"lora_attn_r8", "full"}
    assert (gin.query_parameter("EvalConfig.max_prompt_len"), gin.query_parameter("RLConfig.max_new_tokens")) == (400, 48)
    gin.clear_config()
