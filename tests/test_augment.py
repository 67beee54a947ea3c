"""The views' randomness (statistics of >= 20,000 draws) and pixel ops on real images."""

import colorsys
import io
import math

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image, ImageEnhance, ImageOps

from bt_jax.data import augment, cifar_views, imagenet_views, linear_eval_view

DRAWS = 20_000


def _jpeg(array, mode="RGB", quality=95) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array, mode).save(buffer, "JPEG", quality=quality)
    return buffer.getvalue()


def _photo(height=96, width=128) -> np.ndarray:
    """A smooth colourful test picture (gradients and a disc), uint8 RGB."""
    y, x = np.mgrid[0:height, 0:width] / np.array([height, width])[:, None, None]
    disc = ((y - 0.5) ** 2 + (x - 0.4) ** 2 < 0.08).astype(float)
    rgb = np.stack([x, y, 0.5 + 0.5 * np.sin(6 * x * y) * (1 - disc)], -1)
    return (rgb * 255).astype(np.uint8)


def _draw_params(view, height=320, width=320, draws=DRAWS):
    """`draws` parameter samples through the pipeline's own path: a tf.data map over seeds."""
    seeds = tf.data.Dataset.range(draws).map(
        lambda i: augment.sample_view_params(tf.stack([i, 7]), height, width, view),
        num_parallel_calls=tf.data.AUTOTUNE,
    )
    return next(seeds.batch(draws).as_numpy_iterator())


@pytest.fixture(scope="module")
def imagenet_draws():
    views = imagenet_views(224)
    return {name: _draw_params(views[name]) for name in ("view1", "view2")}


@pytest.mark.parametrize(
    "view, key, expected",
    [
        ("view1", "flip", 0.5),
        ("view2", "flip", 0.5),
        ("view1", "jitter", 0.8),
        ("view2", "jitter", 0.8),
        ("view1", "grayscale", 0.2),
        ("view2", "grayscale", 0.2),
        ("view1", "blur", 1.0),
        ("view2", "blur", 0.1),
        ("view1", "solarize", 0.0),
        ("view2", "solarize", 0.2),
    ],
)
def test_probabilities_over_20000_draws(imagenet_draws, view, key, expected):
    frequency = imagenet_draws[view][key].mean()
    assert abs(frequency - expected) <= 0.01, (view, key, frequency)


@pytest.mark.parametrize("view", ["view1", "view2"])
def test_ranges_over_20000_draws(imagenet_draws, view):
    p = imagenet_draws[view]
    assert len(p["flip"]) >= DRAWS
    # RandomResizedCrop: drawn area fraction and aspect, and the integer window.
    assert p["crop_area_fraction"].min() >= 0.08 and p["crop_area_fraction"].max() <= 1.0
    assert p["crop_aspect"].min() >= 3 / 4 - 1e-6 and p["crop_aspect"].max() <= 4 / 3 + 1e-6
    # Log-uniform aspect: half the draws on each side of 1 (on a square image, where the
    # retries of too-large candidates do not favour one side).
    assert abs((p["crop_aspect"] > 1).mean() - 0.5) <= 0.01
    assert (p["crop_y"] >= 0).all() and (p["crop_y"] + p["crop_h"] <= 320).all()
    assert (p["crop_x"] >= 0).all() and (p["crop_x"] + p["crop_w"] <= 320).all()
    area = p["crop_h"] * p["crop_w"] / (320 * 320)
    assert area.min() >= 0.075 and area.max() <= 1.0
    assert p["blur_sigma"].min() >= 0.1 and p["blur_sigma"].max() <= 2.0
    assert abs(p["blur_sigma"].mean() - 1.05) < 0.02
    assert p["brightness"].min() >= 0.6 and p["brightness"].max() <= 1.4
    assert p["contrast"].min() >= 0.6 and p["contrast"].max() <= 1.4
    assert p["saturation"].min() >= 0.8 and p["saturation"].max() <= 1.2
    assert p["hue"].min() >= -0.1 and p["hue"].max() <= 0.1
    # Random order: every draw is a permutation, and each op comes first ~1/4 of the time.
    assert (np.sort(p["jitter_order"], 1) == np.arange(4)).all()
    assert np.allclose(np.bincount(p["jitter_order"][:, 0]) / len(p["flip"]), 0.25, atol=0.01)


def test_cifar_and_linear_presets():
    views = cifar_views()
    assert views.view1.image_size == 32 and views.view1.blur_prob == views.view2.blur_prob == 0
    assert views.view2.solarize_prob == 0.2
    assert imagenet_views().view1.blur_kernel_size == 23
    p = _draw_params(linear_eval_view(224), draws=2000)
    assert not (p["jitter"] | p["grayscale"] | p["blur"] | p["solarize"]).any()
    assert abs(p["flip"].mean() - 0.5) < 0.05


