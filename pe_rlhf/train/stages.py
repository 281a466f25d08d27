"""Stages of a multi-stage job, each in its own sub-workdir, finished only when everything it promised exists.

A stage's job resumes from its own checkpoints; this module only decides whether to call it. The
`DONE` marker is written last, atomically, after the job returned and every promised output was
checked, so a process killed at any moment leaves either a finished stage (marker present) or one
that a rerun repairs by calling the job again (which restores its latest checkpoint and redoes only
what is missing: the remaining steps, the final evaluation, the export).
"""

from __future__ import annotations

import json
import math
import os
import time
from typing import Callable, Sequence

DONE = "DONE"


class StageError(RuntimeError):
    """A stage's job returned without writing what it promised."""


def strict_json(value):
    """`value` with every non-finite float replaced by None, so `json.dump` writes strict JSON."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): strict_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict_json(v) for v in value]
    return value


def write_json_atomic(path: str, value) -> None:
    """Write `value` as strict JSON to `path` through a temporary file and a rename."""
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(strict_json(value), f, indent=2, sort_keys=True, default=str, allow_nan=False)
        f.write("\n")
    os.replace(tmp, path)


def read_json(path: str) -> dict | None:
    """The JSON object in `path`, or None when there is no such file."""
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def finished(stage_dir: str, marker: str = DONE) -> dict | None:
    """The record of a finished stage (what its job returned, its wall time), or None."""
    return read_json(os.path.join(stage_dir, marker))


def missing_outputs(stage_dir: str, outputs: Sequence[str]) -> list[str]:
    return [o for o in outputs if not os.path.exists(os.path.join(stage_dir, o))]


def run_stage(name: str, stage_dir: str, job: Callable[..., dict], *, outputs: Sequence[str] = ("summary.json",),
              marker: str = DONE, **kwargs) -> dict:
    """`job(workdir=stage_dir, **kwargs)` unless the stage finished before; returns the job's summary.

    `outputs` are paths relative to `stage_dir` that must exist before the stage counts as finished.
    The returned record holds the job's summary under "summary" and the seconds of the call that
    finished it under "seconds" (a resumed stage's seconds cover only the last call). `marker` names
    the record's file: stages that continue one workdir (an RL run trained to step 20, then to 40)
    each have their own.
    """
    done = finished(stage_dir, marker)
    if done is not None:
        lost = missing_outputs(stage_dir, outputs)
        if not lost:
            print(f"=== {name}: already done in {stage_dir} ===")
            return done
        print(f"=== {name}: marked done but {', '.join(lost)} missing; running it again ===")
        os.remove(os.path.join(stage_dir, marker))
    print(f"\n=== {name} ({stage_dir}) ===")
    os.makedirs(stage_dir, exist_ok=True)
    t0 = time.perf_counter()
    summary = job(workdir=stage_dir, **kwargs)
    seconds = time.perf_counter() - t0
    lost = missing_outputs(stage_dir, outputs)
    if lost:
        raise StageError(f"stage {name}: the job returned but {', '.join(lost)} missing in {stage_dir}")
    record = {"stage": name, "summary": summary, "seconds": seconds}
    write_json_atomic(os.path.join(stage_dir, marker), record)
    return strict_json(record)
