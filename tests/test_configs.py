"""The shipped configs against DESIGN.md section 1, value by value."""

import glob
import os
import pathlib

import numpy as np
import pytest
from commands import build_config, collect, kind, main_invocations

from bt_jax import defaults
from bt_jax.data import source
from bt_jax.data.config import EMBEDDED_DATA_DIR

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_config(name):
    return defaults.load_config(f"configs/{name}.py")


def test_imagenet_recipe():
    c = load_config("imagenet")
    assert c.job == "pretrain"
    # Model
    assert (c.model.arch, c.model.width, c.model.cifar_stem) == ("resnet50", 1.0, False)
    assert tuple(c.model.stage_sizes) == ()
    assert c.model.projector == "8192-8192-8192"
    # Loss
    assert c.loss.lambd == 0.0051 and c.loss.scale == 1.0
    # Optimizer and schedule
    o = c.optim
    assert (o.name, o.lr_weights, o.lr_biases) == ("lars", 0.0, 0.0)  # from the table:
    resolved = defaults.resolve_pretrain_config(c).optim
    assert (resolved.lr_weights, resolved.lr_biases) == (0.2, 0.0048)  # the paper's at 2048
    assert (o.weight_decay, o.momentum, o.eta) == (1.5e-6, 0.9, 1e-3)
    assert (o.warmup_epochs, o.end_factor, o.clip_lr) == (10, 0.001, False)
    assert o.reference_world_size == 32  # the paper's 32 GPUs
    assert (
        defaults.load_config("configs/imagenet.py:paper").to_dict() == c.to_dict()
    )  # the default, named
    readme = defaults.load_config(
        "configs/imagenet.py:readme"
    ).optim  # the official README checkpoint's run
    assert (readme.weight_decay, readme.reference_world_size) == (1e-6, 16)
    assert (c.train.global_batch, c.train.epochs) == (2048, 1000)
    # Data and augmentations (BYOL parameters)
    assert c.data.dataset == "imagenet2012"
    assert c.augment.pixel_ops == "device"  # colour ops on the accelerators
    assert (c.data.train_split, c.data.eval_split) == ("train", "validation")
    for view, blur, solarize in [(c.augment.view1, 1.0, 0.0), (c.augment.view2, 0.1, 0.2)]:
        assert view.image_size == 224
        assert tuple(view.crop_area) == (0.08, 1.0)
        assert tuple(view.crop_aspect) == pytest.approx((3 / 4, 4 / 3))
        assert view.resize_method == "bicubic"
        assert view.flip_prob == 0.5
        assert view.jitter_prob == 0.8
        assert (view.brightness, view.contrast, view.saturation, view.hue) == (0.4, 0.4, 0.2, 0.1)
        assert view.grayscale_prob == 0.2
        assert view.blur_prob == blur
        assert tuple(view.blur_sigma) == (0.1, 2.0)
        assert view.blur_kernel_size == 23
        assert view.solarize_prob == solarize
    # kNN monitor protocol
    assert (c.knn.k, c.knn.temperature) == (200, 0.1)


# facebookresearch/barlowtwins issue #7 (300 epochs): batch -> March-2021 --learning-rate,
# a single rate for every parameter with --scale-loss 0.024.
AUTHORS_TABLE = {128: 0.7, 256: 0.4, 512: 0.3, 1024: 0.25, 2048: 0.2, 4096: 0.2}


@pytest.mark.parametrize("batch", sorted(AUTHORS_TABLE))
def test_imagenet_config_reads_the_authors_rate_for_its_batch(batch):
    """Through the config as a run gets it (flags, then the job's resolution): today's two
    rates are the March rate for the weights (LARS cancels the loss scale) and the March
    rate x 0.024 for biases and BN (no trust ratio: the scale moves into the rate)."""
    args = ["--config=configs/imagenet.py", f"--config.train.global_batch={batch}"]
    config = defaults.resolve_pretrain_config(build_config(args))
    lr = AUTHORS_TABLE[batch]
    assert config.optim.lr_weights == lr
    assert config.optim.lr_biases == pytest.approx(0.024 * lr, rel=1e-12)
    recipe = defaults.batch_size_recipe(batch)
    assert recipe["source"] == "measured" and recipe["top1"] is not None
    assert recipe["equivalent_weight_decay"] == pytest.approx(1e-6 / 0.024)


