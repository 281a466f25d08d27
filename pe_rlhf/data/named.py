"""Datasets by name, so a config names its data in one line.

`named_dataset("hh_harmless")` reads the real set under the data directory
(`$PE_RLHF_DATA_DIR`, else `../shared/data`); `tfds:<name>` goes through the
tensorflow-datasets builders instead (built from the same local files into
`$PE_RLHF_TFDS_DIR`, default ~/.cache/pe_rlhf/tfds; the shared data stays read-only).

`hh` is HH helpful-base and harmless-base together, each pair tagged with its set
(`PreferenceExample.group`: "helpful" or "harmless").

`tldr` is the 9,035 Reddit TL;DR comparisons (Bradley-Terry pairs over 1,503 posts) and `tldr_references`
500 other posts with a human reference summary (`PromptResponse`s); both are split by post
(`dataset_part(..., by="post")`). In the TL;DR experiment the references' held-out part (100 posts) is the
set of held-out prompts with a reference (ROUGE-L), and their train part joins the chosen summaries of the
comparisons' train part as SFT data (`sft_mix`); they need no judge part (`judge_fraction=0`).
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np

from pe_rlhf.config_checks import integer, optional
from pe_rlhf.data import sources
from pe_rlhf.data.examples import LabeledExample, Loaded, PreferenceExample, PromptResponse

_NAMED = {
    "hh_harmless": (sources.read_hh_harmless, sources.HH_HARMLESS),
    "hh_helpful": (sources.read_hh_harmless, sources.HH_HELPFUL),
    "tldr": (sources.read_tldr_comparisons, sources.TLDR_COMPARISONS),
    "tldr_references": (sources.read_tldr_references, sources.TLDR_REFERENCES),
    "taskmaster_coffee": (sources.read_taskmaster, sources.TASKMASTER_COFFEE),
    "taskmaster_ticketing": (sources.read_taskmaster, sources.TASKMASTER_TICKETING),
}


def named_dataset(name: str, data_dir: str | None = None, limit: int | None = None) -> Loaded:
    """The examples of a named set; `limit` keeps the first N (for quick runs)."""
    if not optional(integer(ge=1)).ok(limit):
        raise ValueError(f"named_dataset.limit={limit!r}: expected an integer >= 1 (how many examples to keep "
                         "from the start of the set), or None to keep them all")
    data_dir = data_dir or sources.default_data_dir()
    if name.startswith("tfds:"):
        from pe_rlhf.data import tfds_builders

        tfds_name = name.partition(":")[2]
        cache = os.environ.get("PE_RLHF_TFDS_DIR", os.path.expanduser("~/.cache/pe_rlhf/tfds"))
        examples = tfds_builders.load(tfds_name, data_dir=cache, manual_dir=data_dir)
        loaded = Loaded(examples=tuple(examples), source=name, skipped_identical=0)
    elif name == "hh":
        sets = [sources.read_hh_harmless(os.path.join(data_dir, rel), group=group)
                for group, rel in (("helpful", sources.HH_HELPFUL), ("harmless", sources.HH_HARMLESS))]
        loaded = Loaded(examples=tuple(e for s in sets for e in s.examples), source="hh (helpful + harmless)",
                        skipped_identical=sum(s.skipped_identical for s in sets),
                        skipped_long=sum(s.skipped_long for s in sets))
    elif name in _NAMED:
        read, rel = _NAMED[name]
        loaded = read(os.path.join(data_dir, rel))
    else:
        raise KeyError(f"unknown dataset {name!r}; known: {', '.join(sorted([*_NAMED, 'hh']))}, or tfds:<builder name>")
    if limit is not None:
        loaded = dataclasses.replace(loaded, examples=tuple(loaded.examples[:limit]))
    return loaded


PARTS = ("eval", "train", "judge")
SPLIT_BY = ("prompt", "first_human_turn", "post")
# what keeps items together (a function of the prompt), and what its keys are called in errors
_KEYS = {"first_human_turn": (sources.first_human_turn, "conversations"), "post": (sources.tldr_post, "posts")}


def dataset_part(dataset: Loaded, part: str, *, held_out: int = 100, judge_fraction: float = 0.5,
                 seed: int = 0, by: str = "prompt", group: str | None = None) -> Loaded:
    """One of three disjoint parts of `dataset`, for an experiment whose judge must be independent.

    - 'eval': `held_out` prompts that no stage trains on (the final evaluation's prompts);
    - 'judge': `judge_fraction` of the other prompts, for a judge reward model no other stage sees
      (`judge_fraction=0`: no judge part, for a set no judge learns from, such as TL;DR's references);
    - 'train': the rest, for SFT, the proxy reward model and the RL prompts.

    `by` is what keeps items together:
    - "prompt": items with the same prompt stay in one part;
    - "first_human_turn": items whose dialogues open with the same human turn stay in one part, so a
      conversation held at several depths (one prompt a prefix of another) is never split;
    - "post": items about the same Reddit post (`sources.tldr_post`, its subreddit and title) stay in one
      part, so a post's ~6 TL;DR comparisons, and its copies whose text differs slightly, are never split.
    With "first_human_turn" and "post", `held_out` counts conversations or posts per group
    (`PreferenceExample.group`, e.g. 100 helpful and 100 harmless; TL;DR has one group).

    The split is a seeded permutation of the distinct keys, so it is the same on every call, in every process.
    `group` keeps only that group's items of the part (e.g. the helpful pairs of the judge part, for a reward
    model of one set): the split is made on the whole dataset first, so the parts are those of every other stage.
    """
    part_of = _part(dataset, part, held_out=held_out, judge_fraction=judge_fraction, seed=seed, by=by)
    if group is None:
        return part_of
    groups = list(dict.fromkeys(getattr(e, "group", None) for e in dataset.examples))
    if group not in groups:
        raise ValueError(f"{dataset.source}: dataset_part(group={group!r}): no such group; its groups are "
                         f"{', '.join(map(repr, groups))}")
    return dataclasses.replace(part_of, examples=tuple(e for e in part_of.examples if e.group == group),
                               source=f"{part_of.source[:-1]}, {group} only]")


def _part(dataset: Loaded, part: str, *, held_out: int, judge_fraction: float, seed: int, by: str) -> Loaded:
    if part not in PARTS:
        raise ValueError(f"dataset_part(part={part!r}): choose one of {', '.join(PARTS)}")
    if not 0.0 <= judge_fraction < 1.0:
        raise ValueError(f"dataset_part(judge_fraction={judge_fraction}): must be in [0, 1)")
    if part == "judge" and judge_fraction == 0.0:
        raise ValueError(f"{dataset.source}: dataset_part(part='judge', judge_fraction=0) asks for a judge part "
                         "that is empty; give judge_fraction > 0, or take the 'eval' or 'train' part")
    if by not in SPLIT_BY:
        raise ValueError(f"dataset_part(by={by!r}): choose one of {', '.join(SPLIT_BY)}")
    if by in _KEYS:
        key, what = _KEYS[by]
        owner = _owners_by_key(dataset, key, held_out, judge_fraction, seed, what)
        kept = tuple(e for e in dataset.examples if owner[key(e.prompt)] == part)
        return dataclasses.replace(dataset, examples=kept,
                                   source=f"{dataset.source} [{part} part by {by.replace('_', ' ')}, seed {seed}]")
    prompts = list(dict.fromkeys(e.prompt for e in dataset.examples))
    n_judge = round(judge_fraction * (len(prompts) - held_out))
    if not (0 < held_out and (0 < n_judge or judge_fraction == 0.0) and n_judge < len(prompts) - held_out):
        raise ValueError(f"{dataset.source}: {len(prompts)} distinct prompts cannot make an eval part of {held_out} "
                         f"and non-empty judge and train parts (judge_fraction={judge_fraction})")
    order = np.random.default_rng(seed).permutation(len(prompts))
    owner = {}
    for rank, i in enumerate(order):
        owner[prompts[i]] = "eval" if rank < held_out else "judge" if rank < held_out + n_judge else "train"
    kept = tuple(e for e in dataset.examples if owner[e.prompt] == part)
    return dataclasses.replace(dataset, examples=kept, source=f"{dataset.source} [{part} part, seed {seed}]")


def _owners_by_key(dataset: Loaded, key, held_out: int, judge_fraction: float, seed: int,
                   what: str) -> dict[str, str]:
    """The part of each key (a first human turn, a post): in a seeded order, the first `held_out` of each
    group go to 'eval'; of the rest, the first `judge_fraction` to 'judge' and the others to 'train'."""
    group_of = {}
    for e in dataset.examples:
        group_of.setdefault(key(e.prompt), getattr(e, "group", ""))
    keys = list(group_of)
    sizes = {g: sum(1 for k in keys if group_of[k] == g) for g in dict.fromkeys(group_of.values())}
    small = {g: n for g, n in sizes.items() if n <= held_out}
    if held_out < 1 or small:
        raise ValueError(f"{dataset.source}: cannot hold out {held_out} {what} per group and keep some for "
                         f"training; {what} per group: {sizes}")
    order = np.random.default_rng(seed).permutation(len(keys))
    owner, taken, rest = {}, dict.fromkeys(sizes, 0), []
    for i in order:
        k = keys[i]
        if taken[group_of[k]] < held_out:
            owner[k] = "eval"
            taken[group_of[k]] += 1
        else:
            rest.append(k)
    n_judge = round(judge_fraction * len(rest))
    if not ((0 < n_judge or judge_fraction == 0.0) and n_judge < len(rest)):
        raise ValueError(f"{dataset.source}: {len(rest)} {what} after the held-out ones cannot make "
                         f"non-empty judge and train parts (judge_fraction={judge_fraction})")
    for rank, k in enumerate(rest):
        owner[k] = "judge" if rank < n_judge else "train"
    return owner


def sft_mix(datasets) -> Loaded:
    """SFT examples of several sets, in order, each (prompt, response) once: a preference pair gives its
    chosen response, a labelled example its response when labelled good (1.0), a `PromptResponse` itself.

    For TL;DR: the references' train part and the comparisons' train part, whose posts' summaries are often
    chosen in several comparisons (each is imitated once, however often it won)."""
    datasets = list(datasets)
    if not datasets:
        raise ValueError("sft_mix(datasets=[]): give at least one dataset")
    examples, seen = [], set()
    for d in datasets:
        first = d.examples[0] if d.examples else None
        sft = (sources.sft_from_preferences(d.examples) if isinstance(first, PreferenceExample) else
               sources.sft_from_labeled(d.examples) if isinstance(first, LabeledExample) else d.examples)
        for e in sft:
            if not isinstance(e, PromptResponse):
                raise TypeError(f"{d.source}: sft_mix takes sets of preference, labelled or SFT examples, got "
                                f"{type(e).__name__}")
            if e not in seen:
                seen.add(e)
                examples.append(e)
    return Loaded(tuple(examples), " + ".join(d.source for d in datasets) + " (SFT examples, each once)",
                  skipped_long=sum(d.skipped_long for d in datasets))
