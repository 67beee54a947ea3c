"""The evaluation jobs end to end: kNN, linear (images and fast features), semi-supervised,
transfer; 1 process == 2 processes; bad input; export from a real checkpoint.

The backbone is the smoke model (configs/quickstart.py:smoke) at its initialisation, saved
as the pretraining job saves it: no train step to compile. Jobs run in this process (8 CPU
devices) except the multi-process and CLI checks. A persistent compilation cache is shared.
"""

import json
import os
import pickle

import jax
import numpy as np
import pytest
from e2e_eval import load_config, read_results, run_job, write_init_checkpoint

from bt_jax import export
from bt_jax.evaluation import job
from bt_jax.models import torchvision_layout

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("compilation_cache")]

MINI_TRAIN = "train[:512]"  # 4 linear steps per epoch at batch 128: protocol, not quality


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    return write_init_checkpoint(tmp_path_factory.mktemp("pretrain"))


def _config(spec, pretrained, **top):
    config = load_config(spec)
    config.pretrained_workdir = pretrained
    config.update(top)
    return config


def _run(config, workdir):
    from bt_jax import main

    return main.run(config, str(workdir))


def test_knn_one_process_equals_two_processes(pretrained, tmp_path):
    """Every query counted once on 2 processes x 4 devices: same accuracy as 1 x 8."""
    one = _run(_config("configs/knn.py:smoke", pretrained), tmp_path / "one")
    run_job(
        "knn.py:smoke",
        tmp_path / "two",
        f"--config.pretrained_workdir={pretrained}",
        processes=2,
        devices=4,
    )
    two = read_results(tmp_path / "two")
    assert two["processes"] == 2 and two["devices"] == 8
    assert one["knn_num_queries"] == two["results"]["knn_num_queries"] == 1000
    assert one["knn_top1"] == two["results"]["knn_top1"]
    assert one["knn_top5"] == two["results"]["knn_top5"]
    assert 0 < one["knn_top1"] < 100


def test_linear_eval_writes_protocol_named_results(pretrained, tmp_path):
    config = _config("configs/linear_eval.py:smoke", pretrained)
    config.data.train_split = MINI_TRAIN
    config.linear.epochs = 2
    config.log_every_steps = 1
    results = _run(config, tmp_path)
    for key in ("top1_last", "top5_last", "top1_best", "top5_best", "best_epoch"):
        assert f"linear_{key}" in results
    assert results["linear_num_examples"] == 1000 and results["linear_epochs"] == 2
    assert results["linear_top1_best"] >= results["linear_top1_last"]
    saved = read_results(tmp_path)
    assert saved["protocol"] == "linear" and saved["backbone"]["source"] == "pretrained"
    assert saved["results"] == pytest.approx(results)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    per_epoch = [r for r in rows if r["tag"] == "linear"]
    assert [r["linear_epoch"] for r in per_epoch] == [1, 2]
    lrs = [r["lr_head"] for r in rows if r["tag"] == "train"]
    # lr 0.3 x 128/256, cosine stepped per epoch: 0.15 in epoch 1, 0.075 in epoch 2
    assert lrs[0] == pytest.approx(0.15) and lrs[-1] == pytest.approx(0.075)


def test_fast_features_variant_is_labelled_and_refuses_to_overwrite(pretrained, tmp_path):
    config = _config("configs/linear_eval.py:smoke", pretrained, random_init=True)
    config.data.train_split = MINI_TRAIN
    config.linear.update(mode="fast_features", epochs=2)
    results = _run(config, tmp_path)
    assert all(k.startswith("linear_fast_features_") for k in results)
    assert read_results(tmp_path)["backbone"]["source"] == "random_init"
    with pytest.raises(ValueError, match="already holds results.json, metrics.jsonl"):
        _run(config, tmp_path)
    assert read_results(tmp_path)["results"] == pytest.approx(results)  # untouched
    config.overwrite = True
    job.prepare_workdir(str(tmp_path), config)  # what a job does first
    assert not (tmp_path / "results.json").exists()
    assert not (tmp_path / "metrics.jsonl").exists()


def test_semi_supervised_on_a_stratified_fraction(pretrained, tmp_path):
    config = _config("configs/semi_supervised.py:smoke", pretrained)
    config.finetune.fraction = 0.05
    results = _run(config, tmp_path)
    assert results["semi_supervised_5pct_num_examples"] == 1000
    subset_dir = tmp_path / "subsets" / "cifar10_jpeg_mini_train_5pct_seed0"
    subset = json.loads((subset_dir / "subset.json").read_text())
    assert subset["examples"] == 250 and subset["per_class"] == [25] * 10
    assert read_results(tmp_path)["train_examples"] == 250


def test_transfer_linear_and_finetune(pretrained, tmp_path):
    config = _config("configs/transfer_caltech101.py", pretrained)
    config.data = load_config("configs/knn.py:smoke").data  # the embedded set stands in
    config.data.train_split = MINI_TRAIN
    config.transfer.update(image_size=16, eval_batch=128)
    config.transfer.linear.update(l2_grid=(1e-2, 1e-4), max_iter=10)
    config.finetune.update(image_size=16, epochs=1, global_batch=128, eval_batch=128)
    results = _run(config, tmp_path)
    assert results["transfer_linear_l2"] in (1e-2, 1e-4)
    assert results["transfer_linear_num_examples"] == 1000
    assert results["transfer_linear_metric"] == results["transfer_linear_mean_per_class"]
    assert "transfer_finetune_top1_last" in results


