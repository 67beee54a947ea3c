"""Eval batches of multi-label datasets (VOC07-style), padded to equal counts per process.

bt_jax.data.eval_batches reads one ClassLabel "label"; multi-label sets (TFDS voc/2007) hold
a Sequence(ClassLabel) per image. The same one-pass, contiguous-part-per-process, padded
reading here yields "label" int8[B, C]: 1 = present, 0 = absent, -1 = present only as
"difficult" (in label_key but not in positive_key), ignored by training and by AP as in the
VOC protocol.
"""

from __future__ import annotations

import tensorflow as tf
import tensorflow_datasets as tfds

from bt_jax.data import augment, source
from bt_jax.data.evaluation import EvalBatches, one_padded_pass
from bt_jax.data.pipeline import resolve_processes


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
    return one_padded_pass(
        builder,
        split,
        data_cfg,
        to_examples=lambda serialized: serialized.map(
            preprocess, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True
        ),
        pad=pad,
        num_classes=classes,
        local_batch=local_batch,
        process_index=index,
        process_count=count,
        what=f"multi-label eval {data_cfg.dataset}[{split}]",
    )
