r"""The linear evaluation job: a linear classifier on the frozen backbone (official protocol).

  python -m bt_jax.main --config=configs/linear_eval.py --workdir=W \
      --config.pretrained_workdir=PRETRAIN_W

linear.mode="images" is the paper's protocol (DESIGN.md section 1, the official evaluate.py
with --weights freeze): every step runs the frozen backbone in inference mode on fresh
RandomResizedCrop + flip views; the head is evaluated on resize + center crop views after
every epoch. Results: linear_top1_last / _best, linear_top5_last / _best, ...

linear.mode="fast_features" is a quick check, not the paper's protocol: the features of
center crops of the train split are computed once, and the same head, optimizer and
schedule train on them (no augmentation). Its results are named linear_fast_features_*.

Augmented training batches come from config.data.num_streams streams (0 = one per
process): fix it (e.g. 8) to train on the same batches on any number of processes.
Evaluation counts every example exactly once either way.

Everything lands in W: results.json (the summary, with the backbone and protocol), and
metrics.jsonl / tensorboard (per-step loss and LR, per-epoch accuracy).
"""

from __future__ import annotations

import jax

from bt_jax import distributed
from bt_jax.data import eval_batches
from bt_jax.evaluation import classifier, features
from bt_jax.evaluation import job as evaluation_job


def run(config, workdir: str) -> dict:
    cfg = config.linear
    if cfg.mode not in ("images", "fast_features"):
        raise ValueError(f"linear.mode must be 'images' or 'fast_features'; got {cfg.mode!r}")
    protocol = "linear" if cfg.mode == "images" else "linear_fast_features"
    job = evaluation_job.start(config, workdir, protocol)
    mesh, backbone = job.mesh, job.backbone
    distributed.check_global_batch(cfg.global_batch, mesh)
    distributed.check_global_batch(cfg.eval_batch, mesh)
    val = eval_batches(
        config.data, config.data.eval_split, global_batch=cfg.eval_batch, image_size=cfg.image_size
    )
    lr = classifier.scaled_lr(cfg.lr, cfg.global_batch)
    job.say(
        f"linear head on frozen {backbone.label} features ({backbone.num_features}-d) | "
        f"{config.data.dataset}, {val.num_classes} classes | {cfg.epochs} epochs, batch "
        f"{cfg.global_batch}, lr {cfg.lr} x {cfg.global_batch}/256 = {lr:.4g}, cosine per "
        f"epoch, SGD momentum {cfg.momentum}, weight decay {cfg.weight_decay}"
    )
    opt_cfg = dict(lr_head=lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)

    with jax.set_mesh(mesh):
        variables = evaluation_job.replicate(backbone.variables, mesh)
        if cfg.mode == "images":
            train = eval_batches(
                config.data,
                config.data.train_split,
                global_batch=cfg.global_batch,
                image_size=cfg.image_size,
                train_augment=True,
                epochs=cfg.epochs,
                seed=config.seed,
            )
            _, history = evaluation_job.train_classifier(
                config,
                job,
                variables,
                train,
                val,
                epochs=cfg.epochs,
                opt_cfg=opt_cfg,
                finetune=False,
                name=protocol,
                eval_every_epochs=cfg.eval_every_epochs,
            )
        else:
            job.say("fast variant: center-crop features computed once, no augmentation")
            train = eval_batches(
                config.data,
                config.data.train_split,
                global_batch=cfg.eval_batch,
                image_size=cfg.image_size,
            )
            train_xy = features.extract(backbone.module, variables, train, mesh)
            val_xy = features.extract(backbone.module, variables, val, mesh)
            history = fit_on_features(
                config, job, train_xy, val_xy, val.num_classes, opt_cfg, name=protocol
            )
    results = classifier.summarise(history, protocol)
    return job.finish(results, num_classes=val.num_classes, train_split=config.data.train_split)


def fit_on_features(config, job, train, val, num_classes, opt_cfg, *, name) -> list[dict]:
    """config.linear's recipe on precomputed features (host arrays), shuffled every epoch."""
    cfg = config.linear
    (x_train, y_train), (x_val, y_val) = train, val
    steps = features.num_steps(len(x_train), cfg.global_batch)
    tx, schedules = classifier.make_optimizer(
        evaluation_job.opt_config(opt_cfg, cfg.epochs), steps, finetune=False
    )
    state = evaluation_job.initial_state(
        {}, x_train.shape[1], num_classes, tx, finetune=False, seed=config.seed, mesh=job.mesh
    )

    def train_epoch(epoch):
        return features.shuffled_batches(
            x_train, y_train, global_batch=cfg.global_batch, seed=config.seed, epoch=epoch
        )

    def eval_fn(s):
        batches = features.ordered_batches(x_val, y_val, global_batch=cfg.eval_batch)
        return classifier.evaluate(s, batches, job.mesh, backbone=None, num_classes=num_classes)

    _, history = classifier.fit(
        state,
        train_epoch=train_epoch,
        steps_per_epoch=steps,
        epochs=cfg.epochs,
        evaluate_fn=eval_fn,
        step_kwargs=dict(backbone=None, num_classes=num_classes, tx=tx, finetune=False),
        schedules=schedules,
        mesh=job.mesh,
        writer=job.writer,
        name=name,
        log_every_steps=config.log_every_steps,
        eval_every_epochs=cfg.eval_every_epochs,
    )
    return history
