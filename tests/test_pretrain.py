"""The pretraining job end to end, as real processes: devices, hosts, resume, failures.

All runs use configs/quickstart.py:smoke on the embedded dataset with the train split cut
into 2 streams (data.num_streams=2), so 1 process and 2 processes read the same global
batches. The reference run, and the runs that must equal it bit for bit, shard the
projector over a model axis of 2 (MODEL_2: a 4 x 2 mesh, the gram loss); the others run
data-parallel, so checkpoints cross between the two layouts.

A persistent compilation cache shared by the runs keeps the suite fast; it does
not change what is computed (the cached executable is the one that would be compiled).
"""

import os
import pathlib
import re
import shutil
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
    truncate_an_array_file,
)

from bt_jax.defaults import load_config
from bt_jax.distributed import LOCK_NAME

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("compilation_cache")]

STEPS = 12
COMMON = (
    "--config.data.num_streams=2",
    "--config.train.checkpoint_every_steps=3",
    "--config.train.keep_checkpoints=20",
)
MODEL_2 = ("--config.mesh.model=2", "--config.loss.strategy=gram")


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted 12-step run on 1 process x 8 devices, a 4 x 2 data x model mesh (the
    kNN monitor at the end runs data-parallel over the 8 devices)."""
    workdir = tmp_path_factory.mktemp("reference")
    result = run_main(
        workdir,
        *COMMON,
        *MODEL_2,
        f"--config.train.stop_after_steps={STEPS}",
        "--config.knn.at_end=True",
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
        "c_diag_mean",
        "c_offdiag_rms",
        "grad_norm_weights",
        "grad_norm_biases",
        "trust_ratio_mean",
        "online_linear_loss",  # the embedded set has labels: the probe is on ("auto")
    ):
        assert all(np.isfinite(r[key]) for r in rows), key
    assert all(-1 <= r["c_diag_mean"] <= 1 and 0 <= r["c_offdiag_rms"] <= 1 for r in rows)
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
    assert 0 <= knn_rows[0]["online_linear_top1"] <= knn_rows[0]["online_linear_top5"] <= 100
    assert 1 <= knn_rows[0]["rankme"] <= 16  # the smoke backbone's 16 features
    knn_line = next(ln for ln in result.stdout.splitlines() if "kNN (k=200" in ln)
    assert "kNN (k=200, backbone features, cifar10_jpeg_mini)" in knn_line
    assert "| online linear probe top-1 " in knn_line and "| RankMe " in knn_line
    assert "inputs normalised with cifar10 statistics" in result.stdout
    assert all(r["skipped_images"] == 0 for r in rows)  # the embedded set decodes cleanly
    assert "undecodable images skipped: 0 in steps 1-12" in result.stdout.splitlines()[-1]
    _, meta, step = final_params(workdir)
    assert step == STEPS and meta["data"]["next_step"] == STEPS
    assert meta["config"]["model"]["projector"] == "64-64"
    assert meta["config"]["mesh"]["model"] == 2


def test_knn_job_reads_the_model_sharded_run_and_equals_its_monitor(reference, tmp_path):
    """The reference run's projector is sharded over model = 2; the kNN job
    (configs/knn.py:smoke: the smoke pretraining config's kNN fields and data) restores its
    last checkpoint and gives the numbers the run's own monitor logged at its end."""
    from bt_jax import knn_eval

    workdir, _ = reference
    config = load_config("configs/knn.py:smoke")
    config.pretrained_workdir = str(workdir)
    job = knn_eval.run(config, str(tmp_path / "knn"))
    (monitor,) = read_metrics(workdir, "knn")
    assert (job["knn_top1"], job["knn_top5"]) == (monitor["knn_top1"], monitor["knn_top5"])


def test_one_device_gives_the_eight_device_loss_curve(reference, tmp_path):
    """1 device, data-parallel and the C-form loss (the smoke config's gather), against
    8 devices with the projector sharded over 2 and the gram loss."""
    workdir, _ = reference
    run_main(tmp_path, *COMMON, "--config.train.stop_after_steps=5", devices=1)
    one = [r["loss"] for r in read_metrics(tmp_path)]
    eight = [r["loss"] for r in read_metrics(workdir)][:5]
    assert len(one) == 5
    np.testing.assert_allclose(one, eight, rtol=1e-5)


def test_two_processes_equal_one_process_and_agree_on_a_fallback(reference, tmp_path):
    """2 processes x 4 devices with model = 2 compute the 1 x 8 run; after a damaged latest
    checkpoint both resume from the previous one, and process 0 alone moves the damaged one
    aside, once. The resumed run is data-parallel: the model = 2 checkpoint of step 3
    restores onto the 8 x 1 mesh (and reaches the model = 2 reference)."""
    workdir, _ = reference
    result = run_multiprocess(tmp_path, *COMMON, *MODEL_2, "--config.train.stop_after_steps=6")
    assert "[p0]" in result.stdout and "2 process(es), 8 devices" in result.stdout
    ours, _, step = final_params(tmp_path)
    ref, _, _ = final_params(workdir, step=6)
    assert step == 6
    assert max_abs_diff(ours, ref) <= 1e-5
    probe_losses = [
        [r["online_linear_loss"] for r in read_metrics(w)][:6] for w in (tmp_path, workdir)
    ]
    np.testing.assert_allclose(*probe_losses, rtol=1e-4)  # the probe trains alike on 2 hosts

    truncate_an_array_file(tmp_path / "checkpoints" / "6")
    result = run_multiprocess(tmp_path, *COMMON, "--config.train.stop_after_steps=9")
    moved = [ln for ln in result.stdout.splitlines() if "checkpoint 6 cannot be read" in ln]
    assert len(moved) == 1 and moved[0].startswith("[p0] [pretrain] checkpoint 6 cannot")
    assert len(os.listdir(tmp_path / "checkpoints_unreadable")) == 1
    assert "resuming at step 3" in result.stdout
    ours, _, step = final_params(tmp_path)
    assert step == 9
    assert max_abs_diff(ours, final_params(workdir, step=9)[0]) <= 1e-5


def test_a_damaged_latest_checkpoint_resumes_from_the_previous_one_bit_for_bit(reference, tmp_path):
    """Step 12's arrays truncated and step 9's meta item lost: the rerun says so, moves both
    aside, resumes from step 6 and reaches the uninterrupted run's parameters exactly."""
    workdir, _ = reference
    expected, _, _ = final_params(workdir, step=STEPS)
    shutil.copytree(workdir, tmp_path, dirs_exist_ok=True)
    truncate_an_array_file(tmp_path / "checkpoints" / "12")
    shutil.rmtree(tmp_path / "checkpoints" / "9" / "meta")
    result = run_main(tmp_path, *COMMON, *MODEL_2, f"--config.train.stop_after_steps={STEPS}")
    lines = result.stdout.splitlines()
    assert [ln.split(":")[0] for ln in lines if "cannot be read" in ln] == [
        "[pretrain] checkpoint 12 cannot be read",
        "[pretrain] checkpoint 9 cannot be read",
    ]
    assert "resuming at step 6" in result.stdout
    assert sorted(n.split("-")[0] for n in os.listdir(tmp_path / "checkpoints_unreadable")) == [
        "12",
        "9",
    ]
    ours, _, step = final_params(tmp_path)
    assert step == STEPS
    assert max_abs_diff(ours, expected) == 0.0


def test_resuming_with_another_model_is_one_line_per_field(reference, tmp_path):
    """cifar_stem used to give ~700 lines and orbax's advice, stage_sizes a tree diff."""
    workdir, _ = reference
    shutil.copytree(workdir, tmp_path, dirs_exist_ok=True)
    result = run_main(
        tmp_path,
        *COMMON,
        "--config.model.cifar_stem=False",
        "--config.model.stage_sizes=(1, 2)",
        check=False,
    )
    assert result.returncode == 1 and "Traceback" not in result.stderr
    errors = [ln for ln in result.stderr.splitlines() if ln.startswith("bt_jax: error")]
    assert errors == [
        "bt_jax: error: config.model.cifar_stem=False but the workdir's checkpoints were made "
        "with True: resume with --config.model.cifar_stem=True, or start a new run in a fresh "
        "--workdir",
        "bt_jax: error: config.model.stage_sizes='(1, 2)' but the workdir's checkpoints were "
        "made with '(1, 1)': resume with --config.model.stage_sizes='(1, 1)', or start a new "
        "run in a fresh --workdir",
    ]
    assert not os.path.exists(tmp_path / "checkpoints_unreadable")


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
    the exact float32 state. All three runs shard the projector over model = 2, as the
    reference: the sharded arrays are saved and restored exactly."""
    workdir, _ = reference
    slow = (
        *MODEL_2,
        f"--config.train.stop_after_steps={STEPS}",
        "--config.train.debug_step_delay_s=0.3",
    )
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
    # Checkpoints are written asynchronously: the newest one may not be committed when
    # SIGKILL lands, and then the run resumes from the one before (never from a torn one).
    resumed = re.search(r"resuming at step (\d+)", out)
    resumed_at = int(resumed.group(1)) if resumed else 0
    assert resumed_at in (resumed_from, max(resumed_from - 3, 0)), out
    _, _, preempted_at = final_params(tmp_path)
    assert preempted_at < STEPS

    assert not (tmp_path / LOCK_NAME).exists()  # released on SIGTERM (and SIGKILL: stale)
    run_main(tmp_path, *COMMON, *MODEL_2, f"--config.train.stop_after_steps={STEPS}")
    ours, _, step = final_params(tmp_path)
    assert step == STEPS
    steps_logged = [r["step"] for r in read_metrics(tmp_path)]
    assert steps_logged == list(range(1, STEPS + 1))  # redone steps replace their rows
    diff = max_abs_diff(ours, final_params(workdir)[0])
    assert diff == 0.0, f"killed after {killed_after}, preempted at {preempted_at}: {diff}"


def test_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path):
    """Steps count from 1 in every message: the NaN of step 4 comes right after the progress
    line of step 3 (the message used to call it step 3; see test_checkpoint.py for the
    message without any checkpoint, which used to say "(step None)")."""
    result = run_main(
        tmp_path,
        *COMMON,
        f"--config.train.stop_after_steps={STEPS}",
        "--config.train.debug_nan_at_step=4",
        check=False,
    )
    assert result.returncode != 0
    assert "loss became non-finite at step 4; stopping" in result.stderr
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2, 3]
    assert f"[pretrain] step 3/{STEPS}" in result.stdout
    assert not (tmp_path / LOCK_NAME).exists()  # released on an error
    assert "The last good checkpoint, step 3, is in" in result.stderr
    params, _, step = final_params(tmp_path)
    assert step == 3  # checkpoints every 3 steps; the poisoned state never reaches disk
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(params))


def test_sigterm_before_the_first_step_exits_0_with_nothing_to_save(tmp_path):
    proc = _start(tmp_path, f"--config.train.stop_after_steps={STEPS}")
    deadline = time.time() + 300
    while not (tmp_path / LOCK_NAME).exists():  # the job's handler is installed before it
        assert proc.poll() is None and time.time() < deadline, proc.communicate()
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    assert "preemption signal before the first step: nothing new to save" in out
    assert not os.listdir(tmp_path / "checkpoints")
    assert not (tmp_path / LOCK_NAME).exists()


def test_unknown_config_key_fails_with_one_clear_line(tmp_path):
    result = run_main(tmp_path, "--config.train.bogus_key=1", check=False, timeout=120)
    assert result.returncode != 0
    assert "config.train has no field 'bogus_key'; its fields: async_checkpoints" in result.stderr
    assert "Traceback" not in result.stderr


def _smoke_config(**train):
    config = load_config("configs/quickstart.py:smoke")
    config.train.update(train)
    return config


def _model_axis(model, **fields):
    def change(config):
        config.mesh.model = model
        config.loss.strategy = "auto"
        config.update_from_flattened_dict(fields)

    return change


BAD_INPUT = {
    "batch not divisible by the devices": (
        lambda c: c.train.update(global_batch=30),
        "the global batch size 30 is not divisible by the 8 devices",
    ),
    "batch not divisible by the data x model devices": (
        _model_axis(2, **{"train.global_batch": 20}),
        "the global batch size 20 is not divisible by the 8 devices",
    ),
    "model not dividing the devices": (
        _model_axis(3, **{"model.projector": "66-66"}),
        "config.mesh.model=3 must divide the 8 devices into a data x model mesh; use one of "
        "1, 2, 4, 8",
    ),
    "model larger than the devices": (_model_axis(16), "config.mesh.model=16 must divide"),
    "a width not divisible by model": (
        _model_axis(8, **{"model.projector": "64-60"}),
        "config.model.projector='64-60': every width must be divisible by mesh.model=8, "
        "which splits each layer's features, e.g. 64-64",
    ),
    "D not divisible by every device (gram)": (
        _model_axis(2, **{"model.projector": "64-36"}),
        "no loss strategy splits D=36 features over the 4 x 2 devices of the data x model "
        "mesh; use D divisible by 8",
    ),
    "a C form with a model axis": (
        _model_axis(2, **{"loss.strategy": "gather"}),
        "config.loss.strategy='gather': with mesh.model=2 the features are sharded",
    ),
    "no dataset": (lambda c: c.data.update(dataset="no_such_dataset"), "no_such_dataset"),
}


@pytest.mark.parametrize("case", list(BAD_INPUT))
def test_bad_input_is_reported_before_compiling(tmp_path, case):
    from bt_jax import pretrain

    change, message = BAD_INPUT[case]
    config = _smoke_config()
    change(config)
    compiles = []
    listener = lambda event, *_, **__: compiles.append(event)  # noqa: E731
    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        with pytest.raises(ValueError) as raised:
            pretrain.train_and_evaluate(config, str(tmp_path))
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    assert message in str(raised.value)
    assert len(str(raised.value).splitlines()) == 1
    assert not [e for e in compiles if "compile" in e]


def test_unwritable_workdir(tmp_path):
    from bt_jax import pretrain

    blocker = tmp_path / "a_file"
    blocker.write_text("")
    with pytest.raises(ValueError, match="not writable"):
        pretrain.train_and_evaluate(_smoke_config(), str(blocker / "sub"))


@pytest.fixture(scope="module")
def mixed_images_dir(tmp_path_factory):
    """A TFDS set of 32 training records, 8 of them undecodable (garbage, truncated JPEG)."""
    from test_pipeline import _encoded, _write_tfds

    good = ["rgb", "gray", "cmyk", "png", "tiny", "rgb"] * 4
    bad = ["garbage", "truncated"] * 4
    examples = [(_encoded(kind), 0) for kind in good + bad]
    root = str(tmp_path_factory.mktemp("tfds"))
    _write_tfds(root, "mixed", {"train": examples, "test": examples[:8]})
    return root


def test_skipped_images_are_counted_in_metrics_and_at_the_end(mixed_images_dir, tmp_path):
    """Batches of 8 over epochs of all 32 records (24 decodable): 6 steps use the decodable
    images of exactly 2 epochs, so between 8 (epoch 0's) and 16 undecodable ones were
    skipped. The count survives a resume: 3 steps + 3 resumed steps count what 6 do."""
    data = (
        "--config.data.dataset=mixed",
        f"--config.data.data_dir={mixed_images_dir}",
        "--config.data.num_streams=1",
        "--config.train.global_batch=8",
        "--config.train.checkpoint_every_steps=3",
    )
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    result = run_main(whole, *data, "--config.train.stop_after_steps=6")
    run_main(resumed, *data, "--config.train.stop_after_steps=3")
    again = run_main(resumed, *data, "--config.train.stop_after_steps=6")
    totals = [r["skipped_images"] for r in read_metrics(whole)]
    assert 8 <= totals[-1] <= 16 and totals == sorted(totals)
    assert [r["skipped_images"] for r in read_metrics(resumed)] == totals
    for out in (result.stdout, again.stdout):
        last = out.splitlines()[-1]
        assert last.startswith("[pretrain] done at step 6") and last.endswith(
            f"undecodable images skipped: {int(totals[-1])} in steps 1-6"
        )
    assert f"{int(totals[-1])} undecodable images skipped" in result.stdout  # progress lines
    # the resumed streams restart at their exact records (checkpoints keep the per-stream
    # counts that shift them), so even on corrupt data the resume is bit for bit
    assert max_abs_diff(final_params(resumed)[0], final_params(whole)[0]) == 0.0
