"""`python -m pe_rlhf`: generate from a run, score JSONL files, export runs that transformers and PEFT load.

The runs are tiny and short (the `tiny` model, a few steps), trained here by the library's own loops.
"""

import io
import json
import os
import random
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest

from pe_rlhf import cli
from pe_rlhf import data as D
from pe_rlhf.data import toy
from pe_rlhf.eval import judge as J
from pe_rlhf.train import metrics as M
from pe_rlhf.eval import winrate as W
from pe_rlhf.models import lora
from pe_rlhf.models.tiny import tiny_model
from pe_rlhf.runs import RunError, TrainedRun, export_run, policy_source, reward_model_workdir
from pe_rlhf.train.optim import OptimizerConfig
from pe_rlhf.train.policy import RLConfig
from pe_rlhf.train.rl_loop import train_policy
from pe_rlhf.train.supervised import DataConfig, LoopConfig, TuningConfig, train_reward_model, train_sft

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, JAX_PLATFORMS="cpu")
PROMPT = "Human: how do I bake a cake?\n\nAssistant:"


def _pairs(n, seed=0):
    """A response ending in '!' is preferred to one ending in '.' (as in test_reward_training)."""
    rng = random.Random(seed)

    def text(end):
        return "".join(rng.choice("abcdefgh ") for _ in range(rng.randint(3, 9))) + end

    return [D.PreferenceExample("Q: say it", text("!"), text(".")) for _ in range(n)]


def _loop(steps):
    return LoopConfig(num_steps=steps, batch_size=4, eval_every=0, log_every=steps, checkpoint_every=steps,
                      progress_bar=False)


@pytest.fixture(scope="module")
def rm_dir(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("rm"))
    train_reward_model(workdir=workdir, dataset=D.Loaded(tuple(_pairs(64)), "synthetic"), model="tiny",
                       tuning=TuningConfig(mode="lora", lora=lora.LoRAConfig(rank=4, alpha=8.0)),
                       optimizer=OptimizerConfig(learning_rate=1e-2, schedule="constant"), loop=_loop(8),
                       data=DataConfig(max_prompt_len=12, max_response_len=12, eval_size=8))
    return workdir


@pytest.fixture(scope="module")
def rl_dir(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("rl"))

    def longer_is_better(prompt, prompt_mask, response, response_mask):
        return response_mask.mean(axis=1).astype(jnp.float32)

    train_policy(workdir=workdir, prompts=toy.prompts(32), model="tiny", reward_fn=longer_is_better,
                 tuning=TuningConfig(mode="lora", lora=lora.LoRAConfig(rank=4, alpha=8.0)),
                 rl=RLConfig(algorithm="remax", max_new_tokens=8),
                 optimizer=OptimizerConfig(learning_rate=3e-2, schedule="constant"), loop=_loop(3),
                 data=DataConfig(max_prompt_len=48, eval_size=4))
    return workdir


# -- generate and chat ------------------------------------------------------------------------------
@pytest.mark.slow
def test_generate_from_an_rl_workdir_streams_the_greedy_tokens_of_sample(rl_dir, capsys):
    tokens = cli.main(["generate", "--model", rl_dir, "--prompt", PROMPT, "--max_new_tokens", "12"])
    model, tokenizer, _ = W.load_policy(rl_dir)
    (ref,), = W.generate_responses(model, tokenizer, [PROMPT], W.GenerationConfig(
        max_prompt_len=512, max_new_tokens=12, temperature=0.0, batch_size=1))
    assert tokens == list(ref.tokens) and len(tokens) > 0
    assert capsys.readouterr().out == PROMPT + tokenizer.decode(tokens, skip_special_tokens=True) + "\n"


