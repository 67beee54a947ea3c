"""Input normalisation: the per-channel mean/std a backbone's inputs are standardised with.

    x = (pixels / 255 - mean) / std          # ToTensor + Normalize, on the device

config.model.normalization names a preset, or "auto": the dataset's name picks one (cifar*
-> "cifar10", anything else -> "imagenet"). Presets:
- "imagenet": torchvision's ImageNet statistics (0.485, 0.456, 0.406) / (0.229, 0.224, 0.225),
  what the official Barlow Twins code, torchvision and timm weights use;
- "cifar10": the per-channel mean and standard deviation over every pixel of the 50,000
  CIFAR-10 training images (original PNG pixels / 255), as solo-learn and most CIFAR code
  normalise: (0.4914, 0.4822, 0.4465) / (0.2470, 0.2435, 0.2616). The JPEG copies here
  (cifar10_jpeg) measure (0.4868, 0.4822, 0.4414) / (0.2451, 0.2425, 0.2605): JPEG's chroma
  subsampling moves the red and blue means by 0.005. CIFAR-100 and other cifar* sets take
  CIFAR-10's (CIFAR-100's own differ by < 0.02).

The statistics belong to the backbone, not to whatever data it is later shown: the train
step, the kNN monitor and the evaluation jobs all normalise with the pretraining run's
(recorded in its checkpoint's config), so a CIFAR-pretrained backbone transferred to
another dataset still sees inputs standardised as in its training. TensorFlow-free.
"""

from __future__ import annotations

from typing import NamedTuple

import jax.numpy as jnp


class Normalization(NamedTuple):
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


PRESETS = {
    "imagenet": Normalization((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "cifar10": Normalization((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
}
IMAGENET = PRESETS["imagenet"]
CHOICES = ("auto", *PRESETS)


def preset_for(dataset: str) -> str:
    """The preset "auto" picks for a TFDS dataset name: "cifar10" for cifar*, else "imagenet"."""
    return "cifar10" if dataset.split("/")[0].startswith("cifar") else "imagenet"


def resolve(name: str, dataset: str) -> str:
    """A preset name: `name` itself, or for "auto" the one `dataset`'s name selects."""
    if name not in CHOICES:
        raise ValueError(f"unknown normalization {name!r}; choose one of {', '.join(CHOICES)}")
    return preset_for(dataset) if name == "auto" else name


def preset_of(config) -> str:
    """The preset a pretraining config (a ConfigDict or a checkpoint's saved to_dict())
    trains with. A checkpoint written before the field existed trained with ImageNet's
    (the one normalisation there was), so a missing field means "imagenet"."""
    return resolve(config["model"].get("normalization", "imagenet"), config["data"]["dataset"])


def of_config(config) -> Normalization:
    """The statistics of a pretraining config (see preset_of)."""
    return PRESETS[preset_of(config)]


def normalize(images, stats: Normalization, dtype=jnp.float32):
    """uint8 [..., 3] in [0, 255] -> (x / 255 - mean) / std, as ToTensor + Normalize."""
    mean = jnp.asarray(stats.mean, jnp.float32) * 255.0
    inv_std = 1.0 / (jnp.asarray(stats.std, jnp.float32) * 255.0)
    return ((images.astype(jnp.float32) - mean) * inv_std).astype(dtype)
