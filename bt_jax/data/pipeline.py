"""Host-local pretraining batches, identical on any number of processes.

Streams. The train split is cut into S contiguous parts ("streams"); process p of P reads the
streams s with s % P == p. Each stream shuffles its part once per epoch with a seed made of
(seed, stream, epoch) and yields mini-batches of global_batch / S examples; a process's batch
is its streams' k-th mini-batches concatenated (streams in ascending order). Every example's
augmentation is drawn from stateless ops keyed by (seed, stream, epoch, position in the
epoch). So the global batch at step k is the same set of examples with the same views for any
P dividing S, and resuming at `start_step` skips the consumed raw records without decoding.

Undecodable images are dropped after the decode (tf.data ignore_errors) and counted per
stream; they shift the later batches of their stream, so a resume that is told how many
each stream skipped (checkpoints record it) restarts each stream at its exact record.
"""

from __future__ import annotations

import collections
import contextlib
from collections.abc import Callable, Iterator, Sequence

import jax
import numpy as np
import tensorflow as tf
from absl import logging

from bt_jax.data import augment, source

# The input pipeline must never grab accelerator memory. (If TF was initialised already, the
# caller made its own choice: RuntimeError.)
with contextlib.suppress(RuntimeError):
    tf.config.set_visible_devices([], "GPU")

_AUTOTUNE = tf.data.AUTOTUNE
_do_not_convert = tf.autograph.experimental.do_not_convert  # plain TF ops: no autograph


def resolve_processes(process_index, process_count) -> tuple[int, int]:
    index = jax.process_index() if process_index is None else process_index
    count = jax.process_count() if process_count is None else process_count
    if not 0 <= index < count:
        raise ValueError(f"process_index {index} is not in [0, process_count={count})")
    return index, count


def dataset_options(threads: int) -> tf.data.Options:
    options = tf.data.Options()
    options.deterministic = True
    options.threading.max_intra_op_parallelism = 1  # parallelism across examples, not ops
    if threads:
        options.threading.private_threadpool_size = threads
    return options


def _fold(key, *values) -> tf.Tensor:
    """A [2] int64 stateless-RNG key derived from `key` (or an int seed) and the values."""
    if isinstance(key, int):
        key = tf.constant([0, key], tf.int64)
    for value in values:
        key = tf.random.experimental.stateless_fold_in(key, tf.cast(value, tf.int64))
    return key


def _int_seed(key) -> tf.Tensor:
    """A scalar int64 seed (for Dataset.shuffle) from a [2] key."""
    return tf.random.stateless_uniform([], key, minval=None, maxval=None, dtype=tf.int64)