@pytest.mark.slow
def test_generate_script_takes_a_run_workdir(rl_dir):
    r = subprocess.run([sys.executable, os.path.join(REPO, "experiments", "generate.py"), "--model", rl_dir,
                        "--prompt", PROMPT, "--max_new_tokens", "4"], env=ENV, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.startswith(PROMPT)
    assert f"{rl_dir} (remax, lora, step 3)" in r.stderr


@pytest.mark.parametrize("command", ["generate", "chat"])
@pytest.mark.parametrize("flag, value, expected", [
    ("--max_new_tokens", "-3", "expected an integer >= 1, got -3"),
    ("--max_new_tokens", "0", "expected an integer >= 1, got 0"),
    ("--temperature", "-0.5", "expected a finite number >= 0, got -0.5"),
    ("--temperature", "nan", "expected a finite number >= 0, got nan"),
    ("--top_p", "0", "expected a finite number in (0, 1], got 0"),
    ("--top_p", "1.5", "expected a finite number in (0, 1], got 1.5"),
    ("--top_k", "0", "expected an integer >= 1, got 0"),
    ("--top_k", "2.5", "expected an integer >= 1, got 2.5"),
])
def test_a_sampling_argument_out_of_range_is_an_argparse_error_naming_the_flag(command, flag, value, expected,
                                                                                capsys):
    argv = [command, "--model", "tiny", flag, value] + (["--prompt", "hi"] if command == "generate" else [])
    with pytest.raises(SystemExit) as e:
        cli.main(argv)  # refused while parsing: no model is loaded
    assert e.value.code == 2
    assert f"error: argument {flag}: {expected}" in capsys.readouterr().err
    args = cli.parser().parse_args([command, "--model", "tiny", "--top_p", "1", "--top_k", "1", "--temperature", "0",
                                    "--max_new_tokens", "1"] + (["--prompt", "hi"] if command == "generate" else []))
    assert (args.top_p, args.top_k, args.temperature, args.max_new_tokens) == (1.0, 1, 0.0, 1)  # the bounds are in


@pytest.mark.slow
def test_chat_uses_the_hh_format_without_a_template_and_keeps_the_conversation(rl_dir, monkeypatch, capsys):
    monkeypatch.setattr(sys, "stdin", io.StringIO("how do I bake a cake?\nand a car?\n/exit\n"))
    history = cli.main(["chat", "--model", rl_dir, "--max_new_tokens", "6"])
    assert [m["role"] for m in history] == ["user", "assistant", "user", "assistant"]
    _, tokenizer, _ = W.load_policy(rl_dir)
    ids, stops = cli.chat_ids(tokenizer, history[:3], 512)
    assert stops == (cli.HUMAN,)
    text = f"\n\nHuman: how do I bake a cake?\n\nAssistant: {history[1]['content']}\n\nHuman: and a car?\n\nAssistant:"
    assert tokenizer.decode(ids, skip_special_tokens=True) == text
    assert capsys.readouterr().out.count("assistant>") == 2


def test_streamed_text_stops_at_the_next_human_turn_and_never_shows_part_of_it(monkeypatch):
    import argparse

    import pe_rlhf.sampling

    model, tokenizer = tiny_model()
    ids = tokenizer(" Sure.\n\nHuman: more", add_special_tokens=False).input_ids
    monkeypatch.setattr(pe_rlhf.sampling, "stream", lambda *a, **k: iter(ids))
    shown = []

    class Out:
        def write(self, s):
            shown.append(s)

        def flush(self):
            pass

    args = argparse.Namespace(seed=0, max_new_tokens=64, temperature=0.0, top_k=None, top_p=None)
    tokens, text = cli.stream_text(model, tokenizer, [2], args, stops=(cli.HUMAN,), out=Out())
    assert text == "".join(shown) == " Sure."
    assert len([s for s in shown if s]) == len(" Sure.")  # one character a token, shown as each came
    assert tokens == ids[:len(" Sure.\n\nHuman:")]


def test_chat_ids_apply_the_tokenizer_chat_template():
    _, tokenizer = tiny_model()
    tokenizer.chat_template = "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}<assistant>"
    ids, stops = cli.chat_ids(tokenizer, [{"role": "user", "content": "hi"}], 512)
    assert stops == () and tokenizer.decode(ids) == "<user>hi<assistant>"


def test_an_experiment_workdir_needs_its_rl_line_named(tmp_path):
    def stage(path, name):
        os.makedirs(path, exist_ok=True)
        (path / "run_info.json").write_text(json.dumps({"stage": name}))

    for sub, name in (("sft", "sft"), ("proxy_rm", "reward_model"), ("judge_rm", "reward_model"),
                      ("rl/remax", "rl")):
        stage(tmp_path / sub, name)
    assert policy_source(str(tmp_path)) == str(tmp_path / "rl" / "remax")  # one line: no doubt
    stage(tmp_path / "rl" / "ppo", "rl")
    with pytest.raises(RunError, match=r"2 RL policies \(ppo, remax\); name one: .*rl/<line>"):
        policy_source(str(tmp_path))
    with pytest.raises(RunError, match="proxy_rm or .*judge_rm"):
        reward_model_workdir(str(tmp_path))
    assert policy_source("tiny") == "tiny"
    # a pipeline: rl/ is the policy, reward_model/ the reward model
    pipe = tmp_path / "pipe"
    for sub, name in (("sft", "sft"), ("reward_model", "reward_model"), ("rl", "rl")):
        stage(pipe / sub, name)
    assert policy_source(str(pipe)) == str(pipe / "rl")
    assert reward_model_workdir(str(pipe)) == str(pipe / "reward_model")
    with pytest.raises(RunError, match="an rl run, not a reward model"):
        reward_model_workdir(str(pipe / "rl"))


# -- score ------------------------------------------------------------------------------------------
def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _scorer(rm_dir):
    rm, tokenizer, _ = W.load_reward_model(rm_dir)
    return J.reward_model_scorer(rm, tokenizer)


@pytest.mark.slow
def test_score_pairs_prints_the_pairwise_accuracy_of_the_reward_model(rm_dir, tmp_path, capsys):
    pairs = _pairs(12, seed=5)
    path = _write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": e.prompt, "chosen": e.chosen, "rejected": e.rejected}
                                                   for e in pairs])
    out = tmp_path / "scores.jsonl"
    result = cli.main(["score", "--reward_model", rm_dir, "--jsonl", path, "--out", str(out)])
    score = _scorer(rm_dir)
    prompts = [e.prompt for e in pairs]
    chosen, rejected = score(prompts, [e.chosen for e in pairs]), score(prompts, [e.rejected for e in pairs])
    expected = M.pairwise_metrics(chosen, rejected)
    assert f"pairwise accuracy: {expected['pairwise_accuracy']:.4f} over 12 pairs" in capsys.readouterr().out
    assert result["pairwise_accuracy"] == expected["pairwise_accuracy"]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    np.testing.assert_allclose([r["score_chosen"] for r in rows], chosen, atol=1e-6)
    np.testing.assert_allclose([r["margin"] for r in rows], chosen - rejected, atol=1e-6)


