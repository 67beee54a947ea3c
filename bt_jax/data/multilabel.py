"""Eval batches of multi-label datasets (VOC07), preprocessed as VISSL's VOC07 benchmark.

bt_jax.data.eval_batches reads one ClassLabel "label"; multi-label sets (TFDS voc/2007) hold
a Sequence(ClassLabel) per image. The same one-pass, contiguous-part-per-process, padded
reading here yields "label" int8[B, C]: 1 = present, 0 = absent, -1 = present only as
"difficult" (in label_key but not in positive_key): VOC's ImageSets convention, which VISSL
keeps (extra_scripts/datasets/create_voc_data_files.py). What the -1s mean to the SVMs is
bt_jax/evaluation/svm.py's business.

"sort_key" uint8[B, 64]: the first 64 bytes of the sort_by feature (TFDS voc's
"image/filename"), zero-padded, so that rows can be put in VISSL's order (sorted image
names); that order decides its cross-validation folds.
"""

from __future__ import annotations

import tensorflow as tf
import tensorflow_datasets as tfds

from bt_jax.data import source
from bt_jax.data.evaluation import EvalBatches, one_padded_pass
from bt_jax.data.pipeline import resolve_processes

SORT_KEY_BYTES = 64


def _class_count(builder, key: str) -> int:
    feature = dict(builder.info.features.items()).get(key)
    inner = getattr(feature, "feature", None)
    if not isinstance(inner, tfds.features.ClassLabel):
        raise ValueError(
            f"dataset {builder.info.full_name} has no multi-label feature {key!r} (a Sequence "
            f"of ClassLabel); its features: {sorted(builder.info.features.keys())}"
        )
    return inner.num_classes


def _pil_bilinear(image: tf.Tensor, height, width) -> tf.Tensor:
    """uint8 -> uint8 resize as PIL's BILINEAR (triangle filter widened when downscaling:
    TF's antialiased bilinear), rounded to uint8 as PIL returns it."""
    resized = tf.image.resize(image, tf.stack([height, width]), "bilinear", antialias=True)
    return tf.saturate_cast(tf.round(resized), tf.uint8)


def vissl_view(image_bytes, resize: int, image_size: int, center_crop: bool = False):
    """VISSL's VOC07 transforms (torchvision on PIL images), uint8 [image_size, image_size, 3].

    Resize(resize): the shorter side to `resize`, the longer to int(resize * long / short)
    (torchvision's rule); then Resize([image_size, image_size]): the whole image, squashed
    to a square (VISSL's eval_resnet_8gpu_transfer_voc07_svm.yaml), or with center_crop a
    CenterCrop(image_size) instead (the config posted in facebookresearch/barlowtwins#32).
    JPEGs decode with the accurate integer DCT, as PIL's libjpeg does.
    """
    image = tf.cond(
        tf.io.is_jpeg(image_bytes),
        lambda: tf.io.decode_jpeg(image_bytes, channels=3, dct_method="INTEGER_ACCURATE"),
        lambda: tf.io.decode_image(image_bytes, channels=3, expand_animations=False),
    )
    image.set_shape([None, None, 3])
    hw = tf.shape(image)[:2]
    h, w = tf.cast(hw[0], tf.float64), tf.cast(hw[1], tf.float64)
    short = tf.minimum(h, w)
    longer = tf.cast(tf.floor(resize * tf.maximum(h, w) / short), tf.int32)
    new_h, new_w = tf.cond(h <= w, lambda: (resize, longer), lambda: (longer, resize))
    image = _pil_bilinear(image, new_h, new_w)
    if not center_crop:
        return _pil_bilinear(image, image_size, image_size)
    # torchvision's offsets: int(round((size - crop) / 2)), round half to even as tf.round
    top = tf.cast(tf.round(tf.cast(new_h - image_size, tf.float64) / 2), tf.int32)
    left = tf.cast(tf.round(tf.cast(new_w - image_size, tf.float64) / 2), tf.int32)
    return image[top : top + image_size, left : left + image_size]


def multilabel_batches(
    data_cfg,
    split: str,
    *,
    global_batch: int,
    image_size: int,
    resize: int = 256,
    center_crop: bool = False,
    label_key: str = "labels",
    positive_key: str = "labels_no_difficult",
    sort_by: str = "",
    process_index: int | None = None,
    process_count: int | None = None,
) -> EvalBatches:
    """One padded pass over `split` in vissl_view preprocessing ({"image", "label",
    "sort_key", "mask"} batches); sort_by "" (or absent from the dataset): zero sort keys."""
    index, count = resolve_processes(process_index, process_count)
    if global_batch % count:
        raise ValueError(f"global_batch={global_batch} is not divisible by {count} processes")
    local_batch = global_batch // count
    builder = source.open_builder(data_cfg.dataset, data_cfg.data_dir)
    classes = _class_count(builder, label_key)
    features = builder.info.features
    has_positive = bool(positive_key) and positive_key in features
    if sort_by and sort_by not in features:
        raise ValueError(
            f"dataset {builder.info.full_name} has no feature {sort_by!r} to sort by; its "
            f'features: {sorted(features.keys())} ("" keeps the stored order)'
        )

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
        image = vissl_view(example["image"], resize, image_size, center_crop)
        if sort_by:
            key = tf.io.decode_raw(example[sort_by], tf.uint8, fixed_length=SORT_KEY_BYTES)
        else:
            key = tf.zeros([SORT_KEY_BYTES], tf.uint8)
        return {
            "image": image,
            "label": tf.cast(label, tf.int8),
            "sort_key": key,
            "mask": tf.constant(True),
        }

    pad = {
        "image": tf.zeros([image_size, image_size, 3], tf.uint8),
        "label": tf.zeros([classes], tf.int8),
        "sort_key": tf.zeros([SORT_KEY_BYTES], tf.uint8),
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
