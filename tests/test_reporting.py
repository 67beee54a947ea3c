"""metrics.jsonl: each row written once (bytes linear in the run), exact across resumes.

The object-store layout is exercised on TensorFlow's in-memory ram:// filesystem, through
the same tf.io.gfile calls a gs:// workdir takes (no bucket is reachable here).
"""

import os
import signal
import subprocess
import time

import pytest
import tensorflow as tf
from e2e import ROOT, cpu_env, final_params, main_command

from bt_jax import reporting


def _write_run(writer, steps, *, flush_every=0, first=1):
    """A run's rows: train at every step, knn every 5th; flush as before each checkpoint."""
    for step in range(first, steps + 1):
        writer.write_scalars(step, {"train/loss": 100.0 / step, "train/lr_weights": 0.1})
        if step % 5 == 0:
            writer.write_scalars(step, {"knn/knn_top1": float(step)})
        if flush_every and step % flush_every == 0:
            writer.flush()


def _expected_rows(first, last):
    rows = []
    for step in range(first, last + 1):
        rows.append({"step": step, "tag": "train", "loss": 100.0 / step, "lr_weights": 0.1})
        if step % 5 == 0:
            rows.append({"step": step, "tag": "knn", "knn_top1": float(step)})
    return rows


def _bytes_written_by_this_process() -> int:
    with open("/proc/self/io") as f:  # the kernel's count of bytes passed to write()
        return int(next(line for line in f if line.startswith("wchar:")).split()[1])


@pytest.mark.skipif(not os.path.exists("/proc/self/io"), reason="needs Linux's /proc/self/io")
def test_local_file_is_appended_so_bytes_written_are_linear(tmp_path):
    written, sizes = {}, {}
    for steps in (400, 800):
        workdir = str(tmp_path / str(steps))
        writer = reporting.JsonLinesWriter(workdir)
        before = _bytes_written_by_this_process()
        _write_run(writer, steps)
        writer.close()
        written[steps] = _bytes_written_by_this_process() - before
        sizes[steps] = os.path.getsize(os.path.join(workdir, "metrics.jsonl"))
        assert reporting.read_metrics(workdir) == _expected_rows(1, steps)
    for steps in written:  # every byte of the file written once (the old writer: ~steps/2x)
        assert sizes[steps] <= written[steps] <= sizes[steps] + 4096, (written, sizes)
    assert written[800] / written[400] < 2.1


def test_local_resume_truncates_the_rows_of_redone_steps_and_a_torn_line(tmp_path):
    workdir = str(tmp_path)
    writer = reporting.JsonLinesWriter(workdir)
    _write_run(writer, 12)
    writer.close()
    path = tmp_path / "metrics.jsonl"
    with open(path, "a") as f:
        f.write('{"step": 13, "tag": "tra')  # killed in the middle of a write
    assert [r["step"] for r in reporting.read_metrics(workdir, "train")] == list(range(1, 13))

    resumed = reporting.JsonLinesWriter(workdir, resume_step=10)  # checkpoint of step 10
    assert reporting.read_metrics(workdir) == _expected_rows(1, 10)
    _write_run(resumed, 14, first=11)
    resumed.close()
    assert reporting.read_metrics(workdir) == _expected_rows(1, 14)
    fresh = tmp_path / "fresh"
    writer = reporting.JsonLinesWriter(str(fresh))
    _write_run(writer, 14)
    writer.close()
    assert path.read_bytes() == (fresh / "metrics.jsonl").read_bytes()  # byte for byte


class _CountingGFile(tf.io.gfile.GFile):
    written: list[tuple[str, int]] = []

    def write(self, data):
        _CountingGFile.written.append((self.name, len(data)))
        return super().write(data)


def test_object_store_segments_are_written_once_and_trimmed_on_resume(monkeypatch):
    monkeypatch.setattr(tf.io.gfile, "GFile", _CountingGFile)
    workdir = f"ram://bt_jax_test_{time.time_ns()}/run"
    writer = reporting.JsonLinesWriter(workdir)
    _write_run(writer, 20, flush_every=4)  # a checkpoint every 4 steps
    writer.close()
    segments = tf.io.gfile.glob(f"{workdir}/metrics-*.jsonl")
    assert [os.path.basename(s) for s in sorted(segments)] == [
        f"metrics-{i:05d}.jsonl" for i in range(1, 6)
    ]
    sizes = sum(tf.io.gfile.stat(s).length for s in segments)
    assert sum(n for _, n in _CountingGFile.written) == sizes  # each byte written once
    assert len({name for name, _ in _CountingGFile.written}) == 5
    assert reporting.read_metrics(workdir) == _expected_rows(1, 20)

    # Resume from step 10 (mid-segment: steps 9-12): later segments go, 9-12 loses 11-12.
    resumed = reporting.JsonLinesWriter(workdir, resume_step=10)
    assert reporting.read_metrics(workdir) == _expected_rows(1, 10)
    _write_run(resumed, 16, first=11, flush_every=4)
    resumed.close()
    assert reporting.read_metrics(workdir) == _expected_rows(1, 16)
    assert reporting.read_metrics(workdir, "knn") == [
        r for r in _expected_rows(1, 16) if r["tag"] == "knn"
    ]


