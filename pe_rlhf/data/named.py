"""Datasets by name, so a config names its data in one line.

`named_dataset("hh_harmless")` reads the real set under the data directory
(`$PE_RLHF_DATA_DIR`, else `../shared/data`); `tfds:<name>` goes through the
tensorflow-datasets builders instead (built from the same local files into
`$PE_RLHF_TFDS_DIR`, default ~/.cache/pe_rlhf/tfds; the shared data stays read-only).
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np

from pe_rlhf.data import sources
from pe_rlhf.data.examples import Loaded

_NAMED = {
    "hh_harmless": (sources.read_hh_harmless, sources.HH_HARMLESS),
    "taskmaster_coffee": (sources.read_taskmaster, sources.TASKMASTER_COFFEE),
    "taskmaster_ticketing": (sources.read_taskmaster, sources.TASKMASTER_TICKETING),
}


def named_dataset(name: str, data_dir: str | None = None, limit: int | None = None) -> Loaded:
    """The examples of a named set; `limit` keeps the first N (for quick runs)."""
    data_dir = data_dir or sources.default_data_dir()
    if name.startswith("tfds:"):
        from pe_rlhf.data import tfds_builders

        tfds_name = name.partition(":")[2]
        cache = os.environ.get("PE_RLHF_TFDS_DIR", os.path.expanduser("~/.cache/pe_rlhf/tfds"))
        examples = tfds_builders.load(tfds_name, data_dir=cache, manual_dir=data_dir)
        loaded = Loaded(examples=tuple(examples), source=name, skipped_identical=0)
    elif name in _NAMED:
        read, rel = _NAMED[name]
        loaded = read(os.path.join(data_dir, rel))
    else:
        raise KeyError(f"unknown dataset {name!r}; known: {', '.join(sorted(_NAMED))}, or tfds:<builder name>")
    if limit is not None:
        loaded = dataclasses.replace(loaded, examples=tuple(loaded.examples[:limit]))
    return loaded


PARTS = ("eval", "train", "judge")


def dataset_part(dataset: Loaded, part: str, *, held_out: int = 100, judge_fraction: float = 0.5,
                 seed: int = 0) -> Loaded:
    """One of three prompt-disjoint parts of `dataset`, for an experiment whose judge must be independent.

    - 'eval': `held_out` prompts that no stage trains on (the final evaluation's prompts);
    - 'judge': `judge_fraction` of the other prompts, for a judge reward model no other stage sees;
    - 'train': the rest, for SFT, the proxy reward model and the RL prompts.

    Items with the same prompt stay in one part. The split is a seeded permutation of the distinct
    prompts, so it is the same on every call, in every process.
    """
    if part not in PARTS:
        raise ValueError(f"dataset_part(part={part!r}): choose one of {', '.join(PARTS)}")
    if not 0.0 < judge_fraction < 1.0:
        raise ValueError(f"dataset_part(judge_fraction={judge_fraction}): must be in (0, 1)")
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