class Streams:
    """The split cut into S contiguous streams; this process's ones, batched and zipped."""

    def __init__(self, data_cfg, split, *, global_batch, process_index, process_count):
        self.cfg = data_cfg
        self.builder = source.open_builder(data_cfg.dataset, data_cfg.data_dir)
        self.slices = source.file_slices(self.builder, split)
        self.num_examples = source.num_records(self.slices)
        num = data_cfg.num_streams or process_count
        if num % process_count:
            raise ValueError(
                f"num_streams={num} must be a multiple of the process count {process_count} "
                f"(each process reads num_streams / process_count streams); use e.g. "
                f"{process_count * max(1, round(num / process_count))} or 0 (= process count)"
            )
        if global_batch % num:
            raise ValueError(
                f"global_batch={global_batch} must be divisible by num_streams={num} "
                "(each stream yields global_batch / num_streams examples per step)"
            )
        self.num_streams, self.mini_batch = num, global_batch // num
        self.bounds = source.even_bounds(self.num_examples, num)
        sizes = np.diff(self.bounds)
        self.steps_per_epoch = int(sizes.min()) // self.mini_batch
        if self.steps_per_epoch == 0:
            raise ValueError(
                f"split {split!r} of {data_cfg.dataset} has {self.num_examples} examples: too "
                f"few for one step of {global_batch} ({num} streams of >= {self.mini_batch})"
            )
        self.mine = [s for s in range(num) if s % process_count == process_index]

    def _raw_epoch(self, stream: int, records, seed, epoch) -> tf.data.Dataset:
        """One epoch of a stream's raw records, shuffled with the (seed, stream, epoch) key."""
        key = _fold(seed, stream, epoch)
        if records is not None:  # in memory: a full permutation of the stream
            size = tf.shape(records["image"], out_type=tf.int64)[0]
            order = tf.random.experimental.stateless_shuffle(tf.range(size), _fold(key, 1))
            return tf.data.Dataset.from_tensor_slices(order).map(
                _do_not_convert(lambda i: {k: tf.gather(v, i) for k, v in records.items()})
            )
        slices = source.cut(self.slices, self.bounds[stream], self.bounds[stream + 1])
        order = tf.random.experimental.stateless_shuffle(tf.range(len(slices)), _fold(key, 2))
        buffer = max(1, self.cfg.shuffle_buffer // len(self.mine))
        raw = source.read_slices(slices, order=order, cycle_length=self.cfg.file_cycle_length)
        shuffled = raw.shuffle(buffer, seed=_int_seed(_fold(key, 3)))
        return shuffled.map(self.parse, num_parallel_calls=_AUTOTUNE, deterministic=True)

    def dataset(
        self,
        example_fn: Callable,
        *,
        seed: int,
        start_step: int,
        with_label: bool,
        with_ids: bool = False,
        epochs: int | None = None,
        skipped_before: Sequence[int] = (),
    ) -> tf.data.Dataset:
        """Zipped per-process batches of example_fn(record, key) -> dict, plus "skipped"
        (int32 per example: the undecodable records dropped just before it) and, with_ids,
        the examples' "id" feature.

        skipped_before[s]: the undecodable records stream s skipped in steps 1..start_step
        (the sums of their "skipped"); the stream then resumes at the raw record after the
        last one used, exactly, corrupt data or not. Without it, at start_step * mini_batch.
        """
        self.parse = source.record_parser(self.builder, with_label, with_ids)
        per_epoch = self.steps_per_epoch * self.mini_batch
        last_epoch = 2**62 if epochs is None else epochs

        def stream_dataset(stream: int) -> tf.data.Dataset:
            skipped = skipped_before[stream] if skipped_before else 0
            position = start_step * self.mini_batch + skipped  # raw records already used
            start_epoch, start_offset = divmod(position, per_epoch)
            records = None
            if self.cfg.cache:
                stream_slices = source.cut(
                    self.slices, self.bounds[stream], self.bounds[stream + 1]
                )
                records = source.load_in_memory(stream_slices, self.parse)

            @_do_not_convert
            def epoch_records(epoch):
                # Drop the epoch's remainder and, on resume, the consumed records: undecoded.
                raw = self._raw_epoch(stream, records, seed, epoch).take(per_epoch).enumerate()
                first = tf.where(epoch == start_epoch, tf.constant(start_offset, tf.int64), 0)
                return raw.skip(first).map(lambda i, r: (epoch, i, r))

            @_do_not_convert
            def make_example(epoch, position, record):
                out = example_fn(record, _fold(seed, stream, epoch, position))
                if with_ids:
                    out["id"] = record["id"]
                out["index"] = epoch * per_epoch + position  # raw-record index since epoch 0
                return out

            @_do_not_convert
            def count_skipped(last_index, example):
                index = example.pop("index")
                example["skipped"] = tf.cast(index - last_index - 1, tf.int32)
                return index, example

            epochs_ds = tf.data.Dataset.range(start_epoch, last_epoch)
            return (
                epochs_ds.flat_map(epoch_records)
                .map(make_example, num_parallel_calls=_AUTOTUNE, deterministic=True)
                .ignore_errors()
                .scan(tf.constant(position - 1, tf.int64), count_skipped)
                .batch(self.mini_batch, drop_remainder=True)
            )

        streams = tuple(stream_dataset(s) for s in self.mine)
        zipped = tf.data.Dataset.zip(streams).map(
            _do_not_convert(
                lambda *parts: tf.nest.map_structure(lambda *x: tf.concat(x, 0), *parts)
            )
        )
        if epochs is not None:
            zipped = zipped.take(max(0, epochs * self.steps_per_epoch - start_step))
        return zipped.prefetch(self.cfg.prefetch).with_options(dataset_options(self.cfg.threads))


class SkipCounter:
    """Sums the "skipped" counts of batches and logs them every `every` batches."""

    def __init__(self, every: int, what: str):
        self.total, self.every, self.what, self._batches, self._logged = 0, every, what, 0, 0

    def __call__(self, batch: dict) -> dict:
        self.total += int(batch.pop("skipped").sum())
        self._batches += 1
        if self.total > self._logged and (self._batches % self.every == 0):
            self.log()
        return batch

    def log(self) -> None:
        if self.total > self._logged:
            logging.warning("%s: skipped %d undecodable images so far", self.what, self.total)
            self._logged = self.total


class PretrainBatches:
    """Iterable of host-local {"view1", "view2"[, "label"]} batches, forever (see
    pretrain_batches).

    Attributes: steps_per_epoch, num_streams, local_streams (this process's), num_examples
    (of the split), num_classes (of the dataset's ClassLabel "label", whose values then go
    with the views; 0 for unlabelled data), local_batch, start_step, num_skipped
    (undecodable images skipped so far),
    skipped_per_batch (a deque: for each batch yielded, in order, an int64[num_streams] of
    the undecodable images each stream dropped to fill it, zero for other processes'
    streams; a consumer that pops one per batch it uses counts exactly, however far ahead
    batches are prefetched). The tf.data pipeline is built on first iteration.
    """

    def __init__(
        self,
        streams: Streams,
        views_cfg,
        *,
        seed: int,
        start_step: int,
        local_batch: int,
        with_ids: bool,
        skipped_before: Sequence[int] = (),
    ):
        self._streams, self._views_cfg, self._seed, self._with_ids = (
            streams,
            views_cfg,
            seed,
            with_ids,
        )
        self.start_step, self._skipped_before = start_step, tuple(skipped_before)
        self.steps_per_epoch = streams.steps_per_epoch
        self.num_streams, self.local_streams = streams.num_streams, streams.mine
        self.num_examples, self.local_batch = streams.num_examples, local_batch
        labelled = source.has_label(streams.builder)
        self.num_classes = source.num_classes(streams.builder) if labelled else 0
        self._dataset = None
        self._skips = SkipCounter(streams.cfg.log_skipped_every, f"pretrain {streams.cfg.dataset}")
        self.skipped_per_batch = collections.deque(maxlen=1024)  # >> any prefetch depth

    def resumed_at(self, step: int, skipped_before: Sequence[int] = ()) -> PretrainBatches:
        """The same batches from step `step` on (nothing is read until iterated);
        skipped_before: per stream, the undecodable images skipped in steps 1..step."""
        return PretrainBatches(
            self._streams,
            self._views_cfg,
            seed=self._seed,
            start_step=step,
            local_batch=self.local_batch,
            with_ids=self._with_ids,
            skipped_before=skipped_before,
        )

    @property
    def dataset(self) -> tf.data.Dataset:
        if self._dataset is None:
            views_cfg, labelled = self._views_cfg, self.num_classes > 0

            def example_fn(record, key):
                views = augment.two_views(record["image"], key, views_cfg)
                return {**views, "label": record["label"]} if labelled else views

            self._dataset = self._streams.dataset(
                example_fn,
                seed=self._seed,
                start_step=self.start_step,
                with_label=labelled,
                with_ids=self._with_ids,
                skipped_before=self._skipped_before,
            )
        return self._dataset

    @property
    def num_skipped(self) -> int:
        return self._skips.total

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        mini_batch = self._streams.mini_batch
        for batch in self.dataset.as_numpy_iterator():
            per_stream = np.zeros(self.num_streams, np.int64)
            local = batch["skipped"].reshape(len(self.local_streams), mini_batch).sum(1)
            per_stream[self.local_streams] = local  # streams are concatenated in order
            self.skipped_per_batch.append(per_stream)
            yield self._skips(batch)


def pretrain_batches(
    data_cfg,
    views_cfg,
    *,
    global_batch: int,
    seed: int,
    start_step: int = 0,
    process_index: int | None = None,
    process_count: int | None = None,
    with_ids: bool = False,
    skipped_before: Sequence[int] = (),
) -> PretrainBatches:
    """Two augmented views per image, host-local batches of global_batch / process_count.

    data_cfg: `config.data_config(...)`; views_cfg: `imagenet_views()` / `cifar_views()`.
    Yields {"view1": uint8[B, H, W, 3], "view2": uint8[B, H, W, 3]} forever, and "label"
    (int32[B], for the online linear probe) when the dataset has a ClassLabel "label"; the
    batch at step k (counting from 0, over epochs of `.steps_per_epoch`) depends only on the
    dataset, seed, num_streams and k (the label is read from the same record, so the views
    are those of an unlabelled read). start_step resumes at step start_step exactly (with
    undecodable images in the data, given skipped_before: per stream, the sums of the
    `.skipped_per_batch` of steps 1..start_step, as checkpoints record them). process_index /
    process_count default to jax's; pass them to simulate processes. with_ids adds the
    examples' TFDS "id" feature (bytes[B]), for debugging and tests. With
    views_cfg.pixel_ops == "device" the views are only cropped, resized and flipped, and
    "view1_ops" / "view2_ops" (float32[B, 13]) go with them: the train step finishes them
    with `bt_jax.data.device_ops.finish_views(batch, views_cfg, stats)`.
    """
    index, count = resolve_processes(process_index, process_count)
    if global_batch % count:
        raise ValueError(f"global_batch={global_batch} is not divisible by {count} processes")
    streams = Streams(
        data_cfg,
        data_cfg.train_split,
        global_batch=global_batch,
        process_index=index,
        process_count=count,
    )
    return PretrainBatches(
        streams,
        views_cfg,
        seed=seed,
        start_step=start_step,
        local_batch=global_batch // count,
        with_ids=with_ids,
        skipped_before=skipped_before,
    )
