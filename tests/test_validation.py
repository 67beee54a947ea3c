"""Bad settings stop before anything runs, one line per field naming it and a value that
works; a checkpoint of another model or data stream is refused one line per field.

The failures issue 11 found, each reproduced: train.keep_checkpoints=0 ended "normally" with
no checkpoint at all, checkpoint_every_steps=0 and global_batch=0 in ZeroDivisionError
tracebacks (one after compiling), epochs<=0 reported warm-up steps, lr_weights=nan ran a
step and blamed "a learning rate too high". The job now raises before it opens the data,
takes the workdir or compiles: no XLA compile is recorded and the workdir is not created.
"""

import jax
import pytest
from e2e import ROOT, cpu_env

from bt_jax import checkpoint, defaults, pretrain

BAD = [
    ("train.keep_checkpoints", 0, "config.train.keep_checkpoints=0: must be >= 1, e.g. 3"),
    ("train.checkpoint_every_steps", 0, "config.train.checkpoint_every_steps=0: must be > 0"),
    ("train.global_batch", 0, "config.train.global_batch=0: must be > 0, e.g. 2048"),
    ("train.epochs", 0, "config.train.epochs=0: must be > 0, e.g. 1000"),
    ("train.epochs", -3, "config.train.epochs=-3: must be > 0"),
    ("train.log_every_steps", 0, "config.train.log_every_steps=0: must be > 0"),
    ("optim.lr_weights", float("nan"), "config.optim.lr_weights=nan: must be >= 0, e.g. 0.2"),
    ("optim.lr_biases", float("inf"), "config.optim.lr_biases=inf: must be >= 0"),
    ("optim.lr_weights", -0.1, "config.optim.lr_weights=-0.1: must be >= 0"),
    ("optim.lr_weights", 0.0, "config.optim.lr_weights=0.0: 0.0 takes the authors' rate for"),
    ("train.online_probe", "yes", "config.train.online_probe='yes': one of auto, on, off"),
    ("model.normalization", "cifar", "config.model.normalization='cifar': one of auto"),
    ("optim.weight_decay", -1e-6, "config.optim.weight_decay=-1e-06: must be >= 0"),
    ("optim.weight_decay", float("nan"), "config.optim.weight_decay=nan: must be >= 0"),
    ("optim.momentum", 1.0, "config.optim.momentum=1.0: must be in [0, 1), e.g. 0.9"),
    ("optim.warmup_epochs", 2, "config.optim.warmup_epochs=2: must be below train.epochs=2"),
    ("model.projector", "64-x", "config.model.projector='64-x': layer widths joined by '-'"),
    ("model.projector", "", "config.model.projector='': layer widths joined by '-'"),
    ("model.dtype", "float8", "config.model.dtype='float8': one of bfloat16, float32"),
    ("model.arch", "resnet51", "config.model.arch='resnet51': one of resnet18"),
    ("model.stage_sizes", (1, 0), "config.model.stage_sizes=(1, 0): () for the arch's own"),
    (
        "loss.strategy",
        "psum",
        "config.loss.strategy='psum': one of gram, gather, allreduce, jit, auto",
    ),
    ("augment.pixel_ops", "gpu", "config.augment.pixel_ops='gpu': 'host' or 'device'"),
    ("augment.view2.solarize_prob", 1.5, "config.augment.view2.solarize_prob=1.5: a prob"),
]


def _smoke(field=None, value=None):
    config = defaults.load_config("configs/quickstart.py:smoke")
    if field:
        *sections, key = field.split(".")
        node = config
        for part in sections:
            node = node[part]
        node[key] = value
    return config


@pytest.mark.parametrize("field, value, message", BAD, ids=[f"{f}={v}" for f, v, _ in BAD])
def test_bad_value_stops_the_job_before_it_compiles(field, value, message, tmp_path):
    compiles = []
    listener = lambda event, *_, **__: compiles.append(event)  # noqa: E731
    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        with pytest.raises(ValueError) as raised:
            pretrain.train_and_evaluate(_smoke(field, value), str(tmp_path / "w"))
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    (line,) = str(raised.value).splitlines()
    assert line.startswith(message)
    assert not [e for e in compiles if "compile" in e]
    assert not (tmp_path / "w").exists()


