r"""The transfer job: the pretrained backbone on another labelled dataset, by TFDS name.

  python -m bt_jax.main --config=configs/transfer_caltech101.py --workdir=W \
      --config.pretrained_workdir=PRETRAIN_W

Protocols (config.transfer.protocols):
  "linear": multinomial logistic regression on frozen center-crop features, its L2 strength
    chosen on a stratified held-out part of the train split, refit on all of it
    (bt_jax/evaluation/probes.py). Results transfer_linear_top1 / _top5 / _mean_per_class.
  "finetune": every layer trained on the train split with config.finetune's recipe
    (bt_jax/evaluation/protocols.py finetune, as the semi-supervised job). Results
    transfer_finetune_top1_last / _best, ...
  "svm": multi-label datasets (VOC07): VISSL's VOC07 benchmark, one scikit-learn LinearSVC
    per class on frozen features of resized (not cropped) images, its cost chosen by 3-fold
    cross_val_score on AP (bt_jax/evaluation/svm.py; configs/transfer_voc2007.py). Results
    transfer_svm_map (percent), _ap_per_class, _costs.
config.transfer.metric names the dataset's convention ("top1", or "mean_per_class" for
Caltech-101 and similar): it picks the L2 strength and is repeated as transfer_<p>_metric.
"""

from __future__ import annotations

import jax
import ml_collections

from bt_jax import data
from bt_jax.data import multilabel
from bt_jax.evaluation import classifier, probes, protocols, svm
from bt_jax.evaluation import job as evaluation_job

PROTOCOLS = ("linear", "finetune", "svm")


def _features(
    config: ml_collections.ConfigDict, job: evaluation_job.Job, split: str, multi_label: bool
):
    cfg = config.transfer
    if not multi_label:
        batches = data.eval_batches(
            config.data, split, global_batch=cfg.eval_batch, image_size=cfg.image_size
        )
        return protocols.frozen_features(job, batches), batches.num_classes
    batches = multilabel.multilabel_batches(
        config.data,
        split,
        global_batch=cfg.eval_batch,
        image_size=cfg.image_size,
        resize=cfg.svm.resize,
        center_crop=cfg.svm.center_crop,
        label_key=cfg.label_key,
        positive_key=cfg.positive_key,
        sort_by=cfg.svm.sort_by,
    )
    x, labels, keys = protocols.frozen_features(job, batches, keys=("label", "sort_key"))
    order = sorted(range(len(keys)), key=lambda i: keys[i].tobytes())  # stable
    return (x[order], labels[order]), batches.num_classes


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
    cfg = config.transfer
    unknown = set(cfg.protocols) - set(PROTOCOLS)
    if unknown or not cfg.protocols:
        raise ValueError(f"transfer.protocols must be some of {PROTOCOLS}; got {cfg.protocols}")
    multi_label = "svm" in cfg.protocols
    if multi_label and set(cfg.protocols) != {"svm"}:
        raise ValueError("the 'svm' protocol (multi-label datasets) runs alone")
    if cfg.metric not in ("top1", "mean_per_class"):
        raise ValueError(f"transfer.metric must be top1 or mean_per_class; got {cfg.metric!r}")
    job = evaluation_job.start(config, workdir, "transfer", image_size=cfg.image_size)
    data_cfg, results = config.data, {}
    if "linear" in cfg.protocols or multi_label:
        train, num_classes = _features(config, job, data_cfg.train_split, multi_label)
        test, _ = _features(config, job, data_cfg.eval_split, multi_label)
        job.say(
            f"frozen {job.backbone.label} features ({train[0].shape[1]}-d) of "
            f"{data_cfg.dataset}: {len(train[0])} train [{data_cfg.train_split}], {len(test[0])} "
            f"test [{data_cfg.eval_split}], {num_classes} classes"
        )
    if multi_label:
        fit = svm.voc07_svms(train, test, cfg.svm, seed=config.seed, say=job.say)
        if fit["unconverged"]:
            job.say(f"{fit['unconverged']} of {num_classes} final SVMs hit max_iter (VISSL's too)")
        results.update(transfer_svm_map=fit["map"], transfer_svm_num_test=len(test[0]))
        results["transfer_svm_ap_per_class"] = [round(100 * float(a), 2) for a in fit["ap"]]
        results["transfer_svm_costs"] = [float(c) for c in fit["costs"]]
        results["transfer_svm_cv_map"] = 100 * float(fit["cv_ap"].max(axis=1).mean())
    if "linear" in cfg.protocols:
        job.say(f"logistic regression, L2 chosen on a held-out {cfg.linear.heldout_fraction:.0%}")
        with jax.set_mesh(job.mesh):
            result, l2, scores = probes.logistic_probe(
                train,
                test,
                num_classes,
                cfg.linear,
                job.mesh,
                seed=config.seed,
                metric=cfg.metric,
                say=job.say,
            )
        results.update({f"transfer_linear_{k}": v for k, v in result.items()})
        results["transfer_linear_metric"] = result[cfg.metric]
        results["transfer_linear_l2"] = l2
    if "finetune" in cfg.protocols:
        history, _ = protocols.finetune(
            config.finetune,
            data_cfg,
            data_cfg,
            job,
            name="transfer_finetune",
            seed=config.seed,
            log_every_steps=config.log_every_steps,
        )
        summary = classifier.summarise(history, "transfer_finetune")
        results.update(summary)
        results["transfer_finetune_metric_last"] = history[-1][cfg.metric]
    return job.finish(results, metric=cfg.metric, protocols=list(cfg.protocols))
