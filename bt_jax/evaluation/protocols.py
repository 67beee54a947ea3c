"""The official evaluate.py recipes, as the evaluation jobs share them.

train_head: a linear head (and, with finetune=True, the whole backbone) trained with torch
SGD and a per-epoch cosine, evaluated after every `eval_every_epochs` epochs; on batches of
images through the backbone, or on precomputed feature arrays. finetune: the fine-tuning
recipe on augmented images of a train split (semi-supervised and transfer fine-tuning).
Both take their protocol's own config section (defaults.linear_config / finetune_config),
never the whole config; the numbers of each protocol are in its configs/*.py.
"""

from __future__ import annotations

import functools

import jax
import ml_collections
import numpy as np

from bt_jax import data, distributed
from bt_jax.evaluation import classifier, features
from bt_jax.evaluation.job import Job


def sgd_config(cfg: ml_collections.ConfigDict, *, finetune: bool) -> ml_collections.ConfigDict:
    """classifier.make_optimizer's settings from a linear (lr) or finetune (lr_head,
    lr_backbone) section; learning rates are given for batch 256, scaled to global_batch."""
    lr_head = cfg.lr_head if finetune else cfg.lr
    return ml_collections.ConfigDict(
        dict(
            lr_head=classifier.scaled_lr(lr_head, cfg.global_batch),
            lr_backbone=classifier.scaled_lr(cfg.lr_backbone, cfg.global_batch)
            if finetune
            else 0.0,
            momentum=cfg.momentum,
            weight_decay=cfg.weight_decay,
            epochs=cfg.epochs,
        )
    )


def train_head(
    cfg: ml_collections.ConfigDict,
    train,
    val,
    job: Job,
    *,
    num_classes: int,
    finetune: bool = False,
    name: str,
    seed: int,
    log_every_steps: int,
) -> list[dict]:
    """Trains cfg's recipe; returns one row per evaluation ({"epoch", "top1", ...}).

    train, val: either EvalBatches of images (train: an augmented stream of cfg.epochs
    epochs), run through job's backbone, or (features [N, F], labels [N]) host arrays,
    shuffled every epoch (train) and read in order (val) without the backbone.
    """
    if isinstance(train, tuple):  # precomputed features: the step has no backbone
        (x, y), backbone, variables = train, None, {}
        steps, num_features = features.num_steps(len(x), cfg.global_batch), x.shape[1]

        def train_epoch(epoch):
            return features.shuffled_batches(
                x, y, global_batch=cfg.global_batch, seed=seed, epoch=epoch
            )

        def val_batches():
            return features.ordered_batches(*val, global_batch=cfg.eval_batch)
    else:
        if train.num_classes != val.num_classes:
            raise ValueError(
                f"the train data has {train.num_classes} classes but the eval data "
                f"{val.num_classes}: they must share one label set"
            )
        backbone, variables = job.backbone.encoder, job.variables
        steps, num_features = train.num_batches, backbone.num_features
        train_epoch = classifier.epochs_of(train, steps)

        def val_batches():
            return val

    tx, schedules = classifier.make_optimizer(
        sgd_config(cfg, finetune=finetune), steps, finetune=finetune
    )
    init = functools.partial(
        classifier.init_state,
        num_features=num_features,
        num_classes=num_classes,
        tx=tx,
        finetune=finetune,
        seed=seed,
    )
    with jax.set_mesh(job.mesh):
        state = jax.jit(init, out_shardings=distributed.replicated(job.mesh))(variables)

    def evaluate(s: classifier.State) -> dict:
        return classifier.evaluate(
            s, val_batches(), job.mesh, backbone=backbone, num_classes=num_classes
        )

    _, history = classifier.fit(
        state,
        train_epoch=train_epoch,
        steps_per_epoch=steps,
        epochs=cfg.epochs,
        evaluate_fn=evaluate,
        step_kwargs=dict(backbone=backbone, num_classes=num_classes, tx=tx, finetune=finetune),
        schedules=schedules,
        mesh=job.mesh,
        writer=job.writer,
        name=name,
        log_every_steps=log_every_steps,
        eval_every_epochs=cfg.eval_every_epochs,
    )
    return history


def augmented_splits(
    cfg: ml_collections.ConfigDict,
    train_data: ml_collections.ConfigDict,
    eval_data: ml_collections.ConfigDict,
    job: Job,
    *,
    seed: int,
):
    """(train, val) image batches of the official recipe: train_data's train split with
    RandomResizedCrop + flip for cfg.epochs epochs, eval_data's eval split center-cropped."""
    distributed.check_global_batch(cfg.global_batch, job.mesh)
    distributed.check_global_batch(cfg.eval_batch, job.mesh)
    train = data.eval_batches(
        train_data,
        train_data.train_split,
        global_batch=cfg.global_batch,
        image_size=cfg.image_size,
        train_augment=True,
        epochs=cfg.epochs,
        seed=seed,
    )
    val = data.eval_batches(
        eval_data, eval_data.eval_split, global_batch=cfg.eval_batch, image_size=cfg.image_size
    )
    return train, val


def finetune(
    cfg: ml_collections.ConfigDict,
    train_data: ml_collections.ConfigDict,
    eval_data: ml_collections.ConfigDict,
    job: Job,
    *,
    name: str,
    seed: int,
    log_every_steps: int,
) -> tuple[list[dict], int]:
    """The fine-tuning recipe (cfg: a finetune section): every layer trained, BN in train mode,
    on train_data's train split; evaluated on eval_data's eval split. Returns the per-epoch
    history and the number of training examples."""
    train, val = augmented_splits(cfg, train_data, eval_data, job, seed=seed)
    opt = sgd_config(cfg, finetune=True)
    job.say(
        f"fine-tuning every layer of the {job.backbone.label} backbone (BN in train mode) on "
        f"{train.num_examples} examples of {train_data.dataset}[{train_data.train_split}] | "
        f"{cfg.epochs} epochs, batch {cfg.global_batch}, lr backbone {opt.lr_backbone:.4g} / "
        f"head {opt.lr_head:.4g} (x {cfg.global_batch}/256), weight decay {cfg.weight_decay}"
    )
    history = train_head(
        cfg,
        train,
        val,
        job,
        num_classes=val.num_classes,
        finetune=True,
        name=name,
        seed=seed,
        log_every_steps=log_every_steps,
    )
    return history, train.num_examples


def frozen_features(job: Job, batches, keys=("label",)) -> tuple[np.ndarray, ...]:
    """(features, labels) of every example of `batches` through job's frozen backbone (and
    with more keys, those batch entries too: features.extract)."""
    with jax.set_mesh(job.mesh):
        return features.extract(job.backbone.encoder, job.variables, batches, job.mesh, keys)
