"""A stratified fraction of a labelled TFDS split, written once as its own TFDS dataset.

The semi-supervised protocol trains on a labelled fraction: ImageNet has the SimCLR lists
(TFDS imagenet2012_subset/1pct, /10pct: use those); for any other labelled dataset this
module draws round(fraction x n_c) examples of every class c (at least one), with a seeded
RNG, and writes those records, byte for byte, as a small TFDS dataset under
<workdir>/subsets/. The standard pipeline then reads it like any dataset: the same sharding,
augmentation and process-count independence as the full split, and the chosen examples can
be inspected. Process 0 writes; every process waits for it (the workdir is shared).
"""

from __future__ import annotations

import json
import os
import re

import jax
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds
from jax.experimental import multihost_utils

from bt_jax.data import source


def stratified_indices(labels: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Sorted indices of round(fraction * n_c) (>= 1) examples of every class c."""
    if not 0 < fraction <= 1:
        raise ValueError(f"the labelled fraction must be in (0, 1]; got {fraction}")
    rng = np.random.default_rng(seed)
    chosen = []
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        k = max(1, int(round(fraction * len(members))))
        chosen.append(rng.choice(members, k, replace=False))
    return np.sort(np.concatenate(chosen))


def subset_name(dataset: str, split: str, fraction: float, seed: int) -> str:
    pct = f"{100 * fraction:g}".replace(".", "p")
    return re.sub(r"[^a-z0-9_]", "_", f"{dataset}_{split}_{pct}pct_seed{seed}".lower())


def _labels(builder, slices) -> np.ndarray:
    parse = source.record_parser(builder, with_label=True)  # clear error without labels
    records = source.read_slices(slices, cycle_length=1).map(
        lambda r: parse(r)["label"], num_parallel_calls=tf.data.AUTOTUNE, deterministic=True
    )
    return np.concatenate([b for b in records.batch(8192).as_numpy_iterator()] or [[]])


def _write(builder, slices, keep: np.ndarray, name: str, version_dir: str) -> None:
    tmp = version_dir + ".tmp"
    tf.io.gfile.makedirs(tmp)
    path = os.path.join(tmp, f"{name}-train.tfrecord-00000-of-00001")
    wanted = set(keep.tolist())
    with tf.io.TFRecordWriter(path) as writer:
        records = source.read_slices(slices, cycle_length=1)
        for i, record in enumerate(records.as_numpy_iterator()):
            if i in wanted:
                writer.write(record)
    split = tfds.core.SplitInfo(name="train", shard_lengths=[len(keep)], num_bytes=0)
    tfds.folder_dataset.write_metadata(
        data_dir=tmp, features=builder.info.features, split_infos=[split], check_data=False
    )
    if tf.io.gfile.exists(version_dir):
        tf.io.gfile.rmtree(version_dir)
    tf.io.gfile.rename(tmp, version_dir)


def stratified_subset(data_cfg, fraction: float, seed: int, root: str):
    """data_cfg with its train split replaced by a stratified fraction (written if needed)."""
    builder = source.open_builder(data_cfg.dataset, data_cfg.data_dir)
    slices = source.file_slices(builder, data_cfg.train_split)
    name = subset_name(data_cfg.dataset, data_cfg.train_split, fraction, seed)
    version_dir = os.path.join(root, name, "1.0.0")
    if jax.process_index() == 0 and not tf.io.gfile.exists(
        os.path.join(version_dir, "dataset_info.json")
    ):
        labels = _labels(builder, slices)
        keep = stratified_indices(labels, fraction, seed)
        _write(builder, slices, keep, name, version_dir)
        counts = np.bincount(labels[keep], minlength=source.num_classes(builder))
        with tf.io.gfile.GFile(os.path.join(root, name, "subset.json"), "w") as f:
            json.dump(
                dict(
                    source=data_cfg.dataset,
                    split=data_cfg.train_split,
                    fraction=fraction,
                    seed=seed,
                    examples=int(len(keep)),
                    of=int(len(labels)),
                    per_class=counts.tolist(),
                    indices=keep.tolist(),
                ),
                f,
            )
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(f"bt_jax subset {name} written")
    subset = data_cfg.copy_and_resolve_references()
    subset.update(dataset=name, data_dir=root, train_split="train")
    return subset
