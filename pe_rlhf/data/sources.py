r"""Readers for preference, classification and SFT data, real sets first.

Anthropic HH harmless (`hh_harmless/pairs.jsonl.gz`)
    One JSON object a line, `{"chosen", "rejected"}`, each a whole dialogue
    ("\n\nHuman: ...\n\nAssistant: ..."). The prompt is the prefix both share, up
    to and including its last "\n\nAssistant:"; `chosen`/`rejected` are the rest of
    each dialogue (they usually begin with a space). Taking the last marker inside
    the *shared* prefix matters for two pairs whose chosen reply itself contains
    "\n\nAssistant:".

Taskmaster reward files (`taskmaster/<coffee|ticketing>/reward_*.json`)
    A JSON list of `{"conversation_id", "context", "generation", "reward"}`, with
    `context` a JSON-encoded list of turns and `generation` a JSON-encoded agent
    turn. Rendered to text, one line per turn, lines joined by "\n":

        User: <text>
        Agent: <text>
        Agent: API call: <call as JSON>
        API response: <response as JSON>

    then a last line "Agent:". The prompt ends with that "Agent:"; the response is
    " " + what the generated turn would put after "Agent:" (its text, or
    "API call: <JSON>"), so prompt + response reads like one more context line.
    JSON is `json.dumps(value, ensure_ascii=False)` (keys in file order); newlines
    inside a turn's text become spaces. The label is `reward` (1.0 good, 0.0 bad).

Reddit TL;DR (`tldr/comparisons.jsonl.gz`, `tldr/reference_summaries.jsonl.gz`)
    Comparisons: `{"prompt": "SUBREDDIT: s TITLE: t POST: p", "chosen": "TL;DR: ...", "rejected": "TL;DR: ..."}`.
    References: `{"id", "subreddit", "title", "post", "summary"}`, rendered to the same
    "SUBREDDIT: s TITLE: t POST: p". The prompt is that text and the cue `TLDR_CUE` ("\n\nTL;DR:", the
    paragraph break and cue of Stiennon et al.'s format); a response is the summary after "TL;DR:", its
    surrounding whitespace replaced by one leading space (" Girl doesn't know ..."), so summaries from
    both files look alike (9,029 of the 9,035 comparisons have two spaces after "TL;DR:", 71 trailing
    whitespace; the references none). A post is named by its "SUBREDDIT: s TITLE: t" head (`tldr_post`):
    the comparisons hold two posts twice with slightly different text (one apostrophe; a truncated copy),
    which that head keeps together.

Generic JSONL (`.jsonl`, or `.jsonl.gz`), one object a line, extra fields ignored,
blank lines skipped:
    preference  {"prompt", "chosen", "rejected"[, "margin"]}
    labeled     {"prompt", "response", "label"}  (label 0 or 1, or a soft label in [0, 1])
    sft         {"prompt", "response"}

Errors name the file and line (or example index) and the field. Pairs whose
chosen and rejected responses are identical are skipped and counted in
`Loaded.skipped_identical` (and logged). A JSONL line longer than `max_line_bytes`
(default `MAX_LINE_BYTES`, 1 MiB) is skipped without being held in memory, logged
with its file:line and counted in `Loaded.skipped_long`: its text would be cut to
the token budget anyway, and parsing and tokenising it whole would cost memory and
time in proportion to its size (one 20 MB line once took 69 s and 7.8 GB).
"""

from __future__ import annotations

import glob
import gzip
import json
import logging
import math
import os
from typing import Iterator

from pe_rlhf.data.examples import DataError, LabeledExample, Loaded, PreferenceExample, Prompt, PromptResponse

ASSISTANT = "\n\nAssistant:"
TLDR_CUE = "\n\nTL;DR:"  # ends every TL;DR prompt: the summary follows it

MAX_LINE_BYTES = 1 << 20  # longer JSONL lines are skipped and counted (readers' `max_line_bytes`)

