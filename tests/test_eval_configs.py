"""The evaluation configs against the official protocols, and their docstrings."""

import os
import pathlib

import pytest
from test_configs import ROOT, load_config

from bt_jax import defaults

EVAL_CONFIGS = [
    "knn",
    "linear_eval",
    "semi_supervised",
    "transfer_caltech101",
    "transfer_places365",
    "transfer_voc2007",
    "transfer_inat2018",
]


@pytest.mark.parametrize("name", EVAL_CONFIGS)
def test_docstring_gives_command_and_expected_result(name):
    doc = pathlib.Path(os.path.join(ROOT, "configs", f"{name}.py")).read_text()
    assert f"python -m bt_jax.main --config=configs/{name}.py" in doc
    assert "Expected" in doc
    c = load_config(name)
    assert c.pretrained_workdir == "" and c.pretrained_step == -1 and not c.random_init
    assert c.pretrained_torchvision == "" and c.backbone_dtype == ""
    assert not c.overwrite


def test_linear_protocol():
    c = load_config("linear_eval")
    assert c.job == "linear_eval" and c.linear.mode == "images"
    lin = c.linear
    assert (lin.epochs, lin.global_batch, lin.lr, lin.momentum) == (100, 256, 0.3, 0.9)
    assert (lin.weight_decay, lin.image_size) == (1e-6, 224)
    assert c.data.dataset == "imagenet2012" and c.data.eval_split == "validation"
    assert c.data.eval_crop_fraction == 0.875  # resize 256, center crop 224
    assert tuple(c.data.linear_crop_area) == (0.08, 1.0)


def test_semi_supervised_protocol():
    c = load_config("semi_supervised")
    f = c.finetune
    assert c.data.dataset == "imagenet2012_subset/1pct" and f.fraction == 0.0
    assert (f.lr_backbone, f.lr_head, f.weight_decay, f.epochs) == (0.005, 0.5, 0.0, 20)
    assert (f.global_batch, f.momentum) == (256, 0.9)


def test_knn_and_transfer_protocols():
    k = load_config("knn").knn
    assert (k.k, k.temperature) == (200, 0.1)
    assert load_config("transfer_caltech101").transfer.metric == "mean_per_class"
    voc = load_config("transfer_voc2007")
    assert tuple(voc.transfer.protocols) == ("svm",) and voc.data.dataset == "voc/2007"
    assert voc.data.train_split == "train+validation" and voc.data.eval_split == "test"
    for name in ("transfer_places365", "transfer_inat2018"):
        assert load_config(name).expected_arch == "resnet50"


@pytest.mark.parametrize(
    "name, variants",
    [
        ("imagenet", ("paper", "readme", "wide")),
        ("cifar10", ()),
        ("quickstart", ("smoke",)),
        ("knn", ("quickstart", "smoke")),
        ("linear_eval", ("quickstart", "smoke")),
        ("semi_supervised", ("1pct", "10pct", "quickstart", "smoke")),
        ("transfer_caltech101", ("quickstart",)),
        ("transfer_voc2007", ()),
    ],
)
def test_every_variant_loads_and_a_misspelt_one_names_them(name, variants):
    for variant in variants:
        assert defaults.load_config(f"configs/{name}.py:{variant}").job
    listed = ", ".join(variants) if variants else "it has none"
    with pytest.raises(
        ValueError, match=f"unknown variant 'bogus' of configs/{name}.py; .*{listed}"
    ):
        defaults.load_config(f"configs/{name}.py:bogus")
