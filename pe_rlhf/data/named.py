"""Datasets by name, so a config names its data in one line.

`named_dataset("hh_harmless")` reads the real set under the data directory
(`$PE_RLHF_DATA_DIR`, else `../shared/data`); `tfds:<name>` goes through the
tensorflow-datasets builders instead (built from the same local files into
`$PE_RLHF_TFDS_DIR`, default ~/.cache/pe_rlhf/tfds; the shared data stays read-only).

`hh` is HH helpful-base and harmless-base together, each pair tagged with its set
(`PreferenceExample.group`: "helpful" or "harmless").
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np

from pe_rlhf.config_checks import integer, optional
from pe_rlhf.data import sources
from pe_rlhf.data.examples import Loaded

_NAMED = {
    "hh_harmless": (sources.read_hh_harmless, sources.HH_HARMLESS),
    "hh_helpful": (sources.read_hh_harmless, sources.HH_HELPFUL),
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
SPLIT_BY = ("prompt", "first_human_turn")


def dataset_part(dataset: Loaded, part: str, *, held_out: int = 100, judge_fraction: float = 0.5,
                 seed: int = 0, by: str = "prompt") -> Loaded:
    """One of three disjoint parts of `dataset`, for an experiment whose judge must be independent.

    - 'eval': `held_out` prompts that no stage trains on (the final evaluation's prompts);
    - 'judge': `judge_fraction` of the other prompts, for a judge reward model no other stage sees;
    - 'train': the rest, for SFT, the proxy reward model and the RL prompts.

    `by` is what keeps items together:
    - "prompt": items with the same prompt stay in one part;
    - "first_human_turn": items whose dialogues open with the same human turn stay in one part, so a
      conversation held at several depths (one prompt a prefix of another) is never split. `held_out`
      then counts conversations per group (`PreferenceExample.group`, e.g. 100 helpful and 100 harmless).

    The split is a seeded permutation of the distinct keys, so it is the same on every call, in every process.
    """
    if part not in PARTS:
        raise ValueError(f"dataset_part(part={part!r}): choose one of {', '.join(PARTS)}")
    if not 0.0 < judge_fraction < 1.0:
        raise ValueError(f"dataset_part(judge_fraction={judge_fraction}): must be in (0, 1)")
    if by not in SPLIT_BY:
        raise ValueError(f"dataset_part(by={by!r}): choose one of {', '.join(SPLIT_BY)}")
    if by == "first_human_turn":
        owner = _owners_by_first_turn(dataset, held_out, judge_fraction, seed)
        kept = tuple(e for e in dataset.examples if owner[sources.first_human_turn(e.prompt)] == part)
        return dataclasses.replace(dataset, examples=kept,
                                   source=f"{dataset.source} [{part} part by first human turn, seed {seed}]")
    prompts = list(dict.fromkeys(e.prompt for e in dataset.examples))
    n_judge = round(judge_fraction * (len(prompts) - held_out))
    if not (0 < held_out and 0 < n_judge < len(prompts) - held_out):
        raise ValueError(f"{dataset.source}: {len(prompts)} distinct prompts cannot make an eval part of {held_out} "
                         f"and non-empty judge and train parts (judge_fraction={judge_fraction})")
    order = np.random.default_rng(seed).permutation(len(prompts))
    owner = {}
    for rank, i in enumerate(order):
        owner[prompts[i]] = "eval" if rank < held_out else "judge" if rank < held_out + n_judge else "train"
    kept = tuple(e for e in dataset.examples if owner[e.prompt] == part)
    return dataclasses.replace(dataset, examples=kept, source=f"{dataset.source} [{part} part, seed {seed}]")


def _owners_by_first_turn(dataset: Loaded, held_out: int, judge_fraction: float, seed: int) -> dict[str, str]:
    """The part of each first human turn: in a seeded order, the first `held_out` of each group go to
    'eval'; of the rest, the first `judge_fraction` to 'judge' and the others to 'train'."""
    group_of = {}
    for e in dataset.examples:
        group_of.setdefault(sources.first_human_turn(e.prompt), getattr(e, "group", ""))
    keys = list(group_of)
    sizes = {g: sum(1 for k in keys if group_of[k] == g) for g in dict.fromkeys(group_of.values())}
    small = {g: n for g, n in sizes.items() if n <= held_out}
    if held_out < 1 or small:
        raise ValueError(f"{dataset.source}: cannot hold out {held_out} conversations per group and keep some for "
                         f"training; conversations per group: {sizes}")
    order = np.random.default_rng(seed).permutation(len(keys))
    owner, taken, rest = {}, dict.fromkeys(sizes, 0), []
    for i in order:
        key = keys[i]
        if taken[group_of[key]] < held_out:
            owner[key] = "eval"
            taken[group_of[key]] += 1
        else:
            rest.append(key)
    n_judge = round(judge_fraction * len(rest))
    if not 0 < n_judge < len(rest):
        raise ValueError(f"{dataset.source}: {len(rest)} conversations after the held-out ones cannot make non-empty "
                         f"judge and train parts (judge_fraction={judge_fraction})")
    for rank, key in enumerate(rest):
        owner[key] = "judge" if rank < n_judge else "train"
    return owner