# Locations of the real sets, relative to the data directory (see ../shared/data/README.md).
HH_HARMLESS = "hh_harmless/pairs.jsonl.gz"
HH_HELPFUL = "hh_helpful/pairs.jsonl.gz"
TLDR_COMPARISONS = "tldr/comparisons.jsonl.gz"
TLDR_REFERENCES = "tldr/reference_summaries.jsonl.gz"
TASKMASTER_COFFEE = "taskmaster/coffee"
TASKMASTER_TICKETING = "taskmaster/ticketing"


def default_data_dir() -> str:
    """$PE_RLHF_DATA_DIR, else the `shared/data` directory beside the project checkout."""
    env = os.environ.get("PE_RLHF_DATA_DIR")
    if env:
        return env
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    return os.path.join(os.path.dirname(repo), "shared", "data")


# ---------------------------------------------------------------------------- helpers


def _check_file(path: str, what: str) -> str:
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such file; expected {what}")
    return path


def _lines(f, limit: int) -> Iterator[tuple[int, bytes | None, int]]:
    """(number, line, size) of each line of binary file `f`; line is None when it is over `limit` bytes
    (newline excluded): such a line is passed over in 1 MiB reads, never held whole."""
    number = 0
    while raw := f.readline(limit + 1):
        number += 1
        if raw.endswith(b"\n") or len(raw) <= limit:
            yield number, raw, len(raw)
            continue
        size = len(raw)
        while not raw.endswith(b"\n") and (raw := f.readline(1 << 20)):
            size += len(raw)
        yield number, None, size - raw.endswith(b"\n")


class _JsonLines:
    """(where, row) for each non-blank line of a JSONL file, `where` being "path:line"; lines over
    `max_line_bytes` are skipped, logged and counted in `skipped`."""

    def __init__(self, path: str, max_line_bytes: int | None = None):
        self.path, self.limit, self.skipped = path, max_line_bytes or MAX_LINE_BYTES, 0

    def __iter__(self) -> Iterator[tuple[str, dict]]:
        opener = gzip.open if self.path.endswith(".gz") else open
        with opener(self.path, "rb") as f:
            for number, raw, size in _lines(f, self.limit):
                where = f"{self.path}:{number}"
                if raw is None:
                    self.skipped += 1
                    logging.warning("%s: skipped a line of %d bytes, over the %d-byte limit (the reader's "
                                    "max_line_bytes, default sources.MAX_LINE_BYTES)", where, size, self.limit)
                    continue
                row = _row(raw, where)
                if row is not None:
                    yield where, row


