"""The one training loop, shared by SFT, reward models and RL: the only place with checkpoints and logging.

    lock the workdir -> check its run identity -> restore (state, data position) -> for each step:
        step -> log -> evaluate -> checkpoint
    -> final checkpoint -> final evaluation -> summary.json

A stage supplies a `Job`: its state (a pytree of what trains and what it carries, saved whole), its
jit-compiled step over that state, its batches and its evaluation. The loop skips nothing on its own:
a step whose loss or gradient was not finite is skipped by the optimizer (`optim.guarded_update`) and
counted in its state. The run stops with `NonFiniteError` after `LoopConfig.max_nonfinite_updates` skipped
in a row, or when more than half of its updates were skipped (judged once that many were skipped in all,
and at the last step whatever the count): a model that diverged can still have steps whose update is
finite (a saturated batch: loss 0, gradient 0), which reset the count in a row. A final evaluation that
is not finite stops it too, without a summary.

The loop does not wait on the device each step: it keeps each step's counts on the device and reads
them where it reads from the device anyway (log, evaluation and checkpoint steps), checking them step
by step before anything is written, so a stop names the step it happened at and no checkpoint is saved
past it. Both rules read only what the checkpoint holds, so a resumed run stops where it would have.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import os
import resource
import time
from typing import Any, Callable

import jax

from pe_rlhf.checkpoints.orbax_io import RunCheckpointer
from pe_rlhf.data import BatchIterator
from pe_rlhf.train.config import LoopConfig
from pe_rlhf.train.optim import nonfinite_counts, nonfinite_updates
from pe_rlhf.train.records import check_identity, write_run_info
from pe_rlhf.train.workdir_lock import workdir_lock
from pe_rlhf.train.writer import MetricsWriter


class NonFiniteError(FloatingPointError):
    """Too many updates (in a row, or in all) had a non-finite loss or gradient, or the final evaluation is
    not finite."""


@dataclasses.dataclass
class Job:
    """What a stage hands the loop.

    state:     what is checkpointed and carried from step to step, e.g. {"trainable", "opt_state"} (+ the
               RL baseline and RNG key data); `opt_state` must come from a `guard_nonfinite` optimizer.
    step:      (state, batch) -> (state, metrics), jit-compiled (it may close over the frozen weights).
    batches:   the resumable training iterator.
    evaluate:  (state, step) -> held-out metrics.
    place:     puts a restored state where the step expects it (shardings).
    info:      the run record written to run_info.json; its "identity" guards resumes.
    examples:  how many examples a batch holds (for examples_per_s).
    memory:    the compiled step's memory report, printed and summarised (or None).
    on_start:  (state, start_step) -> None, called once before the first step (e.g. the RL start evaluation).
    """

    state: dict
    step: Callable[[dict, Any], tuple[dict, dict]]
    batches: BatchIterator
    evaluate: Callable[[dict, int], dict]
    place: Callable[[dict], dict]
    info: dict
    examples: Callable[[Any], int]
    memory: Any = None
    on_start: Callable[[dict, int], None] | None = None
    progress_keys: tuple[str, ...] = ("loss", "accuracy", "examples_per_s")


def rss_peak_bytes() -> int:
    """This process's peak resident memory so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def train_loop(workdir: str, loop: LoopConfig, job: Job) -> tuple[dict, dict]:
    """Run (or resume) `job` for `loop.num_steps` steps in `workdir`; returns (final state, summary).

    The workdir is locked meanwhile (`workdir_lock`): another process training in it is refused."""
    with workdir_lock(workdir):
        return _train(workdir, loop, job)


def _train(workdir: str, loop: LoopConfig, job: Job) -> tuple[dict, dict]:
    os.makedirs(workdir, exist_ok=True)
    ckpt = RunCheckpointer(os.path.join(workdir, "checkpoints"), every=loop.checkpoint_every,
                           keep=loop.keep_checkpoints)
    try:
        latest = ckpt.latest_step()
        check_identity(workdir, job.info, has_checkpoint=latest is not None)
        if latest is not None and latest > loop.num_steps:
            raise ValueError(f"LoopConfig.num_steps={loop.num_steps} is below step {latest}, where {workdir} "
                             "already is; raise num_steps to train on, or use a new workdir")
        state, start = job.state, 0
        if latest is not None:
            start, restored, meta = ckpt.restore(state)
            state = job.place(restored)
            job.batches.restore(meta["data"])
            print(f"resumed from {ckpt.directory} at step {start}")
        write_run_info(workdir, job.info)
        writer = MetricsWriter(workdir, resume_step=start)
        if job.memory is not None and jax.process_index() == 0:
            print(f"memory: {job.memory}")
        if job.on_start is not None:
            job.on_start(state, start)
        state = _steps(workdir, loop, job, ckpt, writer, state, start)
        _check_updates(workdir, loop, loop.num_steps, [nonfinite_updates(state["opt_state"])])  # resumed at the end
        ckpt.close()
    except BaseException:
        ckpt.close()
        raise
    final = job.evaluate(state, loop.num_steps)
    writer.rewrite(loop.num_steps, final, prefix="eval")  # once, even when resumed at the last step
    summary = {"step": loop.num_steps, **{f"eval/{k}": v for k, v in final.items()},
               "skipped_steps": nonfinite_updates(state["opt_state"])[1], "batch_size": loop.batch_size,
               "compiled_peak_bytes": job.memory.compiled.peak_bytes if job.memory is not None else None,
               "rss_peak_bytes_process": rss_peak_bytes(), **job.info}
    bad = nonfinite_metrics(summary)
    if bad:
        writer.close()
        raise NonFiniteError(
            f"{workdir}: the final evaluation at step {loop.num_steps} is not finite: {', '.join(bad)} (logged as "
            f"null in {os.path.join(workdir, 'metrics.jsonl')}); no summary.json is written. The model diverged: "
            "lower OptimizerConfig.learning_rate or check the data and rewards, then rerun in a new workdir")
    writer.summary(summary)
    writer.close()
    return state, summary


