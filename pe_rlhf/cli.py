"""`python -m pe_rlhf <command>`: use a trained model from the command line.

A policy (`--model`) is a model source (`tiny`, `gemma3-270m`, a Hugging Face directory, a .gguf
file) or a run workdir: an SFT or RL run, a pipeline's (its `rl/`), or an experiment's
`rl/<line>`. A reward model (`--reward_model`) is a reward-model workdir, or a pipeline's.
Prompts are tokenised as in training (`[BOS] prompt`); `chat` (and `generate --chat`) wraps the
conversation in the tokenizer's chat template, or, when it has none, in the HH format the runs here
train on ("\\n\\nHuman: ...\\n\\nAssistant:").
"""

from __future__ import annotations

import argparse
import contextlib
import gzip
import json
import os
import runpy
import sys
import textwrap
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG_DIR = os.path.join(REPO, "experiments", "configs")
HUMAN, ASSISTANT = "\n\nHuman:", "\n\nAssistant:"

COMMANDS = {
    "generate": "continue a prompt with a policy, streaming the tokens",
    "chat": "talk to a policy (its chat template, else the HH format)",
    "score": "score a response, or a JSONL of pairs / labelled / prompt-response rows, with a reward model",
    "export": "write a run as a merged HF checkpoint, a PEFT adapter and (reward models) the scalar head",
    "train": "run a gin config: the same as `python experiments/run.py ARGS`",
}


# -- help -------------------------------------------------------------------------------------------
def shipped_configs(config_dir: str = CONFIG_DIR) -> list[str]:
    return sorted(f for f in os.listdir(config_dir) if f.endswith(".gin")) if os.path.isdir(config_dir) else []


def configs_help(config_dir: str = CONFIG_DIR) -> str:
    """One line per shipped config: its name and the first line of its leading comment."""
    lines = ["configs shipped in experiments/configs:"]
    for name in shipped_configs(config_dir):
        with open(os.path.join(config_dir, name)) as f:
            first = f.readline().strip()
        about = first.lstrip("# ") if first.startswith("#") else ""
        lines.append(f"  {name:<30} {textwrap.shorten(about, 66, placeholder=' ...')}")
    return "\n".join(lines)


# -- policies and prompts ---------------------------------------------------------------------------
def load_policy(source: str, dtype: str = "float32"):
    """(Transformer, tokenizer, description) of any policy source, workdirs of pipelines and experiments included."""
    from pe_rlhf.eval import winrate
    from pe_rlhf.runs import policy_source

    with _loading():
        return winrate.load_policy(policy_source(source), dtype=dtype)


def _loading():
    """What the loaders print goes to stderr: stdout holds the command's output alone (generated text, scores)."""
    return contextlib.redirect_stdout(sys.stderr)


def hh_prompt(messages: list[dict]) -> str:
    """A conversation in the Anthropic HH format, ending where the assistant answers next."""
    turns = [(HUMAN if m["role"] == "user" else ASSISTANT) + " " + m["content"].strip() for m in messages]
    return "".join(turns) + ASSISTANT


def chat_ids(tokenizer, messages: list[dict], max_prompt_len: int) -> tuple[list[int], tuple[str, ...]]:
    """(prompt ids, stop strings) of a conversation: the tokenizer's chat template, else the HH format."""
    from pe_rlhf.eval.winrate import prompt_ids

    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        ids = list(tokenizer(text, add_special_tokens=False).input_ids)
        if len(ids) > max_prompt_len:
            print(f"[conversation cut from the left to {max_prompt_len} tokens]", file=sys.stderr)
        return ids[-max_prompt_len:], ()
    return list(prompt_ids(tokenizer, [hh_prompt(messages)], max_prompt_len)[0]), (HUMAN,)


def _held_back(text: str, stops) -> int:
    """How many characters at the end of `text` could begin a stop string (not shown until decided)."""
    return max([k for s in stops for k in range(1, len(s)) if text.endswith(s[:k])], default=0)


def stream_text(model, tokenizer, ids, args, stops=(), out=None) -> tuple[list[int], str]:
    """Generate after `ids`, writing the text to `out` (stdout) as it comes; (tokens, text), cut at the first
    stop string."""
    import jax

    from pe_rlhf.sampling import stream

    eos = tuple(model.config.eos_token_ids) or ((tokenizer.eos_token_id,) if tokenizer.eos_token_id is not None
                                                 else ())
    out = sys.stdout if out is None else out
    tokens, shown, text = [], "", ""
    for tok in stream(model, ids, rng=jax.random.key(args.seed), max_new_tokens=args.max_new_tokens,
                      temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, eos_ids=eos):
        tokens.append(tok)
        text = tokenizer.decode(tokens, skip_special_tokens=True)
        cuts = [i for i in (text.find(s) for s in stops) if i >= 0]
        if cuts:
            text = text[:min(cuts)]
            break
        ready = len(text) - _held_back(text, stops)
        while ready > len(shown) and text[ready - 1] == "\ufffd":  # an incomplete multi-byte character
            ready -= 1
        if ready > len(shown):  # (a decoder that rewrites earlier text may misplace a character on screen)
            out.write(text[len(shown):ready])
            out.flush()
            shown = text[:ready]
    out.write(text[len(shown):])
    out.flush()
    return tokens, text