@pytest.mark.slow
def test_score_labelled_rows_and_plain_responses(rm_dir, tmp_path, capsys):
    rows = [{"prompt": "Q: say it", "response": r, "label": float(r.endswith("!"))}
            for e in _pairs(6, seed=7) for r in (e.chosen, e.rejected)]
    result = cli.main(["score", "--reward_model", rm_dir, "--jsonl", _write_jsonl(tmp_path / "labeled.jsonl", rows)])
    scores = _scorer(rm_dir)([r["prompt"] for r in rows], [r["response"] for r in rows])
    expected = M.classification_metrics(scores, np.asarray([r["label"] for r in rows]))
    assert (f"accuracy (score > 0): {expected['accuracy']:.4f}, ROC AUC: {expected['roc_auc']:.4f} over 12 examples"
            in capsys.readouterr().out)
    assert result["roc_auc"] == expected["roc_auc"]

    path = _write_jsonl(tmp_path / "responses.jsonl",
                        [{"prompt": r["prompt"], "response": r["response"]} for r in rows])
    cli.main(["score", "--reward_model", rm_dir, "--jsonl", path])
    printed = [line.split("\t") for line in capsys.readouterr().out.splitlines()]
    np.testing.assert_allclose([float(p[1]) for p in printed], scores, atol=1e-4)

    cli.main(["score", "--reward_model", rm_dir, "--prompt", rows[0]["prompt"], "--response", rows[0]["response"]])
    assert float(capsys.readouterr().out) == pytest.approx(scores[0], abs=1e-4)