def test_metric_writer_writes_off_the_caller_and_flush_waits(tmp_path):
    writer = reporting.MetricWriter(str(tmp_path), enabled=True)
    for step in range(1, 6):
        writer.write(step, {"loss": 1.0 / step})
    writer.write(5, {"knn_top1": 12.5}, tag="knn")
    writer.flush()  # what the loop does before a checkpoint: everything is on disk now
    assert reporting.read_metrics(str(tmp_path)) == [
        *({"step": s, "tag": "train", "loss": 1.0 / s} for s in range(1, 6)),
        {"step": 5, "tag": "knn", "knn_top1": 12.5},
    ]
    writer.close()
    assert os.listdir(tmp_path / "tensorboard")
    assert reporting.MetricWriter(str(tmp_path / "other"), enabled=False).wandb_run_id == ""
    assert not (tmp_path / "other").exists()  # processes other than 0 write nothing


SMOKE_RUN = (
    "--config.train.stop_after_steps=10",
    "--config.train.checkpoint_every_steps=4",
    "--config.train.keep_checkpoints=10",
)


@pytest.mark.slow
@pytest.mark.usefixtures("compilation_cache")
def test_sigkill_then_resume_leaves_each_step_once(tmp_path):
    """A real pretraining process killed (SIGKILL) after step 6, then rerun: metrics.jsonl
    holds steps 1..10 once each, in order, though the killed run had logged steps past its
    last checkpoint that the rerun redid."""
    proc = subprocess.Popen(
        main_command(tmp_path, *SMOKE_RUN, "--config.train.debug_step_delay_s=0.3"),
        cwd=ROOT,
        env=cpu_env(8),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    path = tmp_path / "metrics.jsonl"
    deadline = time.time() + 300
    while not (path.exists() and len(path.read_text().splitlines()) >= 6):
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.time() < deadline, "timed out waiting for step 6"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    logged = [r["step"] for r in reporting.read_metrics(str(tmp_path), "train")]
    checkpoints = [int(d) for d in os.listdir(tmp_path / "checkpoints") if d.isdigit()]
    assert logged[:6] == list(range(1, 7)) and max(logged) < 10
    assert max(logged) > max(checkpoints, default=0)  # rows the rerun must not repeat

    result = subprocess.run(
        main_command(tmp_path, *SMOKE_RUN), cwd=ROOT, env=cpu_env(8), capture_output=True
    )
    assert result.returncode == 0, result.stderr[-3000:]
    rows = reporting.read_metrics(str(tmp_path), "train")
    assert [r["step"] for r in rows] == list(range(1, 11))
    assert all(line.endswith("}") for line in path.read_text().splitlines())


@pytest.mark.slow
@pytest.mark.usefixtures("compilation_cache")
def test_wandb_offline_run_id_survives_a_resume(tmp_path):
    pytest.importorskip("wandb", reason="wandb is not installed: pip install -e '.[wandb]'")
    env = {**cpu_env(8), "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    common = ("--config.train.wandb_project=bt_jax_test", "--config.train.checkpoint_every_steps=2")
    for stop in (2, 4):  # the second run resumes from the first one's checkpoint of step 2
        result = subprocess.run(
            main_command(tmp_path, *common, f"--config.train.stop_after_steps={stop}"),
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
        )
        assert result.returncode == 0, result.stderr[-3000:]
    _, first_meta, _ = final_params(tmp_path, step=2)
    _, last_meta, step = final_params(tmp_path)
    run_id = first_meta["wandb_run_id"]
    assert step == 4 and run_id and last_meta["wandb_run_id"] == run_id
    offline_runs = sorted(os.listdir(tmp_path / "wandb"))
    offline_runs = [d for d in offline_runs if d.startswith("offline-run-")]
    assert len(offline_runs) == 2 and all(d.endswith(f"-{run_id}") for d in offline_runs)
    assert [r["step"] for r in reporting.read_metrics(str(tmp_path), "train")] == [1, 2, 3, 4]