def cmd_generate(args) -> list[int]:
    from pe_rlhf.eval.winrate import prompt_ids

    t0 = time.perf_counter()
    model, tokenizer, desc = load_policy(args.model, args.dtype)
    if args.chat:
        ids, stops = chat_ids(tokenizer, [{"role": "user", "content": args.prompt}], args.max_prompt_len)
    else:
        ids, stops = list(prompt_ids(tokenizer, [args.prompt], args.max_prompt_len)[0]), ()
        print(args.prompt, end="", flush=True)
    print(f"[{desc}: loaded in {time.perf_counter() - t0:.1f}s; prompt {len(ids)} tokens]", file=sys.stderr)
    t0 = time.perf_counter()
    tokens, _ = stream_text(model, tokenizer, ids, args, stops)
    print()
    print(f"[{len(tokens)} tokens in {time.perf_counter() - t0:.1f}s, compilation included]", file=sys.stderr)
    return tokens


def cmd_chat(args) -> list[dict]:
    model, tokenizer, desc = load_policy(args.model, args.dtype)
    how = "its chat template" if getattr(tokenizer, "chat_template", None) else "the HH format"
    print(f"[{desc}, prompted with {how}; /reset forgets the conversation, Ctrl-D or /exit ends it]",
          file=sys.stderr)
    history: list[dict] = []
    while True:
        try:
            line = input("you> ")
        except EOFError:
            print()
            return history
        if line.strip() in ("/exit", "/quit"):
            return history
        if line.strip() == "/reset":
            history = []
            continue
        if not line.strip():
            continue
        history.append({"role": "user", "content": line})
        ids, stops = chat_ids(tokenizer, history, args.max_prompt_len)
        print("assistant>", end="" if stops else " ", flush=True)
        _, text = stream_text(model, tokenizer, ids, args, stops)
        print()
        history.append({"role": "assistant", "content": text.strip()})


# -- score ------------------------------------------------------------------------------------------
def read_scoring_jsonl(path: str):
    """(kind, Loaded) of a JSONL file, its kind told by its first row's fields: "pairs" ({prompt, chosen,
    rejected}, or whole HH dialogues {chosen, rejected}), "labeled" ({prompt, response, label}) or
    "responses" ({prompt, response})."""
    from pe_rlhf import data as D

    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such file; expected a JSONL file of pairs, labelled rows or "
                                "prompt/response rows")
    with (gzip.open if path.endswith(".gz") else open)(path, "rt", encoding="utf-8") as f:
        number, line = next(((i, s) for i, s in enumerate(f, 1) if s.strip()), (0, ""))
    try:
        fields = set(json.loads(line)) if line else set()
    except (json.JSONDecodeError, TypeError):
        raise D.DataError(f"{path}:{number}: not a JSON object; each line must be one") from None
    if {"chosen", "rejected"} <= fields:
        return "pairs", (D.read_preference_jsonl(path) if "prompt" in fields else D.read_hh_harmless(path))
    if {"prompt", "response", "label"} <= fields:
        return "labeled", D.read_labeled_jsonl(path)
    if {"prompt", "response"} <= fields:
        return "responses", D.read_sft_jsonl(path)
    raise D.DataError(f"{path}:{number}: fields {sorted(fields)}; expected pairs {{prompt, chosen, rejected}}, "
                      "labelled rows {prompt, response, label} or {prompt, response}")