@pytest.mark.slow
def test_score_rejects_a_file_of_another_shape(rm_dir, tmp_path):
    path = _write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": "hi"}])
    with pytest.raises(D.DataError, match=r"prompts.jsonl:1: fields \['prompt'\]; expected pairs"):
        cli.main(["score", "--reward_model", rm_dir, "--jsonl", path])


# -- export -----------------------------------------------------------------------------------------
TOKENS_BxT = np.array([[2, 40, 41, 42, 10, 11, 12, 13], [2, 50, 60, 70, 80, 90, 30, 31]])


def _ours(model):
    return np.asarray(model(jnp.asarray(TOKENS_BxT)))


def _theirs(hf_model):
    import torch

    with torch.no_grad():
        return hf_model(torch.tensor(TOKENS_BxT)).logits.numpy()


def _load_hf(directory):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(directory, attn_implementation="eager").eval()


@pytest.mark.slow
def test_export_an_rl_run_merged_and_as_peft(rl_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoTokenizer

    written = cli.main(["export", "--run", rl_dir, "--out", str(tmp_path)])
    assert sorted(written) == ["base", "merged", "peft"]  # the base is `tiny`: PEFT gets it written beside
    policy, tokenizer, _ = W.load_policy(rl_dir)
    ours = _ours(policy)
    np.testing.assert_allclose(_theirs(_load_hf(written["merged"])), ours, atol=1e-4, rtol=0)
    base_hf = _load_hf(written["base"])
    base = _theirs(base_hf)
    assert np.abs(base - ours).max() > 1e-3  # RL moved the policy, so the matches here mean something
    config = json.loads(open(os.path.join(written["peft"], "adapter_config.json")).read())
    assert config["base_model_name_or_path"] == written["base"]
    np.testing.assert_allclose(_theirs(PeftModel.from_pretrained(base_hf, written["peft"]).eval()), ours,
                               atol=1e-4, rtol=0)
    for directory in (written["merged"], written["peft"]):  # the tokenizer travels with both
        assert AutoTokenizer.from_pretrained(directory)(PROMPT).input_ids == tokenizer(PROMPT).input_ids
    with pytest.raises(RunError, match="no reward head"):
        cli.main(["export", "--run", rl_dir, "--out", str(tmp_path / "x"), "--format", "head"])


def test_export_into_a_directory_that_is_not_empty_needs_overwrite(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()  # an empty directory is fine
    assert sorted(cli.main(["export", "--run", "tiny", "--out", str(out), "--format", "merged"])) == ["merged"]
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    (out / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match=f"^export --out {out}: the directory exists and is not empty "
                                         r"\(merged, notes.txt\); nothing was written. .*--overwrite"):
        cli.main(["export", "--run", "tiny", "--out", str(out), "--format", "merged"])
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.name != "notes.txt"} == before
    written = cli.main(["export", "--run", "tiny", "--out", str(out), "--format", "merged", "--overwrite"])
    assert (out / "notes.txt").read_text() == "mine"  # replaced: the exports; other files are left
    assert (out / "merged" / "config.json").stat().st_mtime_ns > before[out / "merged" / "config.json"]
    assert written == {"merged": str(out / "merged")}
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="a file, not a directory; nothing was written"):
        cli.main(["export", "--run", "tiny", "--out", str(tmp_path / "file")])


