"""Metrics out of a run: metrics.jsonl (one line per logged step), TensorBoard events, summary.json.

Only the main process writes (multi-host runs log once).
"""

from __future__ import annotations

import json
import math
import os

import jax
import numpy as np


def _scalar(v):
    """`v` as a float, or None (not logged) for an undefined metric or an array of more than one value."""
    if v is None:
        return None
    v = np.asarray(v)
    return float(v) if v.size == 1 else None


def truncate_metrics(path: str, last_step: int, *, drop_prefix_at: str | None = None) -> int:
    """Drop the lines of `path` logged after `last_step` (a resumed run logs them again); returns how many.

    With `drop_prefix_at` (e.g. "eval/"), the lines AT `last_step` whose every metric has that prefix go
    too: what the run is about to log again there (its final evaluation, on a resume at its last step).
    """
    if not os.path.isfile(path):
        return 0
    with open(path) as f:
        lines = f.readlines()
    keep = []
    for line in lines:
        try:
            row = json.loads(line)
            step = row["step"]
        except (ValueError, KeyError, TypeError):  # a line cut by a kill mid-write
            continue
        again = (drop_prefix_at is not None and step == last_step and len(row) > 1
                 and all(k.startswith(drop_prefix_at) for k in row if k != "step"))
        if step <= last_step and not again:
            keep.append(line if line.endswith("\n") else line + "\n")
    if len(keep) != len(lines):
        tmp = f"{path}.tmp-{os.getpid()}"
        with open(tmp, "w") as f:
            f.writelines(keep)
        os.replace(tmp, path)
    return len(lines) - len(keep)


class MetricsWriter:
    """Appends to metrics.jsonl and TensorBoard; `resume_step` first cuts both back to that step, so a
    resumed run logs every step once."""

    def __init__(self, workdir: str, *, tensorboard: bool = True, resume_step: int | None = None):
        self.active = jax.process_index() == 0
        self.workdir = workdir
        self._tb = None
        if not self.active:
            return
        os.makedirs(workdir, exist_ok=True)
        path = os.path.join(workdir, "metrics.jsonl")
        if resume_step is not None:
            truncate_metrics(path, resume_step)
        self._jsonl = open(path, "a")
        if tensorboard:
            from tensorboardX import SummaryWriter

            purge = None if resume_step is None else resume_step + 1
            self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"), purge_step=purge)

    def rewrite(self, step: int, metrics: dict, prefix: str) -> dict:
        """`write`, first dropping the rows of only `prefix` metrics already logged at `step` (the final
        evaluation of a run resumed at its last step, or one that evaluated there in training)."""
        if self.active:
            self._jsonl.close()
            path = os.path.join(self.workdir, "metrics.jsonl")
            truncate_metrics(path, step, drop_prefix_at=f"{prefix}/")
            self._jsonl = open(path, "a")
        return self.write(step, metrics, prefix=prefix)

    def write(self, step: int, metrics: dict, prefix: str = "train") -> dict:
        scalars = {f"{prefix}/{k}": s for k, v in metrics.items() if (s := _scalar(v)) is not None}
        if self.active:
            row = {"step": int(step), **{k: (v if math.isfinite(v) else None) for k, v in scalars.items()}}
            self._jsonl.write(json.dumps(row) + "\n")
            self._jsonl.flush()
            if self._tb is not None:
                for k, v in scalars.items():
                    self._tb.add_scalar(k, v, step)
        return scalars

    def summary(self, summary: dict) -> None:
        """summary.json as strict JSON (a non-finite number is written as null)."""
        if self.active:
            from pe_rlhf.train.stages import write_json_atomic

            write_json_atomic(os.path.join(self.workdir, "summary.json"), summary)

    def close(self):
        if self.active:
            self._jsonl.close()
            if self._tb is not None:
                self._tb.close()
