"""Labelled batches for kNN, linear evaluation and transfer, padded to equal counts."""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np
import tensorflow as tf

from bt_jax.data import augment, source
from bt_jax.data.config import linear_eval_view
from bt_jax.data.pipeline import SkipCounter, Streams, dataset_options, resolve_processes

_AUTOTUNE = tf.data.AUTOTUNE
_do_not_convert = tf.autograph.experimental.do_not_convert


class EvalBatches:
    """Iterable of host-local {"image": uint8, "label": int32, "mask": bool} batches.

    num_batches: batches per pass (per epoch with train_augment), the same on every process;
    num_examples: examples of the split (a pass covers each exactly once without
    train_augment); num_classes: of the ClassLabel; num_skipped: undecodable images.
    """

    def __init__(
        self,
        dataset,
        *,
        num_batches,
        num_examples,
        num_classes,
        local_examples,
        what,
        log_every,
        padded: bool,
    ):
        self.dataset, self.num_batches = dataset, num_batches
        self.num_examples, self.num_classes = num_examples, num_classes
        self._local_examples, self._padded = local_examples, padded
        self._skips = SkipCounter(log_every, what)

    @property
    def num_skipped(self) -> int:
        return self._skips.total

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        if not self._padded:
            for batch in self.dataset.as_numpy_iterator():
                yield self._skips(batch)
            return
        kept = 0
        for batch in self.dataset.as_numpy_iterator():
            kept += int(batch["mask"].sum())
            yield batch
        self._skips.total += self._local_examples - kept  # this pass's undecodable images
        self._skips.log()


def eval_batches(
    data_cfg,
    split: str,
    *,
    global_batch: int,
    image_size: int,
    process_index: int | None = None,
    process_count: int | None = None,
    train_augment: bool = False,
    seed: int = 0,
    epochs: int | None = None,
    start_step: int = 0,
    with_ids: bool = False,
) -> EvalBatches:
    """Labelled batches for kNN, linear evaluation and transfer.

    Without train_augment: one pass over `split` in stored order, each process reading a
    contiguous part; eval preprocessing (center crop data_cfg.eval_crop_fraction of the shorter
    side, resized to image_size: 224 from 256 at 0.875); the last batches are padded with
    mask=False so that every process yields num_batches batches.
    With train_augment: the linear-eval training preprocessing (RandomResizedCrop with
    data_cfg.linear_crop_area, bilinear, + flip), shuffled per epoch through the same streams
    as pretraining (data_cfg.num_streams), full batches only (mask all True), `epochs` epochs
    of num_batches steps (None: forever); start_step resumes.
    with_ids adds the TFDS "id" feature (b"" for padding). Raises ValueError if the dataset
    has no ClassLabel "label".
    """
    index, count = resolve_processes(process_index, process_count)
    if global_batch % count:
        raise ValueError(f"global_batch={global_batch} is not divisible by {count} processes")
    local_batch = global_batch // count
    what = f"{'train-augmented ' if train_augment else ''}eval {data_cfg.dataset}[{split}]"

    if train_augment:
        streams = Streams(
            data_cfg, split, global_batch=global_batch, process_index=index, process_count=count
        )
        classes = source.num_classes(streams.builder)
        view = linear_eval_view(image_size, data_cfg.linear_crop_area)

        def example_fn(record, key):
            image = augment.random_view(record["image"], key, view)
            return {"image": image, "label": record["label"], "mask": tf.constant(True)}

        dataset = streams.dataset(
            example_fn,
            seed=seed,
            start_step=start_step,
            with_label=True,
            with_ids=with_ids,
            epochs=epochs,
        )
        return EvalBatches(
            dataset,
            num_batches=streams.steps_per_epoch,
            num_examples=streams.num_examples,
            num_classes=classes,
            local_examples=None,
            what=what,
            log_every=data_cfg.log_skipped_every,
            padded=False,
        )

    builder = source.open_builder(data_cfg.dataset, data_cfg.data_dir)
    crop_fraction = data_cfg.eval_crop_fraction
    parse = source.record_parser(builder, True, with_ids)

    @_do_not_convert
    def preprocess(record):
        image = augment.eval_view(record["image"], image_size, crop_fraction)
        out = {"image": image, "label": record["label"], "mask": tf.constant(True)}
        if with_ids:
            out["id"] = record["id"]
        return out

    def to_examples(serialized):
        records = serialized.map(parse, num_parallel_calls=_AUTOTUNE)
        if data_cfg.cache:
            records = records.cache()
        return records.map(preprocess, num_parallel_calls=_AUTOTUNE, deterministic=True)

    pad = {
        "image": tf.zeros([image_size, image_size, 3], tf.uint8),
        "label": tf.constant(0, tf.int32),
        "mask": tf.constant(False),
    }
    if with_ids:
        pad["id"] = tf.constant(b"")
    return one_padded_pass(
        builder,
        split,
        data_cfg,
        to_examples=to_examples,
        pad=pad,
        num_classes=source.num_classes(builder),
        local_batch=local_batch,
        process_index=index,
        process_count=count,
        what=what,
    )


def one_padded_pass(
    builder,
    split: str,
    data_cfg,
    *,
    to_examples,
    pad: dict,
    num_classes: int,
    local_batch: int,
    process_index: int,
    process_count: int,
    what: str,
) -> EvalBatches:
    """One pass over `split` in stored order, process p reading the p-th contiguous part.

    to_examples maps the part's serialized records to example dicts with a "mask" of True;
    undecodable ones are dropped, and the end is padded with `pad` (mask False) so that every
    process yields the same number of batches and each example is counted exactly once.
    """
    slices = source.file_slices(builder, split)
    total = source.num_records(slices)
    bounds = source.even_bounds(total, process_count)
    num_batches = math.ceil(max(np.diff(bounds)) / local_batch) if total else 0
    lo, hi = bounds[process_index], bounds[process_index + 1]
    mine = source.cut(slices, lo, hi)
    if mine:
        examples = to_examples(source.read_slices(mine, cycle_length=1))
    else:
        examples = tf.data.Dataset.from_tensors(pad).take(0)
    dataset = (
        examples.ignore_errors()
        .concatenate(tf.data.Dataset.from_tensors(pad).repeat())  # pad (and replace skipped)
        .take(num_batches * local_batch)
        .batch(local_batch)
        .prefetch(data_cfg.prefetch)
        .with_options(dataset_options(data_cfg.threads))
    )
    return EvalBatches(
        dataset,
        num_batches=num_batches,
        num_examples=total,
        num_classes=num_classes,
        local_examples=hi - lo,
        what=what,
        log_every=data_cfg.log_skipped_every,
        padded=True,
    )
