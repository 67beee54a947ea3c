r"""The linear evaluation job: a linear classifier on the frozen backbone.

  python -m bt_jax.main --config=configs/linear_eval.py --workdir=W \
      --config.pretrained_workdir=PRETRAIN_W

linear.mode="images" is the paper's protocol (the official evaluate.py --weights freeze;
its numbers: configs/linear_eval.py): every step runs the frozen backbone in inference mode
on fresh RandomResizedCrop + flip views; the head is evaluated on resize + center crop views
after every epoch. Results: linear_top1_last / _best, linear_top5_last / _best, ...

linear.mode="fast_features" is a quick check, not the paper's protocol: the features of
center crops of the train split are computed once, and the same head, optimizer and
schedule train on them (no augmentation). Its results are named linear_fast_features_*.

Everything lands in W: results.json (the summary, with the backbone and protocol), and
metrics.jsonl / tensorboard (per-step loss and LR, per-epoch accuracy).
"""

from __future__ import annotations

import ml_collections

from bt_jax import data, distributed
from bt_jax.evaluation import classifier, protocols
from bt_jax.evaluation import job as evaluation_job

MODES = ("images", "fast_features")


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
    cfg = config.linear
    if cfg.mode not in MODES:
        raise ValueError(f"linear.mode must be one of {MODES}; got {cfg.mode!r}")
    protocol = "linear" if cfg.mode == "images" else "linear_fast_features"
    job = evaluation_job.start(config, workdir, protocol, image_size=cfg.image_size)
    if cfg.mode == "images":
        train, val = protocols.augmented_splits(
            cfg, config.data, config.data, job, seed=config.seed
        )
    else:
        distributed.check_global_batch(cfg.global_batch, job.mesh)
        distributed.check_global_batch(cfg.eval_batch, job.mesh)
        train, val = (
            data.eval_batches(
                config.data, split, global_batch=cfg.eval_batch, image_size=cfg.image_size
            )
            for split in (config.data.train_split, config.data.eval_split)
        )
    lr = protocols.sgd_config(cfg, finetune=False).lr_head
    job.say(
        f"linear head on frozen {job.backbone.label} features ({job.backbone.num_features}-d) "
        f"| {config.data.dataset}, {val.num_classes} classes | {cfg.epochs} epochs, batch "
        f"{cfg.global_batch}, lr {cfg.lr} x {cfg.global_batch}/256 = {lr:.4g}, cosine per "
        f"epoch, SGD momentum {cfg.momentum}, weight decay {cfg.weight_decay}"
    )
    num_classes = val.num_classes
    if cfg.mode == "fast_features":
        job.say("fast variant: center-crop features computed once, no augmentation")
        train, val = protocols.frozen_features(job, train), protocols.frozen_features(job, val)
    history = protocols.train_head(
        cfg,
        train,
        val,
        job,
        num_classes=num_classes,
        name=protocol,
        seed=config.seed,
        log_every_steps=config.log_every_steps,
    )
    results = classifier.summarise(history, protocol)
    return job.finish(results, num_classes=num_classes, train_split=config.data.train_split)
