"""The Barlow Twins / BYOL views as TensorFlow ops on one encoded image.

A view is computed in two steps so that its randomness can be inspected and tested on its own:

    params = sample_view_params(seed, height, width, view)   # every random draw, stateless
    image = apply_view(image_bytes, params, view)             # uint8 [size, size, 3]

`view` is one of the ConfigDicts of `bt_jax.data.config.imagenet_views()` (`.view1`/`.view2`).
The order of operations follows the official transforms: RandomResizedCrop, horizontal flip,
colour jitter (random order) with probability jitter_prob, grayscale, Gaussian blur
(separable), solarize. Single views decode only their crop window (fused decode-and-crop for
JPEGs); the pretraining pair (`two_views`) decodes the image once and cuts both crops from it.
Pixel ops work on float32 in [0, 1] at the output size; the result is rounded to uint8
(normalisation happens on the device). With pixel_ops="device" the pair stops after the flip
and `bt_jax.data.device_ops` does the rest in the train step.

All randomness comes from stateless ops keyed by `seed` (a [2] int tensor), so a view depends
only on the seed and the image, never on thread scheduling or on the number of processes.
"""

from __future__ import annotations

import math

import tensorflow as tf

from bt_jax.data.config import blur_taps

# ITU-R 601-2 luma, as PIL's convert("L") and torchvision's rgb_to_grayscale.
_LUMA = (0.299, 0.587, 0.114)
_CROP_ATTEMPTS = 10  # as torchvision's RandomResizedCrop.get_params


def _uniform(seed, minval=0.0, maxval=1.0, shape=()):
    return tf.random.stateless_uniform(shape, seed=seed, minval=minval, maxval=maxval)


# ---------------------------------------------------------------------------------------
# Decoding and geometry.


def image_hw(image_bytes: tf.Tensor) -> tf.Tensor:
    """(height, width) int32 of an encoded image; JPEGs are measured without decoding."""
    return tf.cond(
        tf.io.is_jpeg(image_bytes),
        lambda: tf.image.extract_jpeg_shape(image_bytes)[:2],
        lambda: tf.shape(decode_rgb(image_bytes))[:2],
    )


def decode_rgb(image_bytes: tf.Tensor) -> tf.Tensor:
    """Any JPEG/PNG/GIF/BMP bytes -> uint8 [H, W, 3]; grayscale and CMYK become RGB."""
    image = tf.io.decode_image(image_bytes, channels=3, expand_animations=False)
    image.set_shape([None, None, 3])
    return image


def decode_and_crop(image_bytes: tf.Tensor, window: tf.Tensor) -> tf.Tensor:
    """Decode only the crop window [y, x, h, w] of a JPEG (fused); other formats decode whole."""

    def crop_other():
        y, x, h, w = tf.unstack(window)
        return decode_rgb(image_bytes)[y : y + h, x : x + w]

    image = tf.cond(
        tf.io.is_jpeg(image_bytes),
        lambda: tf.image.decode_and_crop_jpeg(image_bytes, window, channels=3),
        crop_other,
    )
    image.set_shape([None, None, 3])
    return image