def test_crop_fits_extreme_and_tiny_images():
    view = imagenet_views().view1
    for height, width in [(10, 10), (1, 50), (500, 3), (2, 2)]:
        p = _draw_params(view, height, width, draws=500)
        assert (p["crop_h"] >= 1).all() and (p["crop_w"] >= 1).all()
        assert (p["crop_y"] + p["crop_h"] <= height).all()
        assert (p["crop_x"] + p["crop_w"] <= width).all()


def test_same_seed_same_params_and_different_seeds_differ():
    view = imagenet_views().view2
    a = augment.sample_view_params(tf.constant([1, 2]), 300, 400, view)
    b = augment.sample_view_params(tf.constant([1, 2]), 300, 400, view)
    c = augment.sample_view_params(tf.constant([1, 3]), 300, 400, view)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert any(not np.array_equal(a[k], c[k]) for k in a)


def test_solarize_maps_upper_half_to_one_minus_x():
    x = tf.linspace(0.0, 1.0, 1001)
    expected = np.where(x.numpy() >= 0.5, 1.0 - x.numpy(), x.numpy())
    np.testing.assert_allclose(augment.solarize(x), expected, atol=1e-7)
    # PIL's ImageOps.solarize (threshold 128) on uint8 agrees after rounding.
    pixels = np.arange(256, dtype=np.uint8).reshape(16, 16)
    pil = np.asarray(ImageOps.solarize(Image.fromarray(pixels).convert("RGB")))[..., 0]
    ours = augment.to_uint8(augment.solarize(tf.constant(pixels / 255.0, tf.float32)))
    np.testing.assert_array_equal(ours, pil)


def test_grayscale_is_luma_in_three_channels():
    image = tf.constant(_photo() / 255.0, tf.float32)
    gray = augment.grayscale(image).numpy()
    assert gray.shape == image.shape
    np.testing.assert_array_equal(gray[..., 0], gray[..., 2])
    np.testing.assert_allclose(gray[..., 0], image.numpy() @ [0.299, 0.587, 0.114], atol=1e-6)


def test_jitter_ops_match_pil_enhance():
    """torchvision's PIL path: ImageEnhance.Brightness / Contrast / Color, within rounding."""
    pixels = _photo()
    image = tf.constant(pixels / 255.0, tf.float32)
    pil = Image.fromarray(pixels)
    cases = [
        (augment.adjust_brightness, ImageEnhance.Brightness, 1.3),
        (augment.adjust_contrast, ImageEnhance.Contrast, 0.7),
        (augment.adjust_saturation, ImageEnhance.Color, 1.2),
    ]
    for ours, theirs, factor in cases:
        expected = np.asarray(theirs(pil).enhance(factor), np.float32)
        got = augment.to_uint8(ours(image, factor)).numpy().astype(np.float32)
        assert np.abs(got - expected).max() <= 2.0, ours.__name__


def test_hue_matches_colorsys():
    rgb = np.random.default_rng(0).random((8, 8, 3)).astype(np.float32)
    got = augment.adjust_hue(tf.constant(rgb), 0.07).numpy()
    for pixel, out in zip(rgb.reshape(-1, 3), got.reshape(-1, 3), strict=True):
        h, s, v = colorsys.rgb_to_hsv(*pixel)
        np.testing.assert_allclose(out, colorsys.hsv_to_rgb((h + 0.07) % 1.0, s, v), atol=1e-5)


def test_blur_keeps_constants_and_normalises_kernel():
    flat = tf.fill([40, 50, 3], 0.6)
    np.testing.assert_allclose(augment.gaussian_blur(flat, 1.7, 23), 0.6, atol=1e-5)
    dot = np.zeros([41, 41, 3], np.float32)
    dot[20, 20] = 1.0
    blurred = augment.gaussian_blur(tf.constant(dot), 1.0, 23).numpy()[..., 0]
    assert abs(blurred.sum() - 1.0) < 1e-4
    row = blurred[20, 18:23] / blurred[20, 20]
    np.testing.assert_allclose(row, np.exp(-np.array([4, 1, 0, 1, 4]) / 2.0), rtol=1e-4)


def _params(view, **forced):
    params = augment.sample_view_params(tf.constant([0, 1]), 96, 128, view)
    params.update({k: tf.constant(v) for k, v in forced.items()})
    return params


def test_view_on_a_real_jpeg_shape_dtype_range():
    data = _jpeg(_photo())
    views = imagenet_views(64)
    for view in (views.view1, views.view2):
        for seed in range(5):
            out = augment.random_view(tf.constant(data), tf.constant([seed, 0]), view).numpy()
            assert out.shape == (64, 64, 3) and out.dtype == np.uint8
            assert out.max() > out.min()  # not a constant image
    views = augment.two_views(tf.constant(data), tf.constant([3, 4]), imagenet_views(64))
    v1, v2 = views["view1"], views["view2"]
    assert v1.shape == v2.shape == (64, 64, 3) and not np.array_equal(v1, v2)


