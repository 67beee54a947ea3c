"""What every evaluation job does around its protocol: workdir, backbone, mesh, results.

An evaluation writes into its own --workdir: results.json (the summary: every number named
by its protocol, the backbone it measured, the dataset and the config), metrics.jsonl and
TensorBoard events. It refuses a workdir that already holds results or metrics unless
--config.overwrite=True, and never writes into the pretraining run's workdir.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os

import jax
import ml_collections
import numpy as np
import tensorflow as tf
from jax.experimental import multihost_utils

from bt_jax import checkpoint, distributed, reporting
from bt_jax.evaluation import backbone as pretrained
from bt_jax.evaluation import classifier

RESULTS = "results.json"
_OWN_FILES = (RESULTS, "metrics.jsonl")


def replicate(tree, mesh):
    """Host (numpy) values, identical on every process -> replicated global arrays."""
    sharding = distributed.replicated(mesh)

    def put(x):
        x = np.asarray(x)
        return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])

    return jax.tree.map(put, tree)


def _same_dir(a: str, b: str) -> bool:
    if "://" in a or "://" in b:
        return a.rstrip("/") == b.rstrip("/")
    return os.path.realpath(a) == os.path.realpath(b)


def prepare_workdir(workdir: str, config) -> str:
    """The eval workdir, checked: writable, not the pretraining run's, not already used."""
    workdir = checkpoint.check_workdir(workdir)
    if config.pretrained_workdir and _same_dir(workdir, config.pretrained_workdir):
        raise ValueError(
            f"--workdir is the pretraining run's workdir ({workdir}); give the evaluation its "
            "own --workdir (its metrics would mix with the pretraining's)"
        )
    existing = [f for f in _OWN_FILES if tf.io.gfile.exists(os.path.join(workdir, f))]
    if existing and not config.overwrite:
        raise ValueError(
            f"{workdir} already holds {', '.join(existing)} of an earlier evaluation; use "
            "another --workdir or pass --config.overwrite=True to replace them"
        )
    if jax.process_count() > 1:  # every process has checked before process 0 writes
        multihost_utils.sync_global_devices("bt_jax evaluation workdir checked")
    if existing and jax.process_index() == 0:
        for f in existing:
            tf.io.gfile.remove(os.path.join(workdir, f))
    return workdir


@dataclasses.dataclass
class Job:
    config: ml_collections.ConfigDict
    workdir: str
    protocol: str
    mesh: jax.sharding.Mesh
    backbone: pretrained.Backbone
    writer: reporting.MetricWriter
    progress: reporting.Progress

    def say(self, text: str) -> None:
        self.progress.say(text)

    def finish(self, results: dict, **extra) -> dict:
        """Write results.json and the summary metrics, print them, close the writer."""
        summary = {
            "protocol": self.protocol,
            "results": results,
            "backbone": self.backbone.info,
            "dataset": self.config.data.dataset,
            "eval_split": self.config.data.eval_split,
            **extra,
            "processes": jax.process_count(),
            "devices": jax.device_count(),
            "config": self.config.to_dict(),
        }
        if jax.process_index() == 0:
            path = os.path.join(self.workdir, RESULTS)
            with tf.io.gfile.GFile(path + ".tmp", "w") as f:
                json.dump(summary, f, indent=2, default=str)
            tf.io.gfile.rename(path + ".tmp", path, overwrite=True)
        numbers = {k: v for k, v in results.items() if isinstance(v, int | float)}
        self.writer.write(0, numbers, tag=f"{self.protocol}_summary")
        self.writer.close()
        b = self.backbone.info
        self.say(
            f"results ({self.protocol}, {b['source']} {b['arch']} backbone of "
            f"{b['workdir']} step {b['step']}, {self.config.data.dataset}):"
        )
        for key, value in results.items():
            self.say(f"  {key} = {_format(value)}")
        self.say(f"written to {os.path.join(self.workdir, RESULTS)}")
        return results


def _format(value) -> str:
    if isinstance(value, float):
        return f"{value:.3g}" if 0 < abs(value) < 0.01 else f"{value:.2f}"
    return str(value)


def start(config, workdir: str, protocol: str) -> Job:
    """Checks, then the backbone (fails fast on a bad checkpoint), mesh and writer."""
    workdir = prepare_workdir(workdir, config)
    backbone = pretrained.load_backbone(config)
    mesh = distributed.make_mesh()
    progress = reporting.Progress(1, 0, name=protocol)
    if backbone.label == "random_init":
        progress.say(
            "BASELINE: randomly initialised backbone (config.random_init=True), architecture "
            f"of {backbone.info['workdir']}; these numbers are not the pretrained model's"
        )
    progress.say(
        f"{jax.process_count()} process(es), {jax.device_count()} devices | backbone: "
        f"{backbone.label} {backbone.info['model']} from {backbone.info['workdir']} step "
        f"{backbone.info['step']}"
    )
    return Job(config, workdir, protocol, mesh, backbone, reporting.MetricWriter(workdir), progress)


def opt_config(opt: dict, epochs: int) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict({"lr_backbone": 0.0, **opt, "epochs": epochs})


def initial_state(
    variables, num_features, num_classes, tx, *, finetune, seed, mesh
) -> classifier.State:
    init = functools.partial(
        classifier.init_state,
        num_features=num_features,
        num_classes=num_classes,
        tx=tx,
        finetune=finetune,
        seed=seed,
    )
    return jax.jit(init, out_shardings=distributed.replicated(mesh))(variables)


def train_classifier(
    config, job: Job, variables, train, val, *, epochs, opt_cfg, finetune, name, eval_every_epochs
):
    """Head (+ backbone if finetune) trained on image batches `train`, evaluated on `val`."""
    if train.num_classes != val.num_classes:
        raise ValueError(
            f"the train data has {train.num_classes} classes but the eval data "
            f"{val.num_classes}: they must share one label set"
        )
    num_classes, module = val.num_classes, job.backbone.module
    tx, schedules = classifier.make_optimizer(
        opt_config(opt_cfg, epochs), train.num_batches, finetune=finetune
    )
    state = initial_state(
        variables,
        module.num_features,
        num_classes,
        tx,
        finetune=finetune,
        seed=config.seed,
        mesh=job.mesh,
    )

    def eval_fn(s):
        return classifier.evaluate(s, val, job.mesh, backbone=module, num_classes=num_classes)

    return classifier.fit(
        state,
        train_epoch=classifier.epochs_of(train, train.num_batches),
        steps_per_epoch=train.num_batches,
        epochs=epochs,
        evaluate_fn=eval_fn,
        step_kwargs=dict(backbone=module, num_classes=num_classes, tx=tx, finetune=finetune),
        schedules=schedules,
        mesh=job.mesh,
        writer=job.writer,
        name=name,
        log_every_steps=config.log_every_steps,
        eval_every_epochs=eval_every_epochs,
    )
