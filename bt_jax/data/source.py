"""Raw records of a TFDS split: which dataset, which files, which contiguous part.

Nothing here decodes an image: records are read as serialized examples and parsed with the
image left as encoded bytes (tfds.decode.SkipDecoding), so that shuffling, sharding and
resuming only move bytes, and decoding happens once, fused with the random crop.
"""

from __future__ import annotations

import difflib
import os
from typing import NamedTuple

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from bt_jax.data.config import EMBEDDED_DATA_DIR, EMBEDDED_DATASETS


class FileSlice(NamedTuple):
    """Records [skip, skip + take) of one TFRecord file."""

    filename: str
    skip: int
    take: int


def resolve_data_dir(dataset: str, data_dir: str) -> str | None:
    """data_dir as tfds.builder takes it: as given; when "" (unset), the package's own copy
    for an embedded dataset and None (TFDS's default folder) for any other."""
    if not data_dir and dataset.split("/")[0] in EMBEDDED_DATASETS:
        return EMBEDDED_DATA_DIR
    return data_dir or None


def _prepared_in(data_dir: str | None) -> list[str]:
    """Names of the datasets prepared under data_dir (folders holding a version with info)."""
    root = data_dir or os.path.expanduser(os.environ.get("TFDS_DATA_DIR", "~/tensorflow_datasets"))
    found = []
    for info in tf.io.gfile.glob(os.path.join(root, "*", "*", "dataset_info.json")):
        found.append(info[len(root) :].strip("/").split("/")[0])
    for info in tf.io.gfile.glob(os.path.join(root, "*", "*", "*", "dataset_info.json")):
        found.append("/".join(info[len(root) :].strip("/").split("/")[:2]))
    return sorted(set(found))


def open_builder(dataset: str, data_dir: str):
    """The TFDS builder of a prepared dataset, or a ValueError naming what exists."""
    data_dir = resolve_data_dir(dataset, data_dir)
    where = data_dir or "the TFDS default data_dir"
    try:
        builder = tfds.builder(dataset, data_dir=data_dir)
    except Exception as e:  # DatasetNotFoundError, bad config names, ...
        prepared = _prepared_in(data_dir)
        close = difflib.get_close_matches(dataset, prepared + tfds.list_builders(), n=5)
        raise ValueError(
            f"unknown TFDS dataset {dataset!r} in {where}. Prepared there: {prepared or 'none'}. "
            f"Close names: {close or 'none'}. ({type(e).__name__}: {str(e).splitlines()[0]})"
        ) from None
    if not builder.is_prepared():
        prepared = _prepared_in(data_dir)
        raise ValueError(
            f"TFDS dataset {dataset!r} is not prepared in {where} (looked for {builder.data_dir}). "
            f"Prepared there: {prepared or 'none'}. Prepare it with `tfds build {dataset} "
            "--data_dir=...` (ImageNet needs the manual download) or set data_dir."
        )
    return builder


def file_slices(builder, split: str) -> list[FileSlice]:
    """The files and record ranges of a split string ("train", "train[:10%]", ...)."""
    try:
        instructions = builder.info.splits[split].file_instructions
    except (KeyError, ValueError) as e:
        raise ValueError(
            f"unknown split {split!r} of {builder.info.full_name}: it has "
            f"{sorted(builder.info.splits.keys())} ({e})"
        ) from None
    return [FileSlice(i.filename, int(i.skip), int(i.take)) for i in instructions]


def num_records(slices: list[FileSlice]) -> int:
    return sum(s.take for s in slices)


def cut(slices: list[FileSlice], start: int, stop: int) -> list[FileSlice]:
    """Records [start, stop) of the concatenation of `slices`, as file slices."""
    out, offset = [], 0
    for s in slices:
        lo, hi = max(start, offset), min(stop, offset + s.take)
        if lo < hi:
            out.append(FileSlice(s.filename, s.skip + lo - offset, hi - lo))
        offset += s.take
    return out


def even_bounds(total: int, parts: int) -> list[int]:
    """Boundaries of `parts` contiguous ranges of sizes differing by at most one."""
    return [total * i // parts for i in range(parts + 1)]


def read_slices(slices: list[FileSlice], *, order=None, cycle_length: int = 16) -> tf.data.Dataset:
    """Serialized records of the slices, files in `order` (a tensor of indices) if given.

    Files are interleaved record by record (cycle_length at a time), deterministically.
    """
    filenames = tf.constant([s.filename for s in slices])
    skips = tf.constant([s.skip for s in slices], tf.int64)
    takes = tf.constant([s.take for s in slices], tf.int64)
    if order is not None:
        filenames, skips, takes = (tf.gather(t, order) for t in (filenames, skips, takes))
    files = tf.data.Dataset.from_tensor_slices((filenames, skips, takes))
    return files.interleave(
        lambda f, skip, take: tf.data.TFRecordDataset(f, buffer_size=1 << 20).skip(skip).take(take),
        cycle_length=max(1, min(cycle_length, len(slices))),
        block_length=1,
        num_parallel_calls=tf.data.AUTOTUNE,
        deterministic=True,
    )


def has_label(builder) -> bool:
    features = builder.info.features
    return "label" in features and isinstance(features["label"], tfds.features.ClassLabel)


def num_classes(builder) -> int:
    if not has_label(builder):
        raise ValueError(
            f"dataset {builder.info.full_name} has no ClassLabel feature 'label' (features: "
            f"{sorted(builder.info.features.keys())}); evaluation needs labels"
        )
    return builder.info.features["label"].num_classes


def record_parser(builder, with_label: bool, with_id: bool = False):
    """serialized example -> {"image": encoded bytes[, "label": int32][, "id": string]}."""
    features = builder.info.features
    if "image" not in features:
        raise ValueError(
            f"dataset {builder.info.full_name} has no 'image' feature "
            f"(features: {sorted(features.keys())})"
        )
    if with_label:
        num_classes(builder)  # raises a clear error without labels
    if with_id and "id" not in features:
        raise ValueError(f"dataset {builder.info.full_name} has no 'id' feature")
    decoders = {"image": tfds.decode.SkipDecoding()}

    def parse(serialized):
        example = features.deserialize_example(serialized, decoders=decoders)
        out = {"image": example["image"]}
        if with_label:
            out["label"] = tf.cast(example["label"], tf.int32)
        if with_id:
            out["id"] = example["id"]
        return out

    return parse


def load_in_memory(slices: list[FileSlice], parse) -> dict[str, tf.Tensor]:
    """Every record of `slices`, parsed (images still encoded), as tensors in file order."""
    columns: dict[str, list] = {}
    dataset = read_slices(slices).map(parse, num_parallel_calls=tf.data.AUTOTUNE)
    for batch in dataset.batch(4096).as_numpy_iterator():
        for key, value in batch.items():
            columns.setdefault(key, []).append(value)
    return {k: tf.constant(np.concatenate(v)) for k, v in columns.items()}
