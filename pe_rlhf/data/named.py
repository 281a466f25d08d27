"""Datasets by name, so a config names its data in one line.

`named_dataset("hh_harmless")` reads the real set under the data directory
(`$PE_RLHF_DATA_DIR`, else `../shared/data`); `tfds:<name>` goes through the
tensorflow-datasets builders instead (built from the same local files into
`$PE_RLHF_TFDS_DIR`, default ~/.cache/pe_rlhf/tfds; the shared data stays read-only).
"""

from __future__ import annotations

import os

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
        loaded = Loaded(examples=tuple(loaded.examples[:limit]), source=loaded.source,
                        skipped_identical=loaded.skipped_identical)
    return loaded
