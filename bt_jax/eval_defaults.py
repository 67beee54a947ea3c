"""The config tree of the evaluation jobs (kNN, linear, semi-supervised, transfer).

Light on purpose (ml_collections only): config files import it while flags are parsed.
Protocol hyper-parameters are the official evaluate.py's; configs/*.py state what they change.
"""

from __future__ import annotations

import ml_collections
import numpy as np

from bt_jax.data.config import data_config
from bt_jax.defaults import knn_config


def eval_config(job: str, dataset: str = "imagenet2012") -> ml_collections.ConfigDict:
    """Fields every evaluation job reads; the protocol's own section is added by the caller.

    pretrained_workdir / pretrained_step / random_init / expected_arch: which backbone (see
    bt_jax/pretrained.py); overwrite: replace the results of an earlier evaluation in the
    same --workdir.
    """
    config = ml_collections.ConfigDict()
    config.job = job
    config.seed = 0
    config.pretrained_workdir = ""
    config.pretrained_step = -1  # -1 = the latest checkpoint
    config.random_init = False  # True: a fresh backbone of the same architecture (baseline)
    config.expected_arch = ""  # e.g. "resnet50": refuse checkpoints of another architecture
    config.overwrite = False
    config.log_every_steps = 50
    config.data = data_config(dataset)
    return config


def linear_config(**overrides) -> ml_collections.ConfigDict:
    """The official linear protocol: 100 epochs, SGD momentum 0.9, lr 0.3 (batch 256, scaled
    linearly with the batch), cosine per epoch, weight decay 1e-6, 224 px."""
    cfg = ml_collections.ConfigDict(
        dict(
            mode="images",  # "images": the paper's protocol; "fast_features": quick check
            epochs=100,
            global_batch=256,
            lr=0.3,  # for batch 256; the job uses lr * global_batch / 256
            momentum=0.9,
            weight_decay=1e-6,
            image_size=224,
            eval_batch=256,
            eval_every_epochs=1,
        )
    )
    cfg.update(overrides)
    return cfg


def finetune_config(**overrides) -> ml_collections.ConfigDict:
    """The official fine-tuning protocol (semi-supervised): all layers, BN in train mode,
    backbone lr 0.005, head lr 0.5 (batch 256, scaled linearly), weight decay 0, 20 epochs."""
    cfg = ml_collections.ConfigDict(
        dict(
            # labelled fraction: 0 = the dataset's train split as it is (ImageNet: the TFDS
            # imagenet2012_subset/1pct or /10pct); > 0 = a stratified fraction of it
            fraction=0.0,
            epochs=20,
            global_batch=256,
            lr_backbone=0.005,
            lr_head=0.5,
            momentum=0.9,
            weight_decay=0.0,
            image_size=224,
            eval_batch=256,
            eval_every_epochs=1,
        )
    )
    cfg.update(overrides)
    return cfg


def knn_job_config(**overrides) -> ml_collections.ConfigDict:
    cfg = knn_config()
    cfg.update(overrides)
    return cfg


def transfer_config(**overrides) -> ml_collections.ConfigDict:
    """Transfer to another dataset: which protocols, at what resolution, scored how."""
    cfg = ml_collections.ConfigDict(
        dict(
            protocols=("linear", "finetune"),  # or ("svm",) for multi-label datasets
            metric="top1",  # the dataset's convention: "top1" or "mean_per_class"
            image_size=224,
            eval_batch=256,
            # logistic regression on frozen features (L-BFGS), L2 chosen on a held-out part
            linear=dict(
                heldout_fraction=0.2,
                l2_grid=tuple(float(v) for v in 10.0 ** -np.arange(0.0, 7.0)),
                max_iter=500,
            ),
            # per-class linear SVMs (multi-label); labels from these features
            svm=dict(
                costs=(1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0),
                folds=3,
                max_iter=1000,
            ),
            label_key="labels",
            positive_key="labels_no_difficult",
        )
    )
    cfg.update(overrides)
    return cfg