@pytest.mark.slow
def test_export_an_sft_run_restores_what_its_own_export_holds(tmp_path):
    from peft import PeftModel

    sft = str(tmp_path / "sft")
    train_sft(workdir=sft, dataset=toy.sft_demonstrations(32), model="tiny",
              tuning=TuningConfig(mode="lora", lora=lora.LoRAConfig(rank=4, alpha=8.0)),
              optimizer=OptimizerConfig(learning_rate=3e-2, schedule="constant"), loop=_loop(3),
              data=DataConfig(max_prompt_len=48, max_response_len=32, eval_size=4))
    written = cli.main(["export", "--run", sft, "--out", str(tmp_path / "out"), "--format", "peft"])
    assert sorted(written) == ["base", "peft"]
    ours = _ours(W.load_policy(sft)[0])  # the SFT run's own export/, LoRA merged
    base_hf = _load_hf(written["base"])
    assert np.abs(_theirs(base_hf) - ours).max() > 1e-3  # SFT moved the model
    peft_model = PeftModel.from_pretrained(base_hf, written["peft"]).eval()
    np.testing.assert_allclose(_theirs(peft_model), ours, atol=1e-4, rtol=0)


@pytest.mark.slow
def test_export_a_reward_model_head_that_reproduces_its_scores(rm_dir, tmp_path):
    import torch
    from safetensors.numpy import load_file

    written = cli.main(["export", "--run", rm_dir, "--out", str(tmp_path)])
    assert sorted(written) == ["base", "head", "merged", "peft"]
    head = json.loads(open(os.path.join(written["head"], "reward_head.json")).read())
    tensors = load_file(os.path.join(written["head"], "reward_head.safetensors"))
    assert head["backbone"] == written["merged"] and tensors["weight"].shape == (head["hidden_size"],)
    _, tokenizer = tiny_model()
    texts = [("Q: say it", " abc!"), ("Q: say it", " hg fe."), ("Hello", " there, friend")]
    ids = [[head["bos_token_id"]] + tokenizer(p, add_special_tokens=False).input_ids
           + tokenizer(r, add_special_tokens=False).input_ids + [head["eos_token_id"]] for p, r in texts]
    length = max(map(len, ids))
    tokens = torch.tensor([x + [0] * (length - len(x)) for x in ids])
    mask = torch.tensor([[1] * len(x) + [0] * (length - len(x)) for x in ids])
    with torch.no_grad():
        hidden = _load_hf(written["merged"]).model(tokens, attention_mask=mask).last_hidden_state.numpy()
    last = hidden[np.arange(len(ids)), [len(x) - 1 for x in ids]]
    theirs = last @ tensors["weight"] + tensors["bias"]
    ours = _scorer(rm_dir)([p for p, _ in texts], [r for _, r in texts])
    assert np.ptp(ours) > 1e-3  # the head and adapter trained: scores differ between texts
    np.testing.assert_allclose(theirs, ours, atol=1e-4, rtol=0)


def test_exports_carry_the_chat_template(tmp_path):
    from transformers import AutoTokenizer

    model, tokenizer = tiny_model()
    tokenizer.chat_template = "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}<assistant>"
    written = export_run(TrainedRun("model", model, tokenizer, None, "tiny"), str(tmp_path))
    assert sorted(written) == ["merged"]  # a plain model: no adapter, no head
    assert AutoTokenizer.from_pretrained(written["merged"]).chat_template == tokenizer.chat_template


def test_top_level_help_lists_the_commands_and_the_shipped_configs():
    r = subprocess.run([sys.executable, "-m", "pe_rlhf", "--help"], env=ENV, capture_output=True, text=True,
                       timeout=60, cwd=REPO)
    assert r.returncode == 0, r.stderr
    for command in ("generate", "chat", "score", "export", "train"):
        assert f"    {command}" in r.stdout
    configs = sorted(f for f in os.listdir(os.path.join(REPO, "experiments", "configs")) if f.endswith(".gin"))
    for name in configs:
        assert name in r.stdout
    assert "A tiny LoRA Bradley-Terry reward model" in r.stdout  # tiny_rm.gin's first comment line


def test_train_is_the_gin_entry_point():
    r = subprocess.run([sys.executable, "-m", "pe_rlhf", "train", "--help"], env=ENV, capture_output=True, text=True,
                       timeout=120, cwd=REPO)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "--gin_file" in r.stdout and "tiny_rm.gin" in r.stdout
