"""Metrics out of a job: JSON lines, TensorBoard events and a console progress line.

Only process 0 writes; the other processes get a writer that does nothing, so callers need
no `if jax.process_index() == 0` of their own.
"""

from __future__ import annotations

import json
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
    """Appends {"step": s, "tag": ..., **scalars} to workdir/metrics.jsonl and TensorBoard.

    Paths go through tf.io.gfile, so a gs:// workdir works. Object stores cannot append, so
    the file is rewritten whole at each write (a few MB over a full ImageNet run).
    """

    def __init__(self, workdir: str, enabled: bool | None = None, resume_step: int | None = None):
        self.enabled = jax.process_index() == 0 if enabled is None else enabled
        if not self.enabled:
            return
        import tensorflow as tf  # the input pipeline's dependency; gfile speaks gs://
        from clu import metric_writers

        self._gfile = tf.io.gfile
        self._path = os.path.join(workdir, "metrics.jsonl")
        self._gfile.makedirs(workdir)
        self._lines = []
        if self._gfile.exists(self._path):  # a resumed run continues the same file...
            with self._gfile.GFile(self._path) as f:
                self._lines = f.read().splitlines()
            if resume_step is not None:  # ...without the rows of steps it will redo
                self._lines = [ln for ln in self._lines if json.loads(ln)["step"] <= resume_step]
        self._tb = metric_writers.SummaryWriter(os.path.join(workdir, "tensorboard"))

    def write(self, step: int, scalars: dict, tag: str = "train") -> None:
        if not self.enabled:
            return
        clean = {k: float(np.asarray(v)) for k, v in scalars.items()}
        self._lines.append(json.dumps({"step": int(step), "tag": tag, **clean}))
        tmp = self._path + ".tmp"
        with self._gfile.GFile(tmp, "w") as f:  # write, then rename: never a torn file
            f.write("\n".join(self._lines) + "\n")
        self._gfile.rename(tmp, self._path, overwrite=True)
        self._tb.write_scalars(int(step), {f"{tag}/{k}": v for k, v in clean.items()})
        self._tb.flush()

    def close(self) -> None:
        if self.enabled:
            self._tb.close()


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
