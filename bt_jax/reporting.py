"""Metrics out of a job: JSON lines, TensorBoard, optional wandb, and a console progress line.

Only process 0 writes; the other processes get a writer that does nothing, so callers need
no `if jax.process_index() == 0` of their own.
"""

from __future__ import annotations

import math
import os
import sys
import time

import jax
import numpy as np


def format_duration(seconds: float) -> str:
    if not math.isfinite(seconds) or seconds < 0:
        return "?"
    seconds = int(round(seconds))
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d{hours:02d}h{minutes:02d}m"
    if hours:
        return f"{hours}h{minutes:02d}m"
    return f"{minutes}m{secs:02d}s"


class MetricWriter:
    """A run's scalars to metrics.jsonl, TensorBoard and (optionally) wandb, off the loop.

    write(step, {"loss": ...}, tag="train") hands the row to clu's AsyncMultiWriter, whose
    background thread writes <workdir>/metrics.jsonl (see writers.py for its layout and
    resume rule), <workdir>/tensorboard ("train/loss") and, with wandb_project set, that
    W&B project ("train/loss" at that step). flush() waits until everything written so
    far is on disk; the pretraining loop calls it before each checkpoint. wandb_run_id
    continues an earlier W&B run (the pretraining job keeps it in its checkpoints).
    """

    def __init__(
        self,
        workdir: str,
        enabled: bool | None = None,
        resume_step: int | None = None,
        *,
        wandb_project: str = "",
        wandb_run_id: str = "",
        config: dict | None = None,
    ):
        self.enabled = jax.process_index() == 0 if enabled is None else enabled
        self.wandb_run_id = ""
        if not self.enabled:
            return
        from clu import metric_writers  # imports TensorFlow: only where metrics are written

        from bt_jax import writers

        backends = [
            writers.JsonLinesWriter(workdir, resume_step=resume_step),
            metric_writers.SummaryWriter(os.path.join(workdir, "tensorboard")),
        ]
        if wandb_project:
            run = writers.WandbWriter(
                wandb_project,
                run_id=wandb_run_id,
                name=os.path.basename(workdir.rstrip("/")),
                config=config,
                dir=None if writers.is_object_store(workdir) else workdir,
            )
            self.wandb_run_id = run.run_id
            backends.append(run)
        self._writer = metric_writers.AsyncMultiWriter(backends)

    def write(self, step: int, scalars: dict, tag: str = "train") -> None:
        if not self.enabled:
            return
        tagged = {f"{tag}/{k}": float(np.asarray(v)) for k, v in scalars.items()}
        self._writer.write_scalars(int(step), tagged)

    def flush(self) -> None:
        if self.enabled:
            self._writer.flush()

    def close(self) -> None:
        if self.enabled:
            self._writer.close()


class Progress:
    """One console line per report: position, metrics, throughput and ETA (process 0)."""

    def __init__(self, total_steps: int, start_step: int, name: str = "pretrain", stream=None):
        self.total = total_steps
        self.start = start_step
        self.name = name
        self.stream = stream or sys.stdout
        self.enabled = jax.process_index() == 0
        self.t0 = time.perf_counter()

    def eta(self, step: int) -> float:
        done = step - self.start
        if done <= 0:
            return float("nan")
        return (time.perf_counter() - self.t0) / done * (self.total - step)

    def report(self, step: int, text: str) -> None:
        if not self.enabled:
            return
        pct = 100.0 * step / max(self.total, 1)
        line = (
            f"[{self.name}] step {step}/{self.total} ({pct:.1f}%) | {text} | "
            f"ETA {format_duration(self.eta(step))}"
        )
        print(line, file=self.stream, flush=True)

    def say(self, text: str) -> None:
        if self.enabled:
            print(f"[{self.name}] {text}", file=self.stream, flush=True)
