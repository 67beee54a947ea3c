r"""Quickstart: Barlow Twins end to end in minutes on a laptop CPU, on the embedded dataset.

A ResNet-18 at 1/8 width with the CIFAR stem, projector 512-512-512, trained for 8
epochs on cifar10_jpeg_mini (5,000 CIFAR-10 training images shipped inside the package,
no download), then kNN-evaluated (k=200) on its 1,000 test images. Everything else is
configs/cifar10.py's recipe (solo-learn's LARS settings, which learn much faster than the
ImageNet ones at this scale), which this file derives from.

Command (from the repository root):

  python -m bt_jax.main --config=configs/quickstart.py --workdir=/tmp/bt_quickstart

Expected (measured 2026-12-02, 2 CPU cores, 1 device): 312 steps, 95-112 s as a whole
process (three runs on a shared 2-core VM; docs/benchmarks.md, Train step);
the loss falls from ~287 at step 20 to ~195-200; the last kNN line reports kNN top-1
28.6-28.8 % (top-5 81.8-82.4 %), the online linear probe 29.3-29.5 % (chance 10 %) and
RankMe 11.3-12.5 of 64 features. A randomly initialised backbone of the same
architecture scores 27.7 % under the same kNN protocol with its BN statistics re-estimated
on the training images (23.2 % with its initial ones; configs/knn.py). A toy budget: the
gap is small (bench/quality_cifar10.py measures a real one). Rerunning the command on the
finished workdir resumes, finds nothing left to train and stops.

`--config=configs/quickstart.py:smoke` is a toy variant (two-stage 1/8-width ResNet, 16
px) used by the tests for end-to-end, multi-process and resume checks in seconds.
"""

import os

from bt_jax.data.config import cifar_views, data_config
from bt_jax.defaults import load_config, parse_variant


def get_config(variant: str = ""):
    variant = parse_variant(variant, "quickstart", ("smoke",))
    # The CIFAR-10 recipe, shrunk to minutes: what follows is what differs from it.
    config = load_config(os.path.join(os.path.dirname(os.path.abspath(__file__)), "cifar10.py"))

    config.model.width = 0.125
    config.model.projector = "512-512-512"
    config.model.dtype = "float32"  # bf16 convolutions are slow on CPUs
    config.loss.strategy = "gather"  # N = 128 < D / 2 (bt_jax/losses.py)
    config.optim.warmup_epochs = 1

    config.train.global_batch = 128
    config.train.epochs = 8
    config.train.log_every_steps = 20
    config.train.checkpoint_every_steps = 100

    config.data = data_config("cifar10_jpeg_mini")
    config.knn.every_epochs = 0  # only at the end

    if variant == "smoke":
        config.model.stage_sizes = (1, 1)
        config.model.projector = "64-64"
        config.augment = cifar_views(16)
        config.knn.image_size = 16
        config.train.global_batch = 32
        config.train.epochs = 2
        config.train.log_every_steps = 1
        config.train.checkpoint_every_steps = 2
        config.knn.at_end = False
    return config
