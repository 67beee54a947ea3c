"""On-device normalisation: the pipeline ships uint8 images (4x fewer host-to-device bytes
than float32) and the jitted step turns them into ImageNet-standardised float32."""

from __future__ import annotations

import jax.numpy as jnp

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def normalize(images, dtype=jnp.float32):
    """uint8 [..., 3] in [0, 255] -> (x / 255 - mean) / std, as ToTensor + Normalize."""
    mean = jnp.asarray(IMAGENET_MEAN, jnp.float32) * 255.0
    inv_std = 1.0 / (jnp.asarray(IMAGENET_STD, jnp.float32) * 255.0)
    return ((images.astype(jnp.float32) - mean) * inv_std).astype(dtype)
