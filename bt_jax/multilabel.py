"""Eval batches of multi-label datasets (VOC07-style), padded to equal counts per process.

bt_jax.data.eval_batches reads one ClassLabel "label"; multi-label sets (TFDS voc/2007) hold
a Sequence(ClassLabel) per image. The same one-pass, contiguous-part-per-process, padded
reading here yields "label" int8[B, C]: 1 = present, 0 = absent, -1 = present only as
"difficult" (in label_key but not in positive_key), ignored by training and by AP as in the
VOC protocol.
"""

from __future__ import annotations

import math

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from bt_jax.data import augment, source
from bt_jax.data.evaluation import EvalBatches
from bt_jax.data.pipeline import dataset_options, resolve_processes


def _class_count(builder, key: str) -> int:
    feature = dict(builder.info.features.items()).get(key)
    inner = getattr(feature, "feature", None)
    if not isinstance(inner, tfds.features.ClassLabel):
        raise ValueError(
            f"dataset {builder.info.full_name} has no multi-label feature {key!r} (a Sequence "
            f"of ClassLabel); its features: {sorted(builder.info.features.keys())}"
        )
    return inner.num_classes


def multilabel_batches(
    data_cfg,
    split: str,
    *,
    global_batch: int,
    image_size: int,
    label_key: str = "labels",
    positive_key: str = "labels_no_difficult",
    process_index: int | None = None,
    process_count: int | None = None,
) -> EvalBatches:
    index, count = resolve_processes(process_index, process_count)
    if global_batch % count:
        raise ValueError(f"global_batch={global_batch} is not divisible by {count} processes")
    local_batch = global_batch // count
    builder = source.open_builder(data_cfg.dataset, data_cfg.data_dir)
    classes = _class_count(builder, label_key)
    has_positive = bool(positive_key) and positive_key in builder.info.features
    features = builder.info.features
    slices = source.file_slices(builder, split)
    total = source.num_records(slices)
    bounds = source.even_bounds(total, count)
    num_batches = math.ceil(max(np.diff(bounds)) / local_batch) if total else 0
    mine = source.cut(slices, bounds[index], bounds[index + 1])

    def multi_hot(ids):
        return tf.reduce_sum(tf.one_hot(ids, classes, dtype=tf.int32), axis=0) > 0

    @tf.autograph.experimental.do_not_convert
    def preprocess(serialized):
        example = features.deserialize_example(
            serialized, decoders={"image": tfds.decode.SkipDecoding()}
        )
        present = multi_hot(example[label_key])
        positive = multi_hot(example[positive_key]) if has_positive else present
        label = tf.where(positive, 1, tf.where(present, -1, 0))
        image = augment.eval_view(example["image"], image_size, data_cfg.eval_crop_fraction)
        return {"image": image, "label": tf.cast(label, tf.int8), "mask": tf.constant(True)}

    pad = {
        "image": tf.zeros([image_size, image_size, 3], tf.uint8),
        "label": tf.zeros([classes], tf.int8),
        "mask": tf.constant(False),
    }
    if mine:
        examples = source.read_slices(mine, cycle_length=1).map(
            preprocess, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True
        )
    else:
        examples = tf.data.Dataset.from_tensors(pad).take(0)
    dataset = (
        examples.ignore_errors()
        .concatenate(tf.data.Dataset.from_tensors(pad).repeat())
        .take(num_batches * local_batch)
        .batch(local_batch)
        .prefetch(data_cfg.prefetch)
        .with_options(dataset_options(data_cfg.threads))
    )
    return EvalBatches(
        dataset,
        num_batches=num_batches,
        num_examples=total,
        num_classes=classes,
        local_examples=bounds[index + 1] - bounds[index],
        what=f"multi-label eval {data_cfg.dataset}[{split}]",
        log_every=data_cfg.log_skipped_every,
        padded=True,
    )