def _check_updates(workdir: str, loop: LoopConfig, first_step: int, counts) -> int:
    """Stop at the first of the steps from `first_step` (one row of `counts`, [skipped in a row, in all],
    each) that had `loop.max_nonfinite_updates` skipped in a row, or more than half of its updates skipped
    (once that many were skipped in all, or at the last step). Returns the skipped in all at the last."""
    total = 0
    for step, (in_a_row, total) in enumerate(counts, first_step):
        in_a_row, total = int(in_a_row), int(total)
        if in_a_row >= loop.max_nonfinite_updates:
            raise NonFiniteError(
                f"{workdir}: {in_a_row} updates in a row (through step {step}) had a non-finite loss or gradient "
                f"and were skipped ({total} in all); stopping "
                f"(LoopConfig.max_nonfinite_updates={loop.max_nonfinite_updates}). The last checkpoint holds the "
                "last finite state: lower OptimizerConfig.learning_rate or check the data and rewards, then rerun")
        if 2 * total > step and (total >= loop.max_nonfinite_updates or step == loop.num_steps):
            raise NonFiniteError(
                f"{workdir}: {total} of the {step} updates through step {step} had a non-finite loss or gradient "
                "and were skipped, more than half: the model diverged (its finite updates are no sign of "
                "training); stopping. Lower OptimizerConfig.learning_rate or check the data and rewards, then "
                "rerun in a new workdir")
    return total


def nonfinite_metrics(summary: dict) -> list[str]:
    """The keys of `summary` whose value is a NaN or infinite number (an undefined metric is None instead)."""
    return [k for k, v in summary.items()
            if isinstance(v, numbers.Real) and not isinstance(v, bool) and not math.isfinite(v)]


def _steps(workdir, loop: LoopConfig, job: Job, ckpt: RunCheckpointer, writer: MetricsWriter, state: dict,
           start: int) -> dict:
    bar = None
    if loop.progress_bar and jax.process_index() == 0:
        from tqdm import tqdm

        bar = tqdm(total=loop.num_steps, initial=start, desc=os.path.basename(workdir) or "train",
                   dynamic_ncols=True)

    def save(step, force=False):
        ckpt.save(step, state, {"data": job.batches.state(), "step": step}, force=force)

    t_last, examples = time.perf_counter(), 0
    counts = []  # each step's [skipped in a row, in all] since the last check, still on the device
    for step in range(start + 1, loop.num_steps + 1):
        batch = next(job.batches)
        state, metrics = job.step(state, batch)
        examples += job.examples(batch)
        counts.append(nonfinite_counts(state["opt_state"]))
        log = step % loop.log_every == 0 or step == loop.num_steps
        evaluate = loop.eval_every and step % loop.eval_every == 0 and step != loop.num_steps
        # Checked where the loop waits on the device anyway, before it logs, evaluates or saves (a fresh
        # run's first step is saved too).
        if log or evaluate or step % loop.checkpoint_every == 0 or step == start + 1:
            total = _check_updates(workdir, loop, step - len(counts) + 1, jax.device_get(counts))
            counts = []
        if log:
            metrics = jax.device_get(metrics)
            now = time.perf_counter()
            metrics["examples_per_s"] = examples / (now - t_last)
            metrics["skipped_steps"] = total
            t_last, examples = now, 0
            scalars = writer.write(step, metrics)
            if bar is not None:
                bar.set_postfix({k.split("/")[1]: f"{v:.4g}" for k, v in scalars.items()
                                 if k.split("/")[1] in job.progress_keys})
        if evaluate:
            writer.write(step, job.evaluate(state, step), prefix="eval")
        save(step)
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    if ckpt.latest_step() != loop.num_steps:
        save(loop.num_steps, force=True)
    return state
