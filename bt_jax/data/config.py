"""Config presets of the input pipeline: where the data is, and the two augmented views."""

from __future__ import annotations

import math
import os

import ml_collections

# The quickstart set shipped inside the package (cifar10_jpeg_mini, 5,000 / 1,000 images).
EMBEDDED_DATA_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "embedded")
EMBEDDED_DATASETS = ("cifar10_jpeg_mini",)

# The held-out split of datasets we know; any other dataset defaults to "test".
_EVAL_SPLITS = {
    "imagenet2012": "validation",
    "imagenet2012_subset": "validation",
    "imagenet2012_real": "validation",
    "imagewoof320_sample": "val",
    "places365_small": "validation",
    "voc": "validation",
}


def is_small(dataset: str) -> bool:
    """CIFAR-sized sets: 32 px images, raw records cached in memory, no eval crop."""
    return dataset.split("/")[0].startswith(("cifar", "svhn", "stl10"))


def data_config(dataset: str = "imagenet2012", **overrides) -> ml_collections.ConfigDict:
    """Where the data is and how it is read; keyword overrides replace any field.

    dataset: TFDS name, optionally with a config ("imagenet2012_subset/1pct").
    data_dir: TFDS data folder (a local path or gs://...); "" = TFDS's default (its
      TFDS_DATA_DIR, else ~/tensorflow_datasets), and for the embedded cifar10_jpeg_mini the
      package's own copy.
    train_split / eval_split: any TFDS split string ("train", "train[:90%]", ...).
    shuffle_buffer: raw (undecoded) records held for shuffling, per process, shared by its
      streams; unused with cache=True (then every epoch is a full permutation).
    num_streams: S, the number of contiguous parts the train split is cut into; process p of
      P reads parts s with s % P == p. The global batch at a step depends on S and the seed,
      never on P, so fix S (a multiple of every process count you will use) to make runs on
      different numbers of processes identical. 0 = the process count.
    cache: hold the split's raw records in memory (small datasets).
    threads: tf.data's private thread pool size; 0 = TF's default (all cores, autotuned).
    prefetch: host batches prepared ahead.
    file_cycle_length: files read concurrently per stream (interleaved) without cache.
    eval_crop_fraction: eval center crop as a fraction of the shorter side (224/256).
    linear_crop_area: area range of the linear-eval training RandomResizedCrop.
    log_skipped_every: log the count of undecodable images skipped every this many steps.
    """
    name = dataset.split("/")[0]
    small = is_small(dataset)
    cfg = ml_collections.ConfigDict(
        dict(
            dataset=dataset,
            data_dir="",
            train_split="train",
            eval_split=_EVAL_SPLITS.get(name, "test"),
            shuffle_buffer=50_000 if small else 10_000,
            num_streams=0,
            cache=small,
            threads=0,
            prefetch=2,
            file_cycle_length=16,
            eval_crop_fraction=1.0 if small else 0.875,
            linear_crop_area=(0.08, 1.0),
            log_skipped_every=1000,
        )
    )
    cfg.update(overrides)
    return cfg


def view_config(image_size: int = 224, **overrides) -> ml_collections.ConfigDict:
    """One view with the BYOL / official Barlow Twins parameters at `image_size`.

    blur_kernel_size is 10 % of the image size, made odd (23 at 224), as BYOL; `blur_taps`
    drops the taps beyond 3 sigma_max, which carry < 0.3 % of the weight. resize_method is
    bicubic as the official RandomResizedCrop; antialias=False keeps TF's plain bicubic
    (PIL's bicubic filters with a wider support when shrinking).
    """
    kernel = int(0.1 * image_size) // 2 * 2 + 1
    cfg = ml_collections.ConfigDict(
        dict(
            image_size=image_size,
            crop_area=(0.08, 1.0),
            crop_aspect=(3 / 4, 4 / 3),
            resize_method="bicubic",
            antialias=False,
            flip_prob=0.5,
            jitter_prob=0.8,
            brightness=0.4,
            contrast=0.4,
            saturation=0.2,
            hue=0.1,
            grayscale_prob=0.2,
            blur_prob=1.0,
            blur_sigma=(0.1, 2.0),
            blur_kernel_size=kernel,
            solarize_prob=0.0,
        )
    )
    cfg.update(overrides)
    return cfg


def imagenet_views(image_size: int = 224, pixel_ops: str = "host") -> ml_collections.ConfigDict:
    """The asymmetric pair: view 1 always blurred, never solarized; view 2 rarely / sometimes.

    pixel_ops: "host" = the pipeline delivers finished views (normalize() them on the
    device); "device" = the host only decodes, crops, resizes and flips, and the train step
    finishes the views with `bt_jax.data.device_ops.finish_views` (jitter, grayscale, blur,
    solarize, normalise on the accelerator: ~3x less host CPU per image, docs/benchmarks.md).
    """
    return ml_collections.ConfigDict(
        dict(
            view1=view_config(image_size, blur_prob=1.0, solarize_prob=0.0),
            view2=view_config(image_size, blur_prob=0.1, solarize_prob=0.2),
            pixel_ops=pixel_ops,
        )
    )


def cifar_views(image_size: int = 32, pixel_ops: str = "host") -> ml_collections.ConfigDict:
    """The CIFAR preset: as ImageNet's but 32 px and no blur (pixel_ops: see imagenet_views)."""
    return ml_collections.ConfigDict(
        dict(
            view1=view_config(image_size, blur_prob=0.0, solarize_prob=0.0),
            view2=view_config(image_size, blur_prob=0.0, solarize_prob=0.2),
            pixel_ops=pixel_ops,
        )
    )


def linear_eval_view(image_size: int = 224, crop_area=(0.08, 1.0)) -> ml_collections.ConfigDict:
    """Linear-eval training preprocessing: RandomResizedCrop (bilinear, as torchvision's
    default) + flip, no colour ops."""
    return view_config(
        image_size,
        crop_area=tuple(crop_area),
        resize_method="bilinear",
        jitter_prob=0.0,
        grayscale_prob=0.0,
        blur_prob=0.0,
        solarize_prob=0.0,
    )


def blur_taps(view) -> int:
    """Taps of the blur kernel actually applied: blur_kernel_size, cut to 3 sigma_max each
    side (13 instead of 23 for sigma <= 2: same result to 0.3 %, 1.8x faster on CPU)."""
    return min(view.blur_kernel_size, 2 * math.ceil(3 * view.blur_sigma[1]) + 1)