def cmd_score(args) -> dict:
    import numpy as np

    from pe_rlhf import data as D
    from pe_rlhf.eval import judge as J
    from pe_rlhf.eval import winrate
    from pe_rlhf.runs import reward_model_workdir
    from pe_rlhf.train import metrics as M

    if (args.jsonl is None) == (args.prompt is None or args.response is None):
        raise ValueError("score: give --jsonl FILE, or --prompt and --response (not both)")
    rm_dir = reward_model_workdir(args.reward_model)
    with _loading():
        rm, tokenizer, info = winrate.load_reward_model(rm_dir, dtype=args.dtype)
    # by default, the budgets the reward model trained with (its run record), else 512 + 256
    data = (info.get("identity") or {}).get("data") or {}
    options = D.TokenizeOptions(
        max_prompt_len=args.max_prompt_len or data.get("max_prompt_len", 512),
        max_response_len=args.max_response_len or data.get("max_response_len", 256), eos_id=data.get("eos_id"))
    score = J.reward_model_scorer(rm, tokenizer, batch_size=args.batch_size, options=options)
    if args.jsonl is None:
        kind, examples = "responses", [D.PromptResponse(args.prompt, args.response)]
    else:
        kind, loaded = read_scoring_jsonl(args.jsonl)
        examples = list(loaded.examples)
        print(f"[{loaded.summary()}; reward model {rm_dir}]", file=sys.stderr)
    prompts = [e.prompt for e in examples]
    if kind == "pairs":
        chosen, rejected = score(prompts, [e.chosen for e in examples]), score(prompts, [e.rejected for e in examples])
        metrics = M.pairwise_metrics(chosen, rejected)
        rows = [{"prompt": e.prompt, "chosen": e.chosen, "rejected": e.rejected, "score_chosen": float(c),
                 "score_rejected": float(r), "margin": float(c - r)} for e, c, r in zip(examples, chosen, rejected)]
        print(f"pairwise accuracy: {metrics['pairwise_accuracy']:.4f} over {metrics['num_pairs']} pairs "
              f"(margin mean {metrics['margin_mean']:.4f}, std {metrics['margin_std']:.4f})")
    else:
        scores = score(prompts, [e.response for e in examples])
        rows = [{"prompt": e.prompt, "response": e.response, "score": float(s)} for e, s in zip(examples, scores)]
        if kind == "labeled":
            labels = np.asarray([e.label for e in examples])
            metrics = M.classification_metrics(scores, labels)
            for row, e in zip(rows, examples):
                row["label"] = e.label
            auc = "undefined (one class)" if metrics["roc_auc"] is None else f"{metrics['roc_auc']:.4f}"
            print(f"accuracy (score > 0): {metrics['accuracy']:.4f}, ROC AUC: {auc} over "
                  f"{metrics['num_examples']} examples ({metrics['positive_fraction']:.3f} positive)")
        else:
            metrics = {"score_mean": float(scores.mean()), "num_examples": len(rows)}
            for i, row in enumerate(rows):
                print(f"{row['score']:.4f}" if args.jsonl is None else
                      f"{i}\t{row['score']:.4f}\t{textwrap.shorten(row['response'], 60, placeholder=' ...')}")
    if args.out:
        with open(args.out, "w") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")
        print(f"[{len(rows)} scored rows written to {args.out}]", file=sys.stderr)
    return {"kind": kind, **metrics, "rows": rows}


# -- export -----------------------------------------------------------------------------------------
def cmd_export(args) -> dict[str, str]:
    from pe_rlhf.runs import export_run, load_run

    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise ValueError(f"export --out {args.out}: a file, not a directory; nothing was written")
    present = sorted(os.listdir(args.out)) if os.path.isdir(args.out) else []
    if present and not args.overwrite:
        shown = ", ".join(present[:5]) + (", ..." if len(present) > 5 else "")
        raise ValueError(f"export --out {args.out}: the directory exists and is not empty ({shown}); nothing was "
                         "written. Pass a new --out, or --overwrite to write the exports over it")
    with _loading():
        run = load_run(args.run, dtype=args.dtype)
    written = export_run(run, args.out, args.format)
    for what, path in written.items():
        print(f"{what}: {path}")
    if "peft" in written:
        with open(os.path.join(written["peft"], "adapter_config.json")) as f:
            print(f"  (a PEFT adapter on the base {json.load(f)['base_model_name_or_path']})")
    if run.tokenizer is not None:
        print("tokenizer saved with each export, "
              + ("its chat template included" if getattr(run.tokenizer, "chat_template", None) else
                 "which has no chat template (prompt with the HH format)"))
    return written


