"""The pretraining job end to end, as real processes: devices, hosts, resume, failures.

All runs use configs/quickstart.py:smoke on the embedded dataset with the train split cut
into 2 streams (data.num_streams=2), so 1 process and 2 processes read the same global
batches. A persistent compilation cache shared by the runs keeps the suite fast; it does
not change what is computed (the cached executable is the one that would be compiled).
"""

import os
import pathlib
import signal
import subprocess
import time

import jax
import numpy as np
import pytest
from e2e import (
    ROOT,
    cpu_env,
    final_params,
    main_command,
    max_abs_diff,
    read_metrics,
    run_main,
    run_multiprocess,
)

from bt_jax.defaults import load_config

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("compilation_cache")]

STEPS = 12
COMMON = (
    "--config.data.num_streams=2",
    "--config.train.checkpoint_every_steps=3",
    "--config.train.keep_checkpoints=20",
)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted 12-step run on 1 process x 8 devices."""
    workdir = tmp_path_factory.mktemp("reference")
    result = run_main(
        workdir, *COMMON, f"--config.train.stop_after_steps={STEPS}", "--config.knn.at_end=True"
    )
    return workdir, result


def test_reference_run_reports_progress_and_metrics(reference):
    workdir, result = reference
    rows = read_metrics(workdir)
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    for key in (
        "loss",
        "invariance",
        "redundancy",
        "lr_weights",
        "lr_biases",
        "images_per_s",
        "images_per_s_per_device",
        "step_time_s",
    ):
        assert all(np.isfinite(r[key]) for r in rows), key
    first = rows[0]
    assert first["loss"] == pytest.approx(
        first["invariance"] + 0.0051 * first["redundancy"], rel=1e-5
    )
    assert first["lr_weights"] == 0.0  # warm-up starts at 0, as the official schedule
    assert "ETA" in result.stdout and "[pretrain] step 12/12" in result.stdout
    assert os.path.isdir(os.path.join(workdir, "tensorboard"))
    knn_rows = read_metrics(workdir, tag="knn")
    assert [r["step"] for r in knn_rows] == [STEPS]
    assert 0 <= knn_rows[0]["knn_top1"] <= knn_rows[0]["knn_top5"] <= 100
    assert knn_rows[0]["knn_num_queries"] == 1000  # the embedded test split, counted once
    assert "kNN (k=200, backbone features, cifar10_jpeg_mini)" in result.stdout
    _, meta, step = final_params(workdir)
    assert step == STEPS and meta["data"]["next_step"] == STEPS
    assert meta["config"]["model"]["projector"] == "64-64"


def test_one_device_gives_the_eight_device_loss_curve(reference, tmp_path):
    workdir, _ = reference
    run_main(tmp_path, *COMMON, "--config.train.stop_after_steps=5", devices=1)
    one = [r["loss"] for r in read_metrics(tmp_path)]
    eight = [r["loss"] for r in read_metrics(workdir)][:5]
    assert len(one) == 5
    np.testing.assert_allclose(one, eight, rtol=1e-5)


def test_two_processes_equal_one_process(reference, tmp_path):
    workdir, _ = reference
    result = run_multiprocess(tmp_path, *COMMON, "--config.train.stop_after_steps=6")
    assert "[p0]" in result.stdout and "2 process(es), 8 devices" in result.stdout
    ours, _, step = final_params(tmp_path)
    ref, _, _ = final_params(workdir, step=6)
    assert step == 6
    assert max_abs_diff(ours, ref) <= 1e-5


def _start(workdir, *overrides):
    return subprocess.Popen(
        main_command(workdir, *COMMON, *overrides),
        cwd=ROOT,
        env=cpu_env(8),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _wait_for_step(proc, workdir, step, timeout=300):
    deadline = time.time() + timeout
    path = os.path.join(workdir, "metrics.jsonl")
    while time.time() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"run ended early: {proc.communicate()}")
        if os.path.exists(path) and len(pathlib.Path(path).read_text().splitlines()) >= step:
            return
        time.sleep(0.05)
    raise AssertionError("timed out waiting for the run")


def test_sigkill_and_sigterm_then_resume_reach_the_same_parameters(reference, tmp_path):
    """Killed (SIGKILL) at a random step, restarted, preempted (SIGTERM), restarted: the
    final parameters are bit-identical to the uninterrupted run's on CPU: the executable and
    the inputs are the same (the pipeline is a function of the step), and checkpoints hold
    the exact float32 state."""
    workdir, _ = reference
    slow = (f"--config.train.stop_after_steps={STEPS}", "--config.train.debug_step_delay_s=0.3")
    kill_at = int(np.random.default_rng().integers(1, 6))
    proc = _start(tmp_path, *slow)
    _wait_for_step(proc, tmp_path, kill_at)
    proc.kill()
    proc.wait()
    killed_after = len(read_metrics(tmp_path))
    assert killed_after < STEPS, "the run finished before it could be killed"

    proc = _start(tmp_path, *slow)
    resumed_from = (killed_after // 3) * 3  # checkpoints every 3 steps
    _wait_for_step(proc, tmp_path, max(resumed_from + 2, 7))
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert "preemption signal: checkpoint of step" in out
    assert f"resuming at step {resumed_from}" in out or resumed_from == 0
    _, _, preempted_at = final_params(tmp_path)
    assert preempted_at < STEPS

    run_main(tmp_path, *COMMON, f"--config.train.stop_after_steps={STEPS}")
    ours, _, step = final_params(tmp_path)
    assert step == STEPS
    steps_logged = [r["step"] for r in read_metrics(tmp_path)]
    assert steps_logged == list(range(1, STEPS + 1))  # redone steps replace their rows
    diff = max_abs_diff(ours, final_params(workdir)[0])
    assert diff == 0.0, f"killed after {killed_after}, preempted at {preempted_at}: {diff}"


def test_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path):
    result = run_main(
        tmp_path,
        *COMMON,
        f"--config.train.stop_after_steps={STEPS}",
        "--config.train.debug_nan_at_step=4",
        check=False,
    )
    assert result.returncode != 0
    assert "loss became non-finite at step 4" in result.stderr
    params, _, step = final_params(tmp_path)
    assert step == 3  # checkpoints every 3 steps; the poisoned state never reaches disk
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(params))


def test_unknown_config_key_fails_with_one_clear_line(tmp_path):
    result = run_main(tmp_path, "--config.train.bogus_key=1", check=False, timeout=120)
    assert result.returncode != 0
    assert "config.train has no field 'bogus_key'; its fields: async_checkpoints" in result.stderr
    assert "Traceback" not in result.stderr


def _smoke_config(**train):
    config = load_config("configs/quickstart.py:smoke")
    config.train.update(train)
    return config


@pytest.mark.parametrize(
    "change,message",
    [
        (lambda c: c.train.update(global_batch=30), "not divisible by the 8 devices"),
        (lambda c: c.data.update(dataset="no_such_dataset"), "no_such_dataset"),
    ],
)
def test_bad_input_is_reported_before_compiling(tmp_path, change, message):
    from bt_jax import pretrain

    config = _smoke_config()
    change(config)
    with pytest.raises(ValueError, match=message):
        pretrain.train_and_evaluate(config, str(tmp_path))


def test_unwritable_workdir(tmp_path):
    from bt_jax import pretrain

    blocker = tmp_path / "a_file"
    blocker.write_text("")
    with pytest.raises(ValueError, match="not writable"):
        pretrain.train_and_evaluate(_smoke_config(), str(blocker / "sub"))
