r"""The semi-supervised job: fine-tune the whole network on a labelled fraction.

  python -m bt_jax.main --config=configs/semi_supervised.py --workdir=W \
      --config.pretrained_workdir=PRETRAIN_W

The official evaluate.py --weights finetune recipe: every layer trained, BN in train mode,
backbone lr 0.005 and head lr 0.5 (batch 256; both scaled by batch / 256), weight decay 0,
SGD momentum 0.9, cosine per epoch, 20 epochs; RandomResizedCrop + flip for training, resize
+ center crop for the eval split. BN statistics are those of the global batch (the official
run used DDP without SyncBN: statistics of each GPU's 32 images).

Augmented training batches come from config.data.num_streams streams (0 = one per
process): fix it (e.g. 8) to train on the same batches on any number of processes.
Evaluation counts every example exactly once either way.

The labelled fraction: ImageNet's 1 % / 10 % are the TFDS imagenet2012_subset/1pct and
/10pct datasets (the SimCLR lists; config.finetune.fraction = 0 uses the dataset's train
split as it is); for another dataset, fraction > 0 takes a stratified fraction of its train
split (bt_jax/subsets.py). Results: semi_supervised_<label>_top1_last / _best, ...
"""

from __future__ import annotations

import os

import jax

from bt_jax import distributed
from bt_jax.data import eval_batches, subsets
from bt_jax.evaluation import classifier
from bt_jax.evaluation import job as evaluation_job


def fraction_label(config) -> str:
    fraction = config.finetune.fraction
    if fraction:
        return f"{100 * fraction:g}pct".replace(".", "p")
    dataset = config.data.dataset
    return dataset.split("/")[1] if "/" in dataset else "full"


def finetune(config, job, train_data, *, name: str) -> tuple[list[dict], int]:
    """config.finetune's recipe: train on train_data's train split, evaluate config.data's
    eval split after every epoch; returns the per-epoch history and the train set size."""
    cfg = config.finetune
    distributed.check_global_batch(cfg.global_batch, job.mesh)
    distributed.check_global_batch(cfg.eval_batch, job.mesh)
    train = eval_batches(
        train_data,
        train_data.train_split,
        global_batch=cfg.global_batch,
        image_size=cfg.image_size,
        train_augment=True,
        epochs=cfg.epochs,
        seed=config.seed,
    )
    val = eval_batches(
        config.data, config.data.eval_split, global_batch=cfg.eval_batch, image_size=cfg.image_size
    )
    lr_backbone = classifier.scaled_lr(cfg.lr_backbone, cfg.global_batch)
    lr_head = classifier.scaled_lr(cfg.lr_head, cfg.global_batch)
    job.say(
        f"fine-tuning every layer of the {job.backbone.label} backbone (BN in train mode) on "
        f"{train.num_examples} examples of {train_data.dataset}[{train_data.train_split}] | "
        f"{cfg.epochs} epochs, batch {cfg.global_batch}, lr backbone {lr_backbone:.4g} / head "
        f"{lr_head:.4g} (x {cfg.global_batch}/256), weight decay {cfg.weight_decay}"
    )
    opt_cfg = dict(
        lr_head=lr_head,
        lr_backbone=lr_backbone,
        momentum=cfg.momentum,
        weight_decay=cfg.weight_decay,
    )
    with jax.set_mesh(job.mesh):
        variables = evaluation_job.replicate(job.backbone.variables, job.mesh)
        _, history = evaluation_job.train_classifier(
            config,
            job,
            variables,
            train,
            val,
            epochs=cfg.epochs,
            opt_cfg=opt_cfg,
            finetune=True,
            name=name,
            eval_every_epochs=cfg.eval_every_epochs,
        )
    return history, train.num_examples


def run(config, workdir: str) -> dict:
    protocol = f"semi_supervised_{fraction_label(config)}"
    job = evaluation_job.start(config, workdir, protocol)
    train_data = config.data
    if config.finetune.fraction:
        root = os.path.join(job.workdir, "subsets")
        train_data = subsets.stratified_subset(
            config.data, config.finetune.fraction, config.seed, root
        )
    history, examples = finetune(config, job, train_data, name=protocol)
    results = classifier.summarise(history, protocol)
    return job.finish(
        results,
        train_dataset=train_data.dataset,
        train_examples=examples,
        fraction=config.finetune.fraction,
    )
