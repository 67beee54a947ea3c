"""Metrics out of a job: JSON lines, TensorBoard, optional wandb, and a console progress line.

Only process 0 writes; the other processes get a writer that does nothing, so callers need
no `if jax.process_index() == 0` of their own.

JSON lines: one row {"step": s, "tag": t, **scalars} per line, for the scalars written as
"t/name" (the TensorBoard tag). Each row is written once, so the bytes written over a run
are linear in its length:
- a local workdir: <workdir>/metrics.jsonl, appended row by row;
- an object store (gs://, s3://: no append): segments <workdir>/metrics-00001.jsonl, ...,
  each written once with the rows since the previous one. A segment is cut at every flush
  (the pretraining loop flushes before each checkpoint), at close, and when its oldest row
  is `segment_seconds` old.
`read_metrics` returns a run's rows in order, whichever the layout.

Resume: a run restarting from the checkpoint of step k redoes steps k+1, ...; the rows it
wrote for them before it stopped are removed first (the local file truncated at the first
such row, a torn last line included; later segments deleted, the one holding step k
rewritten without them), so no step appears twice. The loop flushes before each checkpoint,
so every row of a step <= k is written before checkpoint k commits: none is lost.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time

import jax
import numpy as np
from absl import logging


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


JSONL = "metrics.jsonl"
SEGMENT_GLOB = "metrics-*.jsonl"


def is_object_store(workdir: str) -> bool:
    return "://" in workdir


def _gfile():
    import tensorflow as tf  # speaks gs:// (and ram://, which the tests use)

    return tf.io.gfile


def _row_lines(step: int, scalars) -> list[str]:
    """ "tag/name" scalars of one step -> one JSON line per tag, in first-seen tag order."""
    rows: dict[str, dict] = {}
    for key, value in scalars.items():
        tag, name = key.split("/", 1) if "/" in key else ("", key)
        rows.setdefault(tag, {"step": int(step), "tag": tag})[name] = float(value)
    return [json.dumps(row) + "\n" for row in rows.values()]


def _parse(line: str) -> dict | None:
    try:
        return json.loads(line)
    except json.JSONDecodeError:
        return None


def _segments(workdir: str) -> list[str]:
    gfile = _gfile()
    return sorted(gfile.glob(os.path.join(workdir, SEGMENT_GLOB)))


def read_metrics(workdir: str, tag: str | None = None) -> list[dict]:
    """The run's rows in the order written (all tags, or those of `tag`).

    A torn last line (a run killed mid-write) is skipped; the next resume removes it.
    """
    if is_object_store(workdir):
        gfile = _gfile()
        texts = []
        for path in _segments(workdir):
            with gfile.GFile(path) as f:
                texts.append(f.read())
    else:
        path = os.path.join(workdir, JSONL)
        texts = []
        if os.path.exists(path):
            with open(path) as f:
                texts.append(f.read())
    rows = []
    for text in texts:
        for line in text.splitlines():
            row = _parse(line)
            if row is None:
                logging.warning("skipping an unreadable metrics line: %.80r", line)
            elif tag is None or row["tag"] == tag:
                rows.append(row)
    return rows


def _truncate_local(path: str, resume_step: int) -> None:
    """Cut metrics.jsonl before its first row of a step > resume_step or a torn line."""
    if not os.path.exists(path):
        return
    offset = 0
    with open(path, "rb") as f:
        for line in f:
            row = _parse(line.decode("utf-8", "replace"))
            if not line.endswith(b"\n") or (row is not None and row["step"] > resume_step):
                break
            offset += len(line)
    if offset < os.path.getsize(path):
        os.truncate(path, offset)


def _trim_segments(workdir: str, resume_step: int) -> None:
    """Delete segments after resume_step and rewrite the one that holds it, newest first."""
    gfile = _gfile()
    for path in reversed(_segments(workdir)):
        with gfile.GFile(path) as f:
            lines = f.read().splitlines(keepends=True)
        kept = [
            ln for ln in lines if (row := _parse(ln)) is not None and row["step"] <= resume_step
        ]
        if not kept:
            gfile.remove(path)
            continue
        if len(kept) < len(lines):  # write, then rename: the rows <= resume_step never lost
            with gfile.GFile(path + ".tmp", "w") as f:
                f.write("".join(kept))
            gfile.rename(path + ".tmp", path, overwrite=True)
        return


class _ScalarsOnly:
    """A clu MetricWriter (by its methods: AsyncMultiWriter needs no base class, and clu's
    package imports TensorFlow) that writes scalars; other summaries are refused."""

    def _refuse(self, *args, **kwargs):
        raise NotImplementedError(f"{type(self).__name__} writes scalars only")

    write_summaries = write_images = write_videos = write_audios = _refuse
    write_texts = write_histograms = write_hparams = _refuse


class JsonLinesWriter(_ScalarsOnly):
    """metrics.jsonl (local, appended) or metrics-NNNNN.jsonl segments (object stores)."""

    def __init__(self, workdir: str, *, resume_step: int | None = None, segment_seconds=600.0):
        self._workdir = workdir
        self._segmented = is_object_store(workdir)
        self._segment_seconds = segment_seconds
        self._pending: list[str] = []
        self._pending_since = 0.0
        if self._segmented:
            _gfile().makedirs(workdir)
            if resume_step is not None:
                _trim_segments(workdir, resume_step)
            existing = _segments(workdir)
            last = os.path.basename(existing[-1]) if existing else "metrics-0.jsonl"
            self._next_segment = int(last.removeprefix("metrics-").removesuffix(".jsonl")) + 1
            self._file = None
        else:
            os.makedirs(workdir, exist_ok=True)
            path = os.path.join(workdir, JSONL)
            if resume_step is not None:
                _truncate_local(path, resume_step)
            self._file = open(path, "a")  # noqa: SIM115 (open for the writer's lifetime)

    def write_scalars(self, step: int, scalars) -> None:
        lines = _row_lines(step, scalars)
        if self._file is not None:
            self._file.write("".join(lines))
            self._file.flush()  # visible to readers (and kept through a SIGKILL) at once
            return
        if not self._pending:
            self._pending_since = time.monotonic()
        self._pending.extend(lines)
        if time.monotonic() - self._pending_since >= self._segment_seconds:
            self.flush()

    def flush(self) -> None:
        if not self._pending:
            return
        name = f"metrics-{self._next_segment:05d}.jsonl"
        with _gfile().GFile(os.path.join(self._workdir, name), "w") as f:
            f.write("".join(self._pending))
        self._pending, self._next_segment = [], self._next_segment + 1

    def close(self) -> None:
        self.flush()
        if self._file is not None:
            self._file.close()


class WandbWriter(_ScalarsOnly):
    """Scalars to a Weights & Biases run; `run_id` resumes that run (resume="allow").

    WANDB_MODE=offline writes the run under <dir>/wandb for a later `wandb sync`, with no
    network.
    """

    def __init__(self, project: str, *, run_id: str = "", name: str = "", config=None, dir=None):
        try:
            import wandb
        except ImportError:
            raise ValueError(
                f"train.wandb_project={project!r} needs wandb: pip install -e '.[wandb]' "
                "(or set --config.train.wandb_project='' to log without it)"
            ) from None
        self._run = wandb.init(
            project=project,
            id=run_id or None,
            resume="allow",
            name=name or None,
            config=config,
            dir=dir,
        )

    @property
    def run_id(self) -> str:
        return self._run.id

    def write_scalars(self, step: int, scalars) -> None:
        self._run.log(dict(scalars), step=int(step))

    def flush(self) -> None:
        pass  # wandb streams (or stores offline) on its own

    def close(self) -> None:
        self._run.finish()


class MetricWriter:
    """A run's scalars to metrics.jsonl, TensorBoard and (optionally) wandb, off the loop.

    write(step, {"loss": ...}, tag="train") hands the row to clu's AsyncMultiWriter, whose
    background thread writes <workdir>/metrics.jsonl (layout and resume rule: the
    module docstring), <workdir>/tensorboard ("train/loss") and, with wandb_project set, that
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

        backends = [
            JsonLinesWriter(workdir, resume_step=resume_step),
            metric_writers.SummaryWriter(os.path.join(workdir, "tensorboard")),
        ]
        if wandb_project:
            run = WandbWriter(
                wandb_project,
                run_id=wandb_run_id,
                name=os.path.basename(workdir.rstrip("/")),
                config=config,
                dir=None if is_object_store(workdir) else workdir,
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
