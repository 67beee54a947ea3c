"""On-device image maths (run inside the jitted step; no TensorFlow): the views' pixel
operations for pixel_ops="device", and their normalisation.

The pipeline ships uint8 images (4x fewer host-to-device bytes than float32) and the step
turns them into floats standardised with the run's statistics (normalization.py).

With pixel_ops="device" the host pipeline only decodes, crops, resizes and flips (uint8), and
ships each view's draws as float32[13] ("view1_ops", "view2_ops";
augment.pack_device_params). Same maths as bt_jax/data/augment.py (torchvision semantics);
tests/test_augment.py checks the two agree.

    view1, view2 = finish_views(batch, config.augment, stats)   # normalised float32, in the step
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from bt_jax.data.config import blur_taps
from bt_jax.data.normalization import Normalization, normalize

_LUMA = jnp.array([0.299, 0.587, 0.114], jnp.float32)
_HUE_OFFSETS = jnp.array([5.0, 3.0, 1.0], jnp.float32)  # HSV -> RGB: k = (n + 6h) mod 6


def _unpack(ops):
    """float32[B, 13] -> dict of [B, 1, 1, 1] columns (layout of augment.DEVICE_PARAMS)."""
    column = lambda i: ops[:, i][:, None, None, None]
    return {
        "jitter": column(0) > 0.5,
        "brightness": column(1),
        "contrast": column(2),
        "saturation": column(3),
        "hue": column(4),
        "jitter_order": [ops[:, 5 + k].astype(jnp.int32)[:, None, None, None] for k in range(4)],
        "grayscale": column(9) > 0.5,
        "blur": column(10) > 0.5,
        "blur_sigma": ops[:, 11],
        "solarize": column(12) > 0.5,
    }


def _luma(x):
    return jnp.sum(x * _LUMA, axis=-1, keepdims=True)


def _blend(x, factor, reference):
    return jnp.clip(factor * x + (1.0 - factor) * reference, 0.0, 1.0)


def adjust_hue(x, delta):
    """Rotate the HSV hue by delta turns (= tf.image.adjust_hue), elementwise."""
    high, low = x.max(-1, keepdims=True), x.min(-1, keepdims=True)
    chroma = high - low
    r, g, b = x[..., :1], x[..., 1:2], x[..., 2:]
    inv = jnp.where(chroma > 0, 1.0 / jnp.where(chroma > 0, chroma, 1.0), 0.0)
    sector = jnp.where(
        r >= high, (g - b) * inv, jnp.where(g >= high, 2.0 + (b - r) * inv, 4.0 + (r - g) * inv)
    )
    k = jnp.mod(_HUE_OFFSETS + sector + 6.0 * delta, 6.0)
    return jnp.clip(high - chroma * jnp.clip(jnp.minimum(k, 4.0 - k), 0.0, 1.0), 0.0, 1.0)


def _color_jitter(x, p):
    """Per example, the four ops in its own order: each position selects among the four."""
    for order in p["jitter_order"]:
        candidates = (
            jnp.minimum(x * p["brightness"], 1.0),
            _blend(x, p["contrast"], jnp.mean(_luma(x), axis=(1, 2, 3), keepdims=True)),
            _blend(x, p["saturation"], _luma(x)),
            adjust_hue(x, p["hue"]),
        )
        x = jnp.select([order == i for i in range(4)], candidates)
    return x


def _gaussian_blur(x, sigma, kernel_size: int):
    """Separable blur of [B, H, W, 3] with one sigma per example; zero padding with the
    kernel renormalised at the borders (as augment.gaussian_blur)."""
    radius = kernel_size // 2
    t = jnp.arange(-radius, radius + 1, dtype=jnp.float32)
    kernel = jnp.exp(-(t**2) / (2.0 * sigma[:, None] ** 2))
    kernel = kernel / kernel.sum(-1, keepdims=True)  # [B, taps]

    def blur_axis(y, axis):  # axis 1 (height) or 2 (width)
        length = y.shape[axis]
        pad = [(0, 0)] * 4
        pad[axis] = (radius, radius)
        padded, ones = jnp.pad(y, pad), jnp.pad(jnp.ones(length), (radius, radius))
        shape = [-1, 1, 1, 1]
        out, mass = 0.0, 0.0
        for i in range(kernel_size):
            weight = kernel[:, i].reshape(shape)
            out = out + weight * jax.lax.slice_in_dim(padded, i, i + length, axis=axis)
            line = [1, 1, 1, 1]
            line[axis] = length
            mass = mass + weight * ones[i : i + length].reshape(line)
        return out / mass

    return blur_axis(blur_axis(x, 1), 2)


def apply_pixel_ops(images, ops, view):
    """uint8 [B, H, W, 3] crops (resized, flipped) + float32 [B, 13] draws -> float [0, 1].

    Batched with per-example parameters and selects (no vmap of conditionals), so it runs
    under explicitly sharded batches.
    """
    p = _unpack(ops)
    x = images.astype(jnp.float32) / 255.0
    if view.jitter_prob > 0:
        x = jnp.where(p["jitter"], _color_jitter(x, p), x)
    if view.grayscale_prob > 0:
        x = jnp.where(p["grayscale"], jnp.broadcast_to(_luma(x), x.shape), x)
    if view.blur_prob > 0:
        x = jnp.where(p["blur"], _gaussian_blur(x, p["blur_sigma"], blur_taps(view)), x)
    if view.solarize_prob > 0:
        x = jnp.where(p["solarize"], jnp.minimum(x, 1.0 - x), x)
    return x


def finish_view(images, ops, view, stats: Normalization, dtype=jnp.float32):
    """A batch uint8 [B, H, W, 3] + float32 [B, 13] -> normalised [B, H, W, 3] for the model."""
    x = apply_pixel_ops(images, ops, view)
    return normalize(jnp.round(x * 255.0), stats, dtype)  # the host path's uint8 rounding


def finish_views(batch, views_cfg, stats: Normalization, dtype=jnp.float32):
    """(view1, view2), normalised with `stats`; with pixel_ops="device" the colour ops,
    blur and solarize are applied first."""
    if views_cfg.get("pixel_ops", "host") != "device":
        return tuple(normalize(batch[name], stats, dtype) for name in ("view1", "view2"))
    return tuple(
        finish_view(batch[name], batch[f"{name}_ops"], views_cfg[name], stats, dtype)
        for name in ("view1", "view2")
    )
