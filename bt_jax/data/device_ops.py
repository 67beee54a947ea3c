"""The views' pixel operations in jnp, for pixel_ops="device" (run inside the jitted step).

The host pipeline then only decodes, crops, resizes and flips (uint8), and ships each view's
draws as float32[13] ("view1_ops", "view2_ops"; augment.pack_device_params). Same maths as
bt_jax/data/augment.py (torchvision semantics); tests/test_augment.py checks the two agree.

    view1, view2 = finish_views(batch, config.augment)    # normalised float32, in the step
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from bt_jax.data.config import blur_taps
from bt_jax.data.normalize import normalize

_LUMA = jnp.array([0.299, 0.587, 0.114], jnp.float32)
_HUE_OFFSETS = jnp.array([5.0, 3.0, 1.0], jnp.float32)  # HSV -> RGB: k = (n + 6h) mod 6


def _unpack(ops):
    """float32[13] -> dict (layout of augment.DEVICE_PARAMS)."""
    return {
        "jitter": ops[0] > 0.5,
        "factors": ops[1:4],  # brightness, contrast, saturation
        "hue": ops[4],
        "jitter_order": ops[5:9].astype(jnp.int32),
        "grayscale": ops[9] > 0.5,
        "blur": ops[10] > 0.5,
        "blur_sigma": ops[11],
        "solarize": ops[12] > 0.5,
    }


def _luma(x):
    return (x @ _LUMA)[..., None]


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
    brightness, contrast, saturation = p["factors"][0], p["factors"][1], p["factors"][2]
    ops = (
        lambda y: jnp.minimum(y * brightness, 1.0),
        lambda y: _blend(y, contrast, jnp.mean(_luma(y))),
        lambda y: _blend(y, saturation, _luma(y)),
        lambda y: adjust_hue(y, p["hue"]),
    )
    for position in range(4):
        x = jax.lax.switch(p["jitter_order"][position], ops, x)
    return x


def _gaussian_blur(x, sigma, kernel_size: int):
    """Separable blur, zero padding with the kernel renormalised at the borders (as TF's)."""
    radius = kernel_size // 2
    t = jnp.arange(-radius, radius + 1, dtype=jnp.float32)
    kernel = jnp.exp(-(t**2) / (2.0 * sigma**2))
    kernel = kernel / kernel.sum()

    def blur_axis(y, axis):
        length = y.shape[axis]
        pad = [(0, 0)] * y.ndim
        pad[axis] = (radius, radius)
        padded = jnp.pad(y, pad)
        ones = jnp.pad(jnp.ones(length), (radius, radius))
        out = sum(
            kernel[i] * jax.lax.slice_in_dim(padded, i, i + length, axis=axis)
            for i in range(kernel_size)
        )
        mass = sum(kernel[i] * ones[i : i + length] for i in range(kernel_size))
        shape = [1] * y.ndim
        shape[axis] = length
        return out / mass.reshape(shape)

    return blur_axis(blur_axis(x, 0), 1)


def apply_pixel_ops(image, ops, view):
    """One uint8 [H, W, 3] crop (resized, flipped) + its float32[13] draws -> float [0, 1]."""
    p = _unpack(ops)
    x = image.astype(jnp.float32) / 255.0
    identity = lambda y: y
    if view.jitter_prob > 0:
        x = jax.lax.cond(p["jitter"], lambda y: _color_jitter(y, p), identity, x)
    if view.grayscale_prob > 0:
        x = jax.lax.cond(p["grayscale"], lambda y: jnp.broadcast_to(_luma(y), y.shape), identity, x)
    if view.blur_prob > 0:
        blur = lambda y: _gaussian_blur(y, p["blur_sigma"], blur_taps(view))
        x = jax.lax.cond(p["blur"], blur, identity, x)
    if view.solarize_prob > 0:
        x = jax.lax.cond(p["solarize"], lambda y: jnp.minimum(y, 1.0 - y), identity, x)
    return x


def finish_view(images, ops, view, dtype=jnp.float32):
    """A batch uint8 [B, H, W, 3] + float32 [B, 13] -> normalised [B, H, W, 3] for the model."""
    x = jax.vmap(lambda i, o: apply_pixel_ops(i, o, view))(images, ops)
    return normalize(jnp.round(x * 255.0), dtype)  # the host path's uint8 rounding


def finish_views(batch, views_cfg, dtype=jnp.float32):
    """(view1, view2), normalised; the pixel_ops="device" replacement of normalize()."""
    if views_cfg.get("pixel_ops", "host") != "device":
        return normalize(batch["view1"], dtype), normalize(batch["view2"], dtype)
    return tuple(
        finish_view(batch[name], batch[f"{name}_ops"], views_cfg[name], dtype)
        for name in ("view1", "view2")
    )