@pytest.mark.shared_data
def test_transfer_to_caltech101(pretrained, tmp_path, shared_tfds_dir):
    config = _config("configs/transfer_caltech101.py", pretrained)
    config.data.data_dir = shared_tfds_dir
    config.transfer.update(protocols=("linear",), image_size=16)
    config.transfer.linear.update(l2_grid=(1e-3,), max_iter=20)
    results = _run(config, tmp_path)
    assert results["transfer_linear_num_examples"] == 2893


# ---------------------------------------------------------------------------------------
# Bad input: clear errors, nothing overwritten.


def test_missing_checkpoint(tmp_path):
    config = _config("configs/knn.py:smoke", str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match="no checkpoints in"):
        _run(config, tmp_path / "eval")


def test_checkpoint_of_another_architecture(pretrained, tmp_path):
    config = _config("configs/knn.py:smoke", pretrained, expected_arch="resnet50")
    with pytest.raises(ValueError, match="is a resnet18 .* expects resnet50"):
        _run(config, tmp_path / "a")
    # A checkpoint whose parameters do not fit the model its config describes.
    odd = write_init_checkpoint(tmp_path / "odd", width=0.25)
    meta_path = next((tmp_path / "odd" / "checkpoints").glob("*/meta/metadata"))
    meta = json.loads(meta_path.read_text())
    meta["config"]["model"]["width"] = 0.125
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="does not match the architecture"):
        _run(_config("configs/knn.py:smoke", odd), tmp_path / "b")


def test_dataset_without_labels(pretrained, tmp_path):
    from test_pipeline import _encoded, _write_tfds

    _write_tfds(
        str(tmp_path),
        "unlabelled",
        {"train": [(_encoded("rgb"), 0)] * 4, "test": [(_encoded("rgb"), 0)] * 2},
        with_label=False,
    )
    config = _config("configs/knn.py:smoke", pretrained)
    config.data.update(dataset="unlabelled", data_dir=str(tmp_path))
    with pytest.raises(ValueError, match="has no ClassLabel feature 'label'"):
        _run(config, tmp_path / "eval")


def test_eval_workdir_must_not_be_the_pretraining_one(pretrained):
    with pytest.raises(ValueError, match="pretraining run's workdir"):
        _run(_config("configs/knn.py:smoke", pretrained), pretrained)


def test_no_backbone_source(tmp_path):
    with pytest.raises(ValueError, match="set exactly one of --config.pretrained_workdir"):
        _run(load_config("configs/linear_eval.py:smoke"), tmp_path)
    assert not os.listdir(tmp_path)  # refused before anything was written


# ---------------------------------------------------------------------------------------
# Export from a real checkpoint, through the CLI.


def test_export_cli_from_a_checkpoint(pretrained, tmp_path):
    from safetensors.numpy import load_file

    from bt_jax.checkpoint import restore_model_variables

    out = str(tmp_path / "backbone")
    weights = os.path.join(out, "model.safetensors")
    assert export.main(["--workdir", pretrained, "--format", "torchvision", "--out", out]) == 0
    tensors = load_file(weights)
    variables, _, _ = restore_model_variables(pretrained)
    back = torchvision_layout.backbone_from_torchvision(tensors, variables["params"]["backbone"])
    diffs = jax.tree.map(
        lambda a, b: float(np.max(np.abs(np.asarray(a) - b))),
        back,
        {
            "params": variables["params"]["backbone"],
            "batch_stats": variables["batch_stats"]["backbone"],
        },
    )
    assert max(jax.tree.leaves(diffs)) == 0.0
    assert not any(k.startswith("fc.") for k in tensors)

    before = os.path.getmtime(weights)
    assert export.main(["--workdir", pretrained, "--format", "torchvision", "--out", out]) == 1
    assert os.path.getmtime(weights) == before  # refused: not overwritten
    args = ["--workdir", pretrained, "--format", "detectron2", "--out", out, "--overwrite"]
    assert export.main(args) == 0
    assert sorted(os.listdir(out)) == ["README.md", "model_d2.pkl"]  # no stale weights left
    with open(os.path.join(out, "model_d2.pkl"), "rb") as f:
        d2 = pickle.load(f)
    assert "stem.conv1.weight" in d2["model"] and "res2.0.conv1.weight" in d2["model"]


def test_export_cli_as_a_process(pretrained, tmp_path):
    import subprocess
    import sys

    from e2e import ROOT, cpu_env

    out = tmp_path / "b"
    out.mkdir()
    (out / "model.safetensors").write_text("keep me")
    cmd = [
        sys.executable,
        "-m",
        "bt_jax.export",
        "--workdir",
        pretrained,
        "--format",
        "torchvision",
        "--out",
        str(out),
    ]
    result = subprocess.run(cmd, cwd=ROOT, env=cpu_env(1), capture_output=True, text=True)
    assert result.returncode == 1 and "exists and is not empty; pass --overwrite" in result.stderr
    assert (out / "model.safetensors").read_text() == "keep me"