# -- the command line -------------------------------------------------------------------------------
def _checked(kind: type, check):
    """An argparse `type`: `kind(text)` that `check` (a `config_checks.Check`) accepts; otherwise argparse
    exits with status 2 naming the flag: `argument --top_p: expected a finite number in (0, 1], got 1.5`."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            value = text
        if not check.ok(value):
            raise argparse.ArgumentTypeError(f"expected {check.expected}, got {text}")
        return value

    return parse


def _generation_args(p: argparse.ArgumentParser) -> None:
    from pe_rlhf.config_checks import integer, number

    p.add_argument("--model", required=True, help="policy: a run workdir or a model source (see above)")
    p.add_argument("--max_new_tokens", type=_checked(int, integer(ge=1)), default=64)
    p.add_argument("--temperature", type=_checked(float, number(ge=0)), default=0.0, help="0: greedy")
    p.add_argument("--top_k", type=_checked(int, integer(ge=1)), default=None)
    p.add_argument("--top_p", type=_checked(float, number(gt=0, le=1)), default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max_prompt_len", type=_checked(int, integer(ge=1)), default=512,
                   help="longer prompts lose tokens from the left")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="python -m pe_rlhf", description=__doc__, epilog=configs_help(),
                                  formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = top.add_subparsers(dest="command", metavar="COMMAND", required=True)
    raw = argparse.RawDescriptionHelpFormatter

    p = sub.add_parser("generate", help=COMMANDS["generate"], description=__doc__, formatter_class=raw)
    _generation_args(p)
    p.add_argument("--prompt", required=True)
    p.add_argument("--chat", action="store_true", help="answer the prompt as one chat turn, not continue it")

    p = sub.add_parser("chat", help=COMMANDS["chat"], description=__doc__, formatter_class=raw)
    _generation_args(p)

    p = sub.add_parser("score", help=COMMANDS["score"], formatter_class=raw, description=(
        "Score with a reward model, texts laid out as in its training ([BOS] prompt response [EOS]).\n"
        "A JSONL file's kind is told by its first row: pairs {prompt, chosen, rejected} (or whole HH dialogues\n"
        "{chosen, rejected}) print the pairwise accuracy; {prompt, response, label} rows the accuracy (score > 0)\n"
        "and ROC AUC; {prompt, response} rows one score each. --out writes every row's scores as JSONL."))
    p.add_argument("--reward_model", required=True, help="a reward-model workdir (or a pipeline's)")
    p.add_argument("--prompt")
    p.add_argument("--response")
    p.add_argument("--jsonl", help="pairs {prompt, chosen, rejected}: pairwise accuracy; {prompt, response, "
                                   "label}: accuracy and ROC AUC; {prompt, response}: scores")
    p.add_argument("--out", help="write one JSON line of scores per row here")
    p.add_argument("--max_prompt_len", type=int, default=None,
                   help="prompt tokens kept (from the left); default: the reward model's training budget")
    p.add_argument("--max_response_len", type=int, default=None,
                   help="response tokens kept; default: the reward model's training budget")
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))

    p = sub.add_parser("export", help=COMMANDS["export"], formatter_class=raw, description=(
        "Export a run: OUT/merged, a HF checkpoint with the LoRA adapter merged in (an RL run's policy, a\n"
        "reward model's backbone); OUT/peft, the adapter for peft.PeftModel.from_pretrained on the run's base\n"
        "(written to OUT/base when it is not a HF directory); OUT/head, a reward model's scalar head and a JSON\n"
        "saying how to apply it. The tokenizer, and its chat template if it has one, goes with each."))
    p.add_argument("--run", required=True, help="an SFT, RL or reward-model workdir, a pipeline's, or a model source")
    p.add_argument("--out", required=True, help="writes OUT/merged, OUT/peft (+ OUT/base when the base is not a "
                                                "HF directory), OUT/head")
    p.add_argument("--format", default="all", choices=("merged", "peft", "head", "all"),
                   help="all (default): every export that applies to the run")
    p.add_argument("--overwrite", action="store_true",
                   help="write into an --out that is not empty (its exports are replaced, other files left)")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))

    sub.add_parser("train", help=COMMANDS["train"], add_help=False)
    return top


def train(argv: list[str]):
    """`experiments/run.py` with `argv`: the gin entry point of a source checkout."""
    run_py = os.path.join(REPO, "experiments", "run.py")
    if not os.path.isfile(run_py):
        raise FileNotFoundError(f"{run_py}: not found; `train` runs the gin entry point of a source checkout")
    sys.argv = [run_py, *argv]
    return runpy.run_path(run_py, run_name="__main__")


def main(argv: list[str] | None = None):
    """Run one command; returns what it computed (generated tokens, metrics, written directories)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["train"]:
        return train(argv[1:])
    args = parser().parse_args(argv)
    from pe_rlhf.sharding.distributed import quiet_tpu_probe

    quiet_tpu_probe()  # no libtpu errors at start-up on a machine without a TPU
    return {"generate": cmd_generate, "chat": cmd_chat, "score": cmd_score, "export": cmd_export}[args.command](args)


def run() -> None:
    """`main` for a shell: a user's mistake (a wrong path, a bad file) is one line on stderr and exit status 1."""
    try:
        main()
    except (FileNotFoundError, ValueError) as e:
        if os.environ.get("PE_RLHF_TRACEBACK"):
            raise
        sys.exit(f"error: {e}\n(set PE_RLHF_TRACEBACK=1 for the traceback)")
    except KeyboardInterrupt:
        sys.exit(130)