def _row(raw: bytes, where: str) -> dict | None:
    """The JSON object of one line, or None for a blank line."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{where}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    if not text.strip():
        return None
    try:
        row = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(
            f"{where}: malformed JSON ({e.msg} at column {e.colno}); each line must be one JSON object"
        ) from None
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(row).__name__}")
    return row


def _text(row: dict, name: str, where: str) -> str:
    if name not in row:
        raise DataError(f"{where}: missing field '{name}' (fields present: {', '.join(sorted(row)) or 'none'})")
    value = row[name]
    if not isinstance(value, str):
        raise DataError(f"{where}: field '{name}' must be a string, got {type(value).__name__}")
    return value


def _number(row: dict, name: str, where: str, default: float | None = None) -> float:
    if name not in row:
        if default is not None:
            return default
        raise DataError(f"{where}: missing field '{name}' (fields present: {', '.join(sorted(row)) or 'none'})")
    value = row[name]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise DataError(f"{where}: field '{name}' must be a finite number, got {value!r}")
    return float(value)


def _label(row: dict, name: str, where: str) -> float:
    """A classification label: 0 (bad) or 1 (good), or a soft label between them (the BCE target probability)."""
    value = _number(row, name, where)
    if not 0.0 <= value <= 1.0:
        raise DataError(f"{where}: field '{name}' must be a label in [0, 1] (0 bad, 1 good, or a soft label "
                        f"between them: the probability that the response is good), got {row[name]!r}")
    return value


def _finish(examples: list, source: str, skipped_identical: int = 0, skipped_long: int = 0) -> Loaded:
    if not examples and not (skipped_identical or skipped_long):
        raise DataError(f"{source}: no examples (the file is empty)")
    if not examples:
        why = ([f"{skipped_identical} pairs have chosen == rejected"] if skipped_identical else []) + (
            [f"{skipped_long} lines are over the byte limit"] if skipped_long else [])
        raise DataError(f"{source}: no usable examples (all {' and '.join(why)})")
    loaded = Loaded(tuple(examples), source, skipped_identical, skipped_long)
    if skipped_identical or skipped_long:
        logging.warning("%s", loaded.summary())
    return loaded


# ---------------------------------------------------------------------------- Anthropic HH


def split_dialogues(chosen: str, rejected: str, where: str = "pair") -> tuple[str, str, str]:
    """(prompt, chosen_response, rejected_response) of two whole HH dialogues."""
    shared = os.path.commonprefix([chosen, rejected])
    cut = shared.rfind(ASSISTANT)
    if cut < 0:
        raise DataError(
            f"{where}: chosen and rejected share no prefix ending in {ASSISTANT!r}; "
            "cannot split the prompt from the responses"
        )
    cut += len(ASSISTANT)
    return chosen[:cut], chosen[cut:], rejected[cut:]


def read_hh_harmless(path: str, max_line_bytes: int | None = None, group: str = "") -> Loaded:
    """Anthropic HH pairs (whole dialogues in chosen/rejected) -> `PreferenceExample`s, each tagged `group`.

    The format is the same for every HH subset (harmless-base, helpful-base, ...)."""
    path = _check_file(path, f"an Anthropic HH pairs file ({HH_HARMLESS} or {HH_HELPFUL} in the data directory)")
    examples, identical, lines = [], 0, _JsonLines(path, max_line_bytes)
    for where, row in lines:
        chosen, rejected = _text(row, "chosen", where), _text(row, "rejected", where)
        if chosen == rejected:
            identical += 1
            continue
        examples.append(PreferenceExample(*split_dialogues(chosen, rejected, where), group=group))
    return _finish(examples, path, identical, lines.skipped)


def first_human_turn(prompt: str) -> str:
    """The text of a dialogue's first "Human:" turn (the whole prompt when it has none).

    HH holds some conversations at several depths (one prompt a prefix of another); they all share
    their first human turn, so splitting by it keeps a conversation at any depth in one part."""
    head = prompt.split(ASSISTANT, 1)[0]
    return head.split("Human:", 1)[1].strip() if "Human:" in head else prompt.strip()


# ---------------------------------------------------------------------------- Reddit TL;DR


def _summary(row: dict, name: str, where: str, prefix: str = "") -> str:
    """A summary field as a response: `prefix` ("TL;DR:") removed, whitespace stripped, one leading space."""
    text = _text(row, name, where)
    if not text.startswith(prefix):
        raise DataError(f"{where}: field '{name}' must start with {prefix!r} (a TL;DR comparisons file), "
                        f"got {text[:40]!r}")
    text = text[len(prefix):].strip()
    if not text:
        raise DataError(f"{where}: field '{name}' holds no summary text")
    return " " + text


def read_tldr_comparisons(path: str, max_line_bytes: int | None = None) -> Loaded:
    """Reddit TL;DR comparisons -> `PreferenceExample`s: prompt = post + `TLDR_CUE`, responses the summaries.

    Pairs whose two summaries are the same text once whitespace is normalised are skipped and counted."""
    path = _check_file(path, f"a TL;DR comparisons file ({TLDR_COMPARISONS} in the data directory)")
    examples, identical, lines = [], 0, _JsonLines(path, max_line_bytes)
    for where, row in lines:
        prompt = _text(row, "prompt", where)
        chosen, rejected = (_summary(row, k, where, "TL;DR:") for k in ("chosen", "rejected"))
        if chosen == rejected:
            identical += 1
            continue
        examples.append(PreferenceExample(prompt + TLDR_CUE, chosen, rejected))
    return _finish(examples, path, identical, lines.skipped)


def read_tldr_references(path: str, max_line_bytes: int | None = None) -> Loaded:
    """Reddit TL;DR posts with a human reference summary -> `PromptResponse`s (prompt rendered as in the
    comparisons, response the reference): SFT examples, or held-out prompts with a reference (ROUGE-L)."""
    path = _check_file(path, f"a TL;DR reference summaries file ({TLDR_REFERENCES} in the data directory)")
    examples, lines = [], _JsonLines(path, max_line_bytes)
    for where, row in lines:
        subreddit, title, post = (_text(row, k, where) for k in ("subreddit", "title", "post"))
        prompt = f"SUBREDDIT: {subreddit} TITLE: {title} POST: {post}{TLDR_CUE}"
        examples.append(PromptResponse(prompt, _summary(row, "summary", where)))
    return _finish(examples, path, skipped_long=lines.skipped)


def tldr_post(prompt: str) -> str:
    """The post a TL;DR prompt is about, named by its "SUBREDDIT: s TITLE: t" head (the whole prompt when
    it has no " POST:"). The same post can appear with slightly different text (an apostrophe, a cut);
    splitting by this head keeps its copies in one part."""
    head, sep, _ = prompt.partition(" POST:")
    return head if sep else prompt


# ---------------------------------------------------------------------------- Taskmaster


def _one_line(text: str) -> str:
    return " ".join(text.splitlines())


def _agent_text(turn: dict, where: str) -> str:
    """What an agent turn puts after "Agent:"."""
    if "text" in turn:
        return _one_line(_text(turn, "text", where))
    if "api" in turn:
        return "API call: " + json.dumps(turn["api"], ensure_ascii=False)
    raise DataError(f"{where}: agent turn has neither 'text' nor 'api' (keys: {', '.join(sorted(turn))})")


def render_turn(turn: dict, where: str = "turn") -> str:
    """One Taskmaster turn as one line of text (format in the module docstring)."""
    if not isinstance(turn, dict) or "role" not in turn:
        raise DataError(f"{where}: a turn must be a JSON object with a 'role', got {turn!r:.80}")
    role = turn["role"]
    if role == "agent":
        return "Agent: " + _agent_text(turn, where)
    if role == "user":
        return "User: " + _one_line(_text(turn, "text", where))
    if role == "api":
        if "response" not in turn:
            raise DataError(f"{where}: api turn has no 'response' (keys: {', '.join(sorted(turn))})")
        return "API response: " + json.dumps(turn["response"], ensure_ascii=False)
    raise DataError(f"{where}: unknown role {role!r} (expected agent, user or api)")


def render_taskmaster(context: list, generation: dict, where: str = "example") -> tuple[str, str]:
    """(prompt, response) text of a Taskmaster context and generated agent turn."""
    lines = [render_turn(turn, f"{where}, context turn {i}") for i, turn in enumerate(context)]
    if not isinstance(generation, dict) or generation.get("role") != "agent":
        raise DataError(f"{where}: field 'generation' must be an agent turn, got {generation!r:.80}")
    return "\n".join(lines + ["Agent:"]), " " + _agent_text(generation, f"{where}, generation")


def _decoded(row: dict, name: str, where: str, kind: type):
    text = _text(row, name, where)
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{where}: field '{name}' is not valid JSON ({e.msg} at char {e.pos})") from None
    if not isinstance(value, kind):
        raise DataError(f"{where}: field '{name}' must encode a JSON {kind.__name__}, got {type(value).__name__}")
    return value


def read_taskmaster(path: str) -> Loaded:
    """Taskmaster reward examples -> `LabeledExample`s; `path` is a reward_*.json file or their directory."""
    path = os.fspath(path)
    if os.path.isdir(path):
        files = sorted(glob.glob(os.path.join(path, "reward_*.json")))
        if not files:
            raise DataError(f"{path}: no reward_*.json files in this directory")
    else:
        files = [_check_file(path, "a Taskmaster reward_*.json file or a directory of them")]
    examples = []
    for file in files:
        with open(file, encoding="utf-8") as f:
            try:
                rows = json.load(f)
            except json.JSONDecodeError as e:
                raise DataError(f"{file}:{e.lineno}: malformed JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(rows, list):
            raise DataError(f"{file}: expected a JSON list of examples, got {type(rows).__name__}")
        if not rows:
            raise DataError(f"{file}: no examples (the list is empty)")
        for i, row in enumerate(rows):
            where = f"{file}: example {i}"
            if not isinstance(row, dict):
                raise DataError(f"{where}: expected a JSON object, got {type(row).__name__}")
            if isinstance(row.get("conversation_id"), str):
                where += f" ({row['conversation_id']})"
            context = _decoded(row, "context", where, list)
            generation = _decoded(row, "generation", where, dict)
            prompt, response = render_taskmaster(context, generation, where)
            examples.append(LabeledExample(prompt, response, _label(row, "reward", where)))
    return _finish(examples, path)


# ---------------------------------------------------------------------------- generic JSONL


def read_preference_jsonl(path: str, max_line_bytes: int | None = None) -> Loaded:
    """`{prompt, chosen, rejected[, margin]}` lines -> `PreferenceExample`s (identical pairs skipped, counted)."""
    path = _check_file(path, "a JSONL file of {prompt, chosen, rejected[, margin]} objects")
    examples, identical, lines = [], 0, _JsonLines(path, max_line_bytes)
    for where, row in lines:
        prompt, chosen, rejected = (_text(row, k, where) for k in ("prompt", "chosen", "rejected"))
        margin = _number(row, "margin", where, default=0.0)
        if chosen == rejected:
            identical += 1
            continue
        examples.append(PreferenceExample(prompt, chosen, rejected, margin))
    return _finish(examples, path, identical, lines.skipped)


def read_labeled_jsonl(path: str, max_line_bytes: int | None = None) -> Loaded:
    """`{prompt, response, label}` lines -> `LabeledExample`s."""
    path = _check_file(path, "a JSONL file of {prompt, response, label} objects")
    lines = _JsonLines(path, max_line_bytes)
    examples = [
        LabeledExample(_text(row, "prompt", where), _text(row, "response", where), _label(row, "label", where))
        for where, row in lines
    ]
    return _finish(examples, path, skipped_long=lines.skipped)


def read_sft_jsonl(path: str, max_line_bytes: int | None = None) -> Loaded:
    """`{prompt, response}` lines -> `PromptResponse`s."""
    path = _check_file(path, "a JSONL file of {prompt, response} objects")
    lines = _JsonLines(path, max_line_bytes)
    examples = [PromptResponse(_text(row, "prompt", where), _text(row, "response", where)) for where, row in lines]
    return _finish(examples, path, skipped_long=lines.skipped)


def read_prompts_jsonl(path: str, max_line_bytes: int | None = None) -> Loaded:
    """`{prompt}` lines -> `Prompt`s (RL and evaluation prompt sets; other fields are ignored).

    An RL workdir's `eval_prompts.jsonl` is such a file: the held-out prompts its run never trained on.
    """
    path = _check_file(path, "a JSONL file of {prompt} objects")
    lines = _JsonLines(path, max_line_bytes)
    examples = [Prompt(_text(row, "prompt", where)) for where, row in lines]
    return _finish(examples, path, skipped_long=lines.skipped)


# ---------------------------------------------------------------------------- derived sets


def sft_from_preferences(examples) -> tuple[PromptResponse, ...]:
    """SFT examples from preference pairs: the prompt and its chosen response (HH chosen dialogues)."""
    return tuple(PromptResponse(e.prompt, e.chosen) for e in examples)


def sft_from_labeled(examples, min_label: float = 1.0) -> tuple[PromptResponse, ...]:
    """SFT examples from labelled ones whose label is at least `min_label` (Taskmaster good generations)."""
    return tuple(PromptResponse(e.prompt, e.response) for e in examples if e.label >= min_label)


def prompts_of(examples) -> tuple[str, ...]:
    """The distinct prompts of any examples, in first-seen order (RL prompt sets)."""
    return tuple(dict.fromkeys(e.prompt for e in examples))