def test_forced_ops_on_a_real_jpeg():
    data = tf.constant(_jpeg(_photo()))
    view = imagenet_views(48).view2
    off = dict(flip=False, jitter=False, grayscale=False, blur=False, solarize=False)
    plain = augment.apply_view(data, _params(view, **off), view).numpy().astype(int)
    solar = augment.apply_view(data, _params(view, **{**off, "solarize": True}), view).numpy()
    expected = np.where(plain >= 128, 255 - plain, plain)
    assert np.abs(solar.astype(int) - expected).max() <= 1
    gray = augment.apply_view(data, _params(view, **{**off, "grayscale": True}), view).numpy()
    assert (gray[..., 0] == gray[..., 1]).all() and (gray[..., 1] == gray[..., 2]).all()
    flip = augment.apply_view(data, _params(view, **{**off, "flip": True}), view).numpy()
    np.testing.assert_array_equal(flip, plain[:, ::-1])


def test_fused_crop_equals_decode_then_crop():
    data = tf.constant(_jpeg(_photo(120, 160)))
    window = tf.constant([10, 20, 64, 80])
    fused = augment.decode_and_crop(data, window).numpy()
    whole = augment.decode_rgb(data).numpy()[10:74, 20:100]
    # Equal up to the chroma upsampling at the window's edges.
    difference = np.abs(fused.astype(int) - whole)
    assert fused.shape == (64, 80, 3) and (difference <= 1).mean() > 0.99


def test_eval_view_center_crop():
    # A 100 x 200 image: the central 0.875 * 100 = 88 px square is resized to 32.
    pixels = np.zeros([100, 200, 3], np.uint8)
    pixels[:, 100:] = 255  # right half white
    out = augment.eval_view(tf.constant(_jpeg(pixels)), 32, 0.875).numpy()
    assert out.shape == (32, 32, 3) and out.dtype == np.uint8
    assert out[:, :12].max() < 40 and out[:, 20:].min() > 215  # split in the middle
    assert math.isclose(augment.center_crop_window(100, 200, 0.875).numpy()[2], 88)


def test_device_pixel_ops_match_the_host_ones():
    """pixel_ops="device": host crop/resize/flip + jnp ops == the all-TF view, to rounding."""
    import jax
    import jax.numpy as jnp

    from bt_jax.data import device_ops

    data = tf.constant(_jpeg(_photo(120, 160)))
    host_cfg, device_cfg = imagenet_views(64), imagenet_views(64, pixel_ops="device")

    def pairs(views):
        seeds = tf.data.Dataset.range(16).map(
            lambda i: augment.two_views(data, tf.stack([i, 1]), views)
        )
        return next(seeds.batch(16).as_numpy_iterator())

    host, device = pairs(host_cfg), pairs(device_cfg)
    differences = []
    for name in ("view1", "view2"):
        assert device[f"{name}_ops"].shape == (16, 13)
        finish = jax.jit(lambda i, o, v=device_cfg[name]: device_ops.apply_pixel_ops(i, o, v))
        finished = np.asarray(jnp.round(finish(device[name], device[f"{name}_ops"]) * 255.0))
        differences.append(np.abs(finished.astype(int) - host[name].astype(int)))
    differences = np.stack(differences)  # the device path starts from a uint8-rounded crop
    assert differences.mean() < 0.3 and differences.max() <= 3


def test_device_hue_matches_tf():
    import jax.numpy as jnp

    from bt_jax.data import device_ops

    rgb = np.random.default_rng(1).random((16, 16, 3)).astype(np.float32)
    for delta in (-0.1, 0.03, 0.1):
        expected = augment.adjust_hue(tf.constant(rgb), delta).numpy()
        np.testing.assert_allclose(
            device_ops.adjust_hue(jnp.asarray(rgb), delta), expected, atol=1e-5
        )


def test_decode_rgb_from_cmyk_gray_and_png():
    rgb = np.zeros((32, 32, 3), np.uint8)
    rgb[:, :16], rgb[:, 16:] = (200, 30, 30), (20, 180, 60)
    for mode, fmt in [("CMYK", "JPEG"), ("L", "JPEG"), ("RGB", "PNG")]:
        buffer = io.BytesIO()
        Image.fromarray(rgb).convert(mode).save(buffer, fmt)
        expected = np.asarray(Image.open(io.BytesIO(buffer.getvalue())).convert("RGB"))
        decoded = augment.decode_rgb(tf.constant(buffer.getvalue())).numpy()
        assert decoded.shape == (32, 32, 3), mode
        assert np.abs(decoded.astype(int) - expected).max() <= 1, mode
        window = tf.constant([4, 4, 8, 8])
        assert augment.decode_and_crop(tf.constant(buffer.getvalue()), window).shape == (8, 8, 3)