def test_the_table_between_and_beyond_its_batches_and_a_given_rate():
    # 768 = 2^9.585: log-linear between 512 (0.3) and 1024 (0.25), by hand
    between = defaults.batch_size_recipe(768)
    assert between["lr_weights"] == pytest.approx(0.3 - 0.05 * (np.log2(768) - 9))
    assert between["source"] == "interpolated" and between["top1"] is None
    assert defaults.batch_size_recipe(8192)["lr_weights"] == 0.2  # 2048 and 4096 agree
    assert defaults.batch_size_recipe(64)["lr_weights"] == 1.0  # the authors' suggestion
    assert defaults.batch_size_recipe(64)["source"] == "extrapolated"
    with pytest.raises(ValueError, match="table starts at 64"):
        defaults.batch_size_recipe(32)
    given = ["--config=configs/imagenet.py", "--config.optim.lr_weights=0.3"]
    config = defaults.resolve_pretrain_config(build_config(given))
    assert (config.optim.lr_weights, config.optim.lr_biases) == (0.3, pytest.approx(0.0072))


def test_imagenet_wide_is_the_recipe_with_a_sharded_wider_projector():
    """configs/imagenet.py:wide changes the projector and the model axis, nothing else, and
    its layouts (v4-128: 8 x 8, 32 x A100: 4 x 8) split the batch, every width and D."""
    from bt_jax.losses import choose_strategy
    from bt_jax.models import parse_projector

    base, wide = load_config("imagenet").to_dict(), defaults.load_config("configs/imagenet.py:wide")
    assert (wide.model.projector, wide.mesh.model) == ("8192-8192-65536", 8)
    changed = wide.to_dict()
    changed["model"]["projector"], changed["mesh"]["model"] = "8192-8192-8192", 1
    assert changed == base
    defaults.validate_pretrain_config(wide)
    widths = parse_projector(wide.model.projector)
    for chips in (64, 32):
        data = chips // wide.mesh.model
        assert wide.train.global_batch % chips == 0
        assert all(w % wide.mesh.model == 0 for w in widths) and widths[-1] % chips == 0
        assert choose_strategy(wide.train.global_batch, widths[-1], data, 8) == "gram"


def test_cifar10_recipe():
    c = load_config("cifar10")
    assert (c.model.arch, c.model.cifar_stem, c.model.projector) == (
        "resnet18",
        True,
        "2048-2048-2048",
    )
    o = c.optim
    assert (o.lr_weights, o.lr_biases, o.weight_decay, o.eta, o.clip_lr) == (
        0.3,
        0.3,
        1e-4,
        0.02,
        True,
    )
    assert (c.loss.lambd, c.loss.scale) == (0.0051, 0.1)
    assert c.train.global_batch == 256 and c.train.epochs == 1000
    assert c.data.dataset == "cifar10"
    for view in (c.augment.view1, c.augment.view2):
        assert view.image_size == 32 and view.blur_prob == 0.0
    assert c.augment.view2.solarize_prob == 0.2


@pytest.mark.parametrize("name", ["imagenet", "cifar10", "quickstart"])
def test_docstring_gives_command_and_expected_result(name):
    path = os.path.join(ROOT, "configs", f"{name}.py")
    doc = pathlib.Path(path).read_text()
    assert f"python -m bt_jax.main --config=configs/{name}.py" in doc
    assert "Expected" in doc


def _documented_config_specs():
    """Every configs/*.py, and every file:variant a documented command uses."""
    specs = {
        f"configs/{os.path.basename(p)}" for p in glob.glob(os.path.join(ROOT, "configs/*.py"))
    }
    for command in collect():
        for args in main_invocations(command.words) if kind(command) != "template" else []:
            specs.update(a.split("=", 1)[1] for a in args if a.startswith("--config="))
    return sorted(specs)


def _leaves(tree, prefix=""):
    for key, value in tree.items():
        if isinstance(value, dict):
            yield from _leaves(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def _as_flag(value) -> str:
    return repr(tuple(value)) if isinstance(value, (tuple, list)) else str(value)


@pytest.mark.parametrize("spec", _documented_config_specs())
def test_every_field_is_overridable_with_its_own_type(spec):
    """ml_collections refuses to override a field whose default is None (data.data_dir was
    one: every offline command failed at flag parsing). Here every leaf of the config is
    overridden with its own value by the real flag parser, and comes back equal."""
    config = build_config([f"--config={spec}"])
    leaves = dict(_leaves(config.to_dict()))
    assert not [k for k, v in leaves.items() if v is None], "None defaults cannot be overridden"
    overrides = [f"--config.{key}={_as_flag(value)}" for key, value in leaves.items()]
    again = build_config([f"--config={spec}", *overrides])
    assert again.to_dict() == config.to_dict()


def test_data_dir_from_the_command_line_reaches_tfds(tmp_path):
    config = build_config(["--config=configs/cifar10.py", f"--config.data.data_dir={tmp_path}"])
    assert config.data.data_dir == str(tmp_path)
    assert source.resolve_data_dir("cifar10", config.data.data_dir) == str(tmp_path)
    assert source.resolve_data_dir("cifar10", "") is None  # TFDS's default folder
    assert source.resolve_data_dir("cifar10_jpeg_mini", "") == EMBEDDED_DATA_DIR