def test_every_bad_field_is_named_at_once():
    config = _smoke()
    config.train.update(keep_checkpoints=0, global_batch=0)
    config.optim.lr_weights = float("nan")
    with pytest.raises(ValueError) as raised:
        defaults.validate_pretrain_config(config)
    lines = str(raised.value).splitlines()
    assert [line.split("=")[0] for line in lines] == [
        "config.train.global_batch",
        "config.train.keep_checkpoints",
        "config.optim.lr_weights",
    ]


def test_every_shipped_pretraining_config_is_valid():
    for spec in ["configs/imagenet.py", "configs/cifar10.py", "configs/quickstart.py"]:
        defaults.validate_pretrain_config(defaults.load_config(spec))
    defaults.validate_pretrain_config(_smoke())


def test_the_command_line_gets_one_line_and_no_traceback(tmp_path):
    import subprocess
    import sys

    result = subprocess.run(
        [sys.executable, "-m", "bt_jax.main", "--config=configs/quickstart.py:smoke",
         f"--workdir={tmp_path}", "--config.train.keep_checkpoints=0"],
        cwd=ROOT, env=cpu_env(8), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        "bt_jax: error: config.train.keep_checkpoints=0: must be >= 1, e.g. 3"
    )


# ------------------------------------------------------------------ the resume check

RESUME = [
    ("model.arch", "resnet34", "resnet18"),
    ("model.width", 0.25, "0.125"),
    ("model.cifar_stem", False, "True"),
    ("model.stage_sizes", (1, 2), "'(1, 1)'"),
    ("model.projector", "64-32", "64-64"),
    ("seed", 1, "0"),
    ("data.dataset", "cifar10_jpeg", "cifar10_jpeg_mini"),
    ("data.train_split", "train[:50%]", "train"),
    ("data.num_streams", 2, "0"),
    ("data.cache", False, "True"),
    ("train.global_batch", 64, "32"),
]


@pytest.mark.parametrize("field, value, saved", RESUME, ids=[f for f, _, _ in RESUME])
def test_a_checkpoint_of_another_model_or_stream_is_refused_in_one_line(field, value, saved):
    """The record a checkpoint keeps (checkpoint.run_meta) against a changed config: one line
    naming the field, the saved value and the flag that resumes it. (Before: a changed
    cifar_stem gave ~700 lines, stage_sizes a tree diff, a changed seed went through.)"""
    meta = checkpoint.run_meta(
        _smoke(), 6, {"steps_per_epoch": 156}, streams=1, skipped_per_stream=[0]
    )
    with pytest.raises(ValueError) as raised:
        checkpoint.check_resumable(meta, _smoke(field, value), streams=1)
    (line,) = str(raised.value).splitlines()
    assert line.startswith(f"config.{field}=")
    assert f"were made with {saved}: resume with --config.{field}={saved}, or start" in line


def test_settings_that_may_change_on_resume_are_accepted():
    meta = checkpoint.run_meta(
        _smoke(), 6, {"steps_per_epoch": 156}, streams=1, skipped_per_stream=[0]
    )
    changed = _smoke()
    changed.model.dtype = "bfloat16"  # compute dtype: parameters stay float32
    changed.optim.lr_weights = 0.1
    changed.train.epochs = 10
    changed.data.data_dir = "/elsewhere"  # the same dataset from another folder
    checkpoint.check_resumable(meta, changed, streams=1)


def test_the_number_of_streams_actually_read_must_match():
    """num_streams=0 means one per process: resuming a 2-process run on 1 process would
    read another stream; the error says which value resumes it."""
    meta = checkpoint.run_meta(
        _smoke(), 6, {"steps_per_epoch": 156}, streams=2, skipped_per_stream=[0, 0]
    )
    with pytest.raises(ValueError, match="resume with --config.data.num_streams=2"):
        checkpoint.check_resumable(meta, _smoke(), streams=1)
