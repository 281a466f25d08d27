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
    v = np.asarray(v)
    return float(v) if v.size == 1 else None


class MetricsWriter:
    def __init__(self, workdir: str, *, tensorboard: bool = True):
        self.active = jax.process_index() == 0
        self.workdir = workdir
        self._tb = None
        if not self.active:
            return
        os.makedirs(workdir, exist_ok=True)
        self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a")
        if tensorboard:
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))

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
        if self.active:
            with open(os.path.join(self.workdir, "summary.json"), "w") as f:
                json.dump(summary, f, indent=2, sort_keys=True, default=str)

    def close(self):
        if self.active:
            self._jsonl.close()
            if self._tb is not None:
                self._tb.close()
