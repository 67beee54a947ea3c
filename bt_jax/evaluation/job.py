"""What every evaluation job does around its protocol: workdir, backbone, mesh, results.

An evaluation writes into its own --workdir: results.json (the summary: every number named
by its protocol, the backbone it measured, the dataset and the config), metrics.jsonl and
TensorBoard events. It refuses a workdir that already holds results or metrics unless
--config.overwrite=True, and never writes into the pretraining run's workdir.
"""

from __future__ import annotations

import dataclasses
import json
import os

import jax
import ml_collections
import numpy as np
import tensorflow as tf
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from bt_jax import checkpoint, data, distributed, reporting
from bt_jax.evaluation.backbone import (
    Backbone,
    check_source,
    load_backbone,
    precise_bn_statistics,
)

RESULTS = "results.json"
# results.json and the metrics (metrics.jsonl locally, metrics-NNNNN.jsonl segments on gs://)
_OWN_FILES = (RESULTS, reporting.JSONL, reporting.SEGMENT_GLOB)


def replicate(tree, mesh: Mesh):
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


def prepare_workdir(workdir: str, config: ml_collections.ConfigDict) -> str:
    """The eval workdir, checked: writable, not the pretraining run's, not already used."""
    workdir = checkpoint.check_workdir(workdir)
    if config.pretrained_workdir and _same_dir(workdir, config.pretrained_workdir):
        raise ValueError(
            f"--workdir is the pretraining run's workdir ({workdir}); give the evaluation its "
            "own --workdir (its metrics would mix with the pretraining's)"
        )
    existing = [
        os.path.basename(path)
        for pattern in _OWN_FILES
        for path in sorted(tf.io.gfile.glob(os.path.join(workdir, pattern)))
    ]
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
    mesh: Mesh
    backbone: Backbone
    variables: dict  # the backbone's, replicated on the mesh
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
        b = self.backbone
        self.say(
            f"results ({self.protocol}, {b.label} {b.info['arch']} backbone of {b.origin}, "
            f"{self.config.data.dataset}):"
        )
        for key, value in results.items():
            self.say(f"  {key} = {_format(value)}")
        self.say(f"written to {os.path.join(self.workdir, RESULTS)}")
        return results


def _format(value) -> str:
    if isinstance(value, float):
        return f"{value:.3g}" if 0 < abs(value) < 0.01 else f"{value:.2f}"
    return str(value)


def start(
    config: ml_collections.ConfigDict, workdir: str, protocol: str, *, image_size: int
) -> Job:
    """Checks, then the backbone (fails fast on a bad checkpoint), mesh and writer.

    image_size: the protocol's; a random_init backbone's BN statistics are re-estimated on
    config.data's train split at that size (config.random_init_bn; 0 batches: kept).
    """
    check_source(config)  # before anything is written
    workdir = prepare_workdir(workdir, config)
    backbone = load_backbone(config)
    mesh = distributed.make_mesh()
    progress = reporting.Progress(1, 0, name=protocol)
    if backbone.label == "random_init":
        progress.say(
            "BASELINE: randomly initialised backbone (config.random_init=True), architecture "
            f"of {backbone.origin}; these numbers are not the pretrained model's"
        )
    progress.say(
        f"{jax.process_count()} process(es), {jax.device_count()} devices | backbone: "
        f"{backbone.label} {backbone.info['model']} from {backbone.origin} | inputs "
        f"normalised with {backbone.info['normalization']} statistics"
    )
    variables = replicate(backbone.variables, mesh)
    if backbone.label == "random_init" and config.random_init_bn.batches:
        variables = _precise_bn(config, backbone, variables, mesh, image_size, progress.say)
    writer = reporting.MetricWriter(workdir)
    return Job(config, workdir, protocol, mesh, backbone, variables, writer, progress)


def _precise_bn(config, backbone: Backbone, variables, mesh, image_size, say) -> dict:
    cfg = config.random_init_bn
    distributed.check_global_batch(cfg.global_batch, mesh)
    split = config.data.train_split
    batches = data.eval_batches(
        config.data, split, global_batch=cfg.global_batch, image_size=image_size
    )
    with jax.set_mesh(mesh):
        variables, used = precise_bn_statistics(
            backbone.encoder, variables, batches, mesh, num_batches=cfg.batches
        )
    backbone.info["bn_images"] = used * cfg.global_batch
    backbone.info["bn_statistics"] = (
        f"precise BN: mean of train-mode batch statistics over {used} batches of "
        f"{cfg.global_batch} {config.data.dataset}[{split}] images at {image_size} px"
    )
    say(f"random_init: BN running statistics re-estimated ({backbone.info['bn_statistics']})")
    return variables