def sample_crop(seed, height, width, area_range, aspect_range) -> dict[str, tf.Tensor]:
    """torchvision's RandomResizedCrop.get_params as stateless TF ops.

    Ten (area fraction, log-uniform aspect) candidates are drawn at once and the first that
    fits is taken; if none fits, the central crop with the aspect clamped to the range.
    Returns the window (crop_y, crop_x, crop_h, crop_w; int32) and the drawn
    crop_area_fraction and crop_aspect (width / height) of the chosen candidate.
    """
    area_seed, aspect_seed, offset_seed = tf.unstack(
        tf.random.experimental.stateless_split(seed, 3)
    )
    h_f, w_f = tf.cast(height, tf.float32), tf.cast(width, tf.float32)
    fractions = _uniform(area_seed, area_range[0], area_range[1], [_CROP_ATTEMPTS])
    log_lo, log_hi = math.log(aspect_range[0]), math.log(aspect_range[1])
    aspects = tf.exp(_uniform(aspect_seed, log_lo, log_hi, [_CROP_ATTEMPTS]))
    target_area = h_f * w_f * fractions
    crop_w = tf.cast(tf.round(tf.sqrt(target_area * aspects)), tf.int32)
    crop_h = tf.cast(tf.round(tf.sqrt(target_area / aspects)), tf.int32)
    fits = (crop_w > 0) & (crop_h > 0) & (crop_w <= width) & (crop_h <= height)
    first = tf.argmax(tf.cast(fits, tf.int32), output_type=tf.int32)

    # Fallback: the whole image, narrowed to the extreme aspect if it lies outside the range.
    in_aspect = w_f / h_f
    fallback_w = tf.where(
        in_aspect > aspect_range[1], tf.cast(tf.round(h_f * aspect_range[1]), tf.int32), width
    )
    fallback_h = tf.where(
        in_aspect < aspect_range[0], tf.cast(tf.round(w_f / aspect_range[0]), tf.int32), height
    )
    found = tf.reduce_any(fits)
    crop_h = tf.maximum(tf.where(found, crop_h[first], fallback_h), 1)
    crop_w = tf.maximum(tf.where(found, crop_w[first], fallback_w), 1)
    fraction = tf.where(found, fractions[first], tf.cast(crop_h * crop_w, tf.float32) / (h_f * w_f))
    aspect = tf.where(
        found, aspects[first], tf.cast(crop_w, tf.float32) / tf.cast(crop_h, tf.float32)
    )

    # Uniform integer offsets; the fallback is centred.
    u_y, u_x = tf.unstack(_uniform(offset_seed, shape=[2]))
    span_y, span_x = height - crop_h + 1, width - crop_w + 1
    random_y = tf.minimum(tf.cast(u_y * tf.cast(span_y, tf.float32), tf.int32), span_y - 1)
    random_x = tf.minimum(tf.cast(u_x * tf.cast(span_x, tf.float32), tf.int32), span_x - 1)
    return {
        "crop_y": tf.where(found, random_y, (height - crop_h) // 2),
        "crop_x": tf.where(found, random_x, (width - crop_w) // 2),
        "crop_h": crop_h,
        "crop_w": crop_w,
        "crop_area_fraction": fraction,
        "crop_aspect": aspect,
    }


def center_crop_window(height, width, crop_fraction: float) -> tf.Tensor:
    """[y, x, h, w] of the central square with side crop_fraction * the shorter side.

    Cropping that square and resizing it to `size` equals "resize the shorter side to
    size / crop_fraction, then center-crop size" (256 -> 224 for crop_fraction 0.875).
    """
    side = tf.cast(
        tf.round(crop_fraction * tf.cast(tf.minimum(height, width), tf.float32)), tf.int32
    )
    side = tf.maximum(side, 1)
    return tf.stack([(height - side) // 2, (width - side) // 2, side, side])


def _resize(image, size: int, method: str, antialias: bool) -> tf.Tensor:
    """uint8 [h, w, 3] -> float32 [size, size, 3] in [0, 1]."""
    image = tf.image.resize(image, [size, size], method=method, antialias=antialias)
    return tf.clip_by_value(image * (1.0 / 255.0), 0.0, 1.0)  # bicubic overshoots


def to_uint8(image: tf.Tensor) -> tf.Tensor:
    """float32 in [0, 1] -> uint8 in [0, 255], rounded half up."""
    return tf.saturate_cast(image * 255.0 + 0.5, tf.uint8)


# ---------------------------------------------------------------------------------------
# Pixel operations on float32 [H, W, 3] images in [0, 1] (torchvision semantics). Written
# with the TF kernels that are cheap on CPU (no tf.where, floormod or stack on whole images).


def _color_matrix(image, matrix) -> tf.Tensor:
    """Pixels times a 3x3 matrix: one matmul, cheaper on CPU than broadcasting a luma plane."""
    return tf.reshape(tf.reshape(image, [-1, 3]) @ matrix, tf.shape(image))


def _toward_luma(factor) -> tf.Tensor:
    """M with x @ M = factor * x + (1 - factor) * luma(x) in every channel."""
    luma_columns = tf.tile(tf.constant(_LUMA, tf.float32)[:, None], [1, 3])
    return factor * tf.eye(3) + (1.0 - factor) * luma_columns


def grayscale(image: tf.Tensor) -> tf.Tensor:
    """Luma, kept as 3 identical channels."""
    return _color_matrix(image, _toward_luma(0.0))


def adjust_brightness(image, factor):
    return tf.minimum(image * factor, 1.0)  # factor >= 0 keeps the result >= 0


def adjust_contrast(image, factor):
    # Blend with the mean luma of the whole image (a scalar), as torchvision / PIL.
    mean = tf.reduce_sum(tf.reduce_mean(image, [0, 1]) * tf.constant(_LUMA, image.dtype))
    return tf.clip_by_value(factor * image + (1.0 - factor) * mean, 0.0, 1.0)


def adjust_saturation(image, factor):
    return tf.clip_by_value(_color_matrix(image, _toward_luma(factor)), 0.0, 1.0)


def adjust_hue(image, delta):
    """Rotate the HSV hue by delta turns (the fused TF kernel; faster than any composition)."""
    return tf.clip_by_value(tf.image.adjust_hue(image, delta), 0.0, 1.0)


def color_jitter(image, params) -> tf.Tensor:
    """Brightness, contrast, saturation and hue in the random order params["jitter_order"]."""
    ops = (
        lambda x: adjust_brightness(x, params["brightness"]),
        lambda x: adjust_contrast(x, params["contrast"]),
        lambda x: adjust_saturation(x, params["saturation"]),
        lambda x: adjust_hue(x, params["hue"]),
    )
    for position in range(4):
        image = tf.switch_case(
            params["jitter_order"][position], [lambda op=op, x=image: op(x) for op in ops]
        )
    return image


def gaussian_kernel(sigma, kernel_size: int) -> tf.Tensor:
    radius = kernel_size // 2
    t = tf.range(-radius, radius + 1, dtype=tf.float32)
    kernel = tf.exp(-(t**2) / (2.0 * sigma**2))
    return kernel / tf.reduce_sum(kernel)


def gaussian_blur(image, sigma, kernel_size: int) -> tf.Tensor:
    """Separable Gaussian blur: a vertical then a horizontal 1-D depthwise convolution.

    Zero padding ("SAME", the cheapest TF path) with the kernel renormalised at the borders,
    so edges keep their brightness (PIL extends edges; BYOL's TF blur darkens them).
    """
    kernel = gaussian_kernel(sigma, kernel_size)
    column = tf.tile(kernel[:, None, None, None], [1, 1, 3, 1])
    x = tf.nn.depthwise_conv2d(image[None], column, [1, 1, 1, 1], "SAME")
    x = tf.nn.depthwise_conv2d(x, tf.transpose(column, [1, 0, 2, 3]), [1, 1, 1, 1], "SAME")
    # Kernel mass inside the image along each axis (1-D, cheap), to undo the zero padding.
    inv_h = 1.0 / _kernel_mass(kernel, tf.shape(image)[0])
    inv_w = 1.0 / _kernel_mass(kernel, tf.shape(image)[1])
    return x[0] * inv_h[:, None, None] * inv_w[None, :, None]


def _kernel_mass(kernel, length):
    """Sum of the kernel weights that fall inside [0, length) at each position."""
    ones = tf.ones([1, length, 1], tf.float32)
    return tf.nn.conv1d(ones, kernel[:, None, None], 1, "SAME")[0, :, 0]


def solarize(image):
    """x >= 0.5 -> 1 - x (PIL's ImageOps.solarize at 128 on uint8), written as min(x, 1 - x):
    the same map in one cheap op."""
    return tf.minimum(image, 1.0 - image)


# ---------------------------------------------------------------------------------------
# A whole view.


def sample_view_params(seed, height, width, view) -> dict[str, tf.Tensor]:
    """Every random choice of one view of an image of size (height, width), from `seed`.

    Keys: the crop window and draws of `sample_crop`; flip, jitter, grayscale, blur,
    solarize (bool: is the op applied); brightness, contrast, saturation (multiplicative
    factors), hue (shift, in turns), jitter_order (int32[4], a permutation: 0 brightness,
    1 contrast, 2 saturation, 3 hue); blur_sigma.
    """
    seeds = tf.unstack(tf.random.experimental.stateless_split(seed, 5))
    coins = _uniform(seeds[1], shape=[5])
    b, c, s, h = view.brightness, view.contrast, view.saturation, view.hue
    lows = tf.constant([max(0.0, 1 - b), max(0.0, 1 - c), max(0.0, 1 - s), -h], tf.float32)
    highs = tf.constant([1 + b, 1 + c, 1 + s, h], tf.float32)
    jitter = lows + (highs - lows) * _uniform(seeds[2], shape=[4])
    params = sample_crop(seeds[0], height, width, view.crop_area, view.crop_aspect)
    params.update(
        flip=coins[0] < view.flip_prob,
        jitter=coins[1] < view.jitter_prob,
        grayscale=coins[2] < view.grayscale_prob,
        blur=coins[3] < view.blur_prob,
        solarize=coins[4] < view.solarize_prob,
        brightness=jitter[0],
        contrast=jitter[1],
        saturation=jitter[2],
        hue=jitter[3],
        jitter_order=tf.argsort(_uniform(seeds[3], shape=[4])),
        blur_sigma=_uniform(seeds[4], view.blur_sigma[0], view.blur_sigma[1]),
    )
    return params


# The per-view draws the device needs to finish a view (pixel_ops="device"), packed in this
# order into float32[13]: flags as 0/1, jitter_order as 4 floats.
DEVICE_PARAMS = (
    "jitter", "brightness", "contrast", "saturation", "hue", "jitter_order",
    "grayscale", "blur", "blur_sigma", "solarize",
)  # fmt: skip


def pack_device_params(params) -> tf.Tensor:
    """float32[13]: the draws of DEVICE_PARAMS, for `bt_jax.data.device_ops`."""
    parts = [tf.reshape(tf.cast(params[k], tf.float32), [-1]) for k in DEVICE_PARAMS]
    return tf.concat(parts, 0)


def augment_pixels(image, params, view, *, flip_only: bool = False) -> tf.Tensor:
    """Flip, jitter, grayscale, blur, solarize on a float32 [size, size, 3] image in [0, 1].

    flip_only: stop after the flip (the rest runs on the device, `bt_jax.data.device_ops`).
    """

    def maybe(flag, fn, x):
        return tf.cond(flag, lambda: fn(x), lambda: x)

    image = maybe(params["flip"], tf.image.flip_left_right, image)
    if flip_only:
        return image
    if view.jitter_prob > 0:
        image = maybe(params["jitter"], lambda x: color_jitter(x, params), image)
    if view.grayscale_prob > 0:
        image = maybe(params["grayscale"], grayscale, image)
    if view.blur_prob > 0:
        blur = lambda x: gaussian_blur(x, params["blur_sigma"], blur_taps(view))
        image = maybe(params["blur"], blur, image)
    if view.solarize_prob > 0:
        image = maybe(params["solarize"], solarize, image)
    return image


def _crop_window(params) -> tf.Tensor:
    return tf.stack([params["crop_y"], params["crop_x"], params["crop_h"], params["crop_w"]])


def finish_view(crop, params, view, *, flip_only: bool = False) -> tf.Tensor:
    """uint8 crop -> resize + pixel ops -> uint8 [view.image_size, view.image_size, 3]."""
    image = _resize(crop, view.image_size, view.resize_method, view.antialias)
    return to_uint8(augment_pixels(image, params, view, flip_only=flip_only))


def apply_view(image_bytes, params, view) -> tf.Tensor:
    """One view from encoded bytes, decoding only the crop window (fused for JPEGs)."""
    return finish_view(decode_and_crop(image_bytes, _crop_window(params)), params, view)


def random_view(image_bytes, seed, view) -> tf.Tensor:
    """One random view of an encoded image (linear-eval training uses this)."""
    hw = image_hw(image_bytes)
    return apply_view(image_bytes, sample_view_params(seed, hw[0], hw[1], view), view)


def two_views(image_bytes, seed, views) -> dict[str, tf.Tensor]:
    """The pretraining pair {"view1", "view2"} (uint8) of one image, from one seed.

    The image is decoded once and both crops are cut from it: two fused crop-decodes cost
    more than one full decode on ImageNet-sized JPEGs (docs/benchmarks.md). With
    views.pixel_ops == "device" the views are only cropped, resized and flipped, and
    "view1_ops" / "view2_ops" (pack_device_params) carry the rest to the device.
    """
    on_device = views.get("pixel_ops", "host") == "device"
    image = decode_rgb(image_bytes)
    height, width = tf.shape(image)[0], tf.shape(image)[1]
    seed1, seed2 = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
    out = {}
    for name, view_seed in (("view1", seed1), ("view2", seed2)):
        params = sample_view_params(view_seed, height, width, views[name])
        y, x, h, w = tf.unstack(_crop_window(params))
        crop = image[y : y + h, x : x + w]
        out[name] = finish_view(crop, params, views[name], flip_only=on_device)
        if on_device:
            out[f"{name}_ops"] = pack_device_params(params)
    return out


def eval_view(image_bytes, image_size: int, crop_fraction: float = 0.875) -> tf.Tensor:
    """Center crop (crop_fraction of the shorter side) resized to image_size; uint8."""
    hw = image_hw(image_bytes)
    image = decode_and_crop(image_bytes, center_crop_window(hw[0], hw[1], crop_fraction))
    return to_uint8(_resize(image, image_size, "bilinear", antialias=True))
