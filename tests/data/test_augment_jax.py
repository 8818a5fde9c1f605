"""Device-side augmentation (fnc_jax.data.augment_jax): agreement with TensorFlow's colour kernels and the
host pipeline, per-image randomness under vmap/jit, coin frequencies, and the blur kernel and padding.

XLA compilation dominates the cost on CPU, so the tests share a few jitted functions at fixed shapes
(probabilities and strengths are traced arguments and do not recompile)."""

import dataclasses
import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow as tf

from fnc_jax.data import augment, augment_jax, layout

RNG = np.random.default_rng(1)
N = 256  # batch of every colour-op test: 4×4 images

# Fixed call signatures (everything positional and traced) so each compiles once per shape.
JITTER = jax.jit(lambda x, key, p, strength: augment_jax.batch_color_jitter(x, key, strength=strength, p=p))
GRAYSCALE = jax.jit(lambda x, key, p: augment_jax.batch_grayscale(x, key, p=p))
SOLARIZE = jax.jit(lambda x, key, p: augment_jax.batch_solarize(x, key, p=p))
BLUR = jax.jit(
    lambda x, key, p, sigma_range, groups=None, padding="zeros": augment_jax.gaussian_blur(
        x, key, p=p, sigma_range=sigma_range, num_sigma_groups=groups, padding=padding
    ),
    static_argnames=("groups", "padding"),
)


def _colour_images(n: int, size: int = 4) -> np.ndarray:
    images = RNG.random((n, size, size, 3)).astype(np.float32)
    images[:, 0, 0] = (0.5, 0.5, 0.5)  # grey, black and pure-hue pixels hit the HSV edge cases
    images[:, 0, 1] = (0.0, 0.0, 0.0)
    images[:, 0, 2] = (1.0, 0.0, 0.0)
    return images


def _within_binomial(count: int, n: int, p: float, sds: float = 4.0) -> bool:
    return abs(count - n * p) <= sds * np.sqrt(n * p * (1 - p))


def _is_grey(images: np.ndarray) -> np.ndarray:
    return np.all(np.abs(images - images[..., :1]) < 1e-6, axis=(1, 2, 3))


def _changed(out, images) -> np.ndarray:
    return np.any(np.abs(np.asarray(out) - np.asarray(images)) > 1e-6, axis=(1, 2, 3))


# --- colour ops against TensorFlow -------------------------------------------------------------------


def test_colour_ops_match_tensorflow_kernels():
    image = _colour_images(1, size=8)[0]

    @jax.jit
    def device_ops(x, factor, delta):
        return (
            augment_jax.adjust_saturation(x, factor),
            augment_jax.adjust_contrast(x, factor),
            augment_jax.adjust_hue(x, delta),
            augment_jax.hsv_to_rgb(augment_jax.rgb_to_hsv(x)),
            augment_jax.to_grayscale(x),
        )

    for factor, delta in [(0.2, -0.2), (1.0, 0.07), (1.7, 0.5)]:
        saturation, contrast, hue, round_trip, grey = device_ops(image, factor, delta)
        np.testing.assert_allclose(saturation, tf.image.adjust_saturation(image, factor).numpy(), atol=2e-6)
        np.testing.assert_allclose(contrast, tf.image.adjust_contrast(image, factor).numpy(), atol=2e-6)
        np.testing.assert_allclose(hue, tf.image.adjust_hue(image, delta).numpy(), atol=2e-6)
        np.testing.assert_allclose(round_trip, image, atol=2e-6)
        np.testing.assert_allclose(grey, augment.to_grayscale(image).numpy(), atol=1e-6)


# --- colour jitter, grayscale, solarize ----------------------------------------------------------------


def test_color_jitter_draws_per_image_and_is_deterministic():
    images = jnp.asarray(np.repeat(_colour_images(1), N, axis=0))  # the same image N times
    out = np.asarray(JITTER(images, jax.random.key(0), 1.0, 1.0))
    assert out.min() >= 0 and out.max() <= 1
    assert len({o.tobytes() for o in out}) == N
    np.testing.assert_array_equal(out, np.asarray(JITTER(images, jax.random.key(0), 1.0, 1.0)))


def test_color_jitter_applies_the_four_tf_ops_in_a_random_order():
    """Reference composition with TensorFlow's kernels, clip after each op, in each of the 24 orders.

    Couples to the draw layout of `color_jitter`: uniform(key, (6,)) = coin, brightness, contrast,
    saturation, hue, order pick."""
    image = _colour_images(1)[0]
    keys = jax.random.split(jax.random.key(8), N)[:12]
    out = np.asarray(JITTER(jnp.asarray(np.repeat(image[None], N, axis=0)), jax.random.key(8), 1.0, 1.0))
    matched_orders = set()
    for key, jittered in zip(keys, out):
        _, b, c, s, h, _ = np.asarray(jax.random.uniform(key, (6,)))
        ops = (
            lambda x: x * (0.2 + 1.6 * b),
            lambda x: tf.image.adjust_contrast(x, 0.2 + 1.6 * c),
            lambda x: tf.image.adjust_saturation(x, 0.2 + 1.6 * s),
            lambda x: tf.image.adjust_hue(x, 0.2 * (2 * h - 1)),
        )
        for order in itertools.permutations(range(4)):
            reference = tf.constant(image)
            for op in order:
                reference = tf.clip_by_value(ops[op](reference), 0.0, 1.0)
            if np.allclose(reference.numpy(), jittered, atol=1e-5):
                matched_orders.add(order)
                break
        else:
            pytest.fail("device jitter output matches no order of the four TF ops")
    assert len(matched_orders) >= 6


def test_color_jitter_zero_strength_is_identity():
    images = jnp.asarray(_colour_images(N))
    np.testing.assert_allclose(JITTER(images, jax.random.key(3), 1.0, 0.0), images, atol=2e-6)


def test_color_jitter_brightness_range_on_grey():
    # Contrast, saturation and hue leave a constant grey image alone: only brightness acts.
    grey = jnp.full((N, 4, 4, 3), 0.5, jnp.float32)
    out = np.asarray(JITTER(grey, jax.random.key(4), 1.0, 1.0))[:, 0, 0, 0]
    assert np.all((out >= 0.1 - 1e-6) & (out < 0.9 + 1e-6))  # 0.5 · U[0.2, 1.8)
    assert out.min() < 0.2 and out.max() > 0.8 and abs(out.mean() - 0.5) < 0.05


def test_coin_frequencies():
    images = jnp.asarray(_colour_images(N))
    for name, out, p in [
        ("jitter", JITTER(images, jax.random.key(5), 0.8, 1.0), 0.8),
        ("grayscale", GRAYSCALE(images, jax.random.key(5), 0.2), 0.2),
        ("solarize", SOLARIZE(images, jax.random.key(5), 0.3), 0.3),
    ]:
        assert _within_binomial(_changed(out, images).sum(), N, p), name


def test_grayscale_and_solarize_values():
    images = jnp.asarray(_colour_images(N))
    grey = np.asarray(GRAYSCALE(images, jax.random.key(6), 1.0))
    luma = np.asarray(images) @ np.array([0.2989, 0.5870, 0.1140], np.float32)
    np.testing.assert_allclose(grey, np.repeat(luma[..., None], 3, axis=-1), atol=1e-6)
    solarized = np.asarray(SOLARIZE(images, jax.random.key(6), 1.0))
    np.testing.assert_allclose(solarized, np.where(images < 0.5, images, 1.0 - np.asarray(images)), atol=1e-6)


def test_device_colour_statistics_match_host():
    """Same inputs through the host (TF) and device (JAX) jitter (p 0.8) → grayscale (p 0.2)."""
    images = _colour_images(N)

    def host_view(i, x):
        jitter = functools.partial(augment.color_jitter, seed=tf.stack([i, 1]))
        jittered = augment.random_apply(jitter, x, tf.stack([i, 2]), 0.8)
        return augment.random_apply(augment.to_grayscale, jittered, tf.stack([i, 3]), 0.2)

    host = tf.data.Dataset.from_tensor_slices(images).enumerate().map(host_view).batch(N).get_single_element()
    host = np.clip(host.numpy(), 0, 1)
    jitter_key, grey_key = jax.random.split(jax.random.key(7))
    device = np.asarray(GRAYSCALE(JITTER(jnp.asarray(images), jitter_key, 0.8, 1.0), grey_key, 0.2))
    for statistic in (np.mean, np.std):
        host_values, device_values = statistic(host, axis=(1, 2)), statistic(device, axis=(1, 2))  # (N, 3)
        np.testing.assert_allclose(host_values.mean(0), device_values.mean(0), atol=0.04)
        np.testing.assert_allclose(host_values.std(0), device_values.std(0), atol=0.04)
    assert _within_binomial(_is_grey(device).sum(), N, 0.2) and _within_binomial(_is_grey(host).sum(), N, 0.2)


# --- blur -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("image_size, taps", [(224, 23), (32, 3), (20, 3), (19, 1), (9, 1)])
def test_gaussian_kernel_taps(image_size, taps):
    kernel = np.asarray(jax.jit(augment_jax.gaussian_kernel, static_argnums=1)(1.5, image_size))
    offsets = np.arange(taps) - taps // 2
    expected = np.exp(-(offsets**2) / (2 * 1.5**2))
    np.testing.assert_allclose(kernel, expected / expected.sum(), rtol=1e-6)


def test_blur_matches_separable_reference_with_zero_padding():
    images = RNG.random((8, 30, 30, 3)).astype(np.float32)
    sigma = 1.3
    out = np.asarray(BLUR(jnp.asarray(images), jax.random.key(0), 1.0, (sigma, sigma)))
    taps = np.asarray(augment_jax.gaussian_kernel(sigma, 30))  # 3 taps
    padded = np.pad(images, [(0, 0), (1, 1), (1, 1), (0, 0)])
    horizontal = sum(taps[i] * padded[:, :, i : i + 30] for i in range(3))
    expected = sum(taps[i] * horizontal[:, i : i + 30] for i in range(3))
    np.testing.assert_allclose(out, np.clip(expected, 0, 1), atol=1e-5)


def test_blur_zero_padding_darkens_borders_and_reflect_does_not():
    ones = jnp.ones((8, 30, 30, 3))
    zeros = np.asarray(BLUR(ones, jax.random.key(0), 1.0, (1.0, 2.0)))
    assert np.all(zeros[:, 0] < 0.9) and np.all(zeros[:, :, -1] < 0.9)
    np.testing.assert_allclose(zeros[:, 1:-1, 1:-1], 1.0, atol=1e-6)  # radius 1 at 30 px
    reflect = BLUR(ones, jax.random.key(0), 1.0, (1.0, 2.0), padding="reflect")
    np.testing.assert_allclose(reflect, 1.0, atol=1e-6)


def test_blur_probability_and_per_image_sigma():
    images = jnp.asarray(np.repeat(RNG.random((1, 30, 30, 3)), 8, axis=0), jnp.float32)
    blurred = [_changed(BLUR(images, jax.random.key(i), 0.5, (1.0, 2.0)), images) for i in range(40)]
    assert _within_binomial(np.sum(blurred), 320, 0.5)
    per_image = np.asarray(BLUR(images, jax.random.key(0), 1.0, (0.5, 2.0)))
    assert len({o.tobytes() for o in per_image}) == 8


def test_blur_sigma_groups_share_sigma():
    images = jnp.asarray(np.repeat(RNG.random((1, 30, 30, 3)), 8, axis=0), jnp.float32)
    grouped = np.asarray(BLUR(images, jax.random.key(3), 1.0, (0.5, 2.0), groups=2))
    np.testing.assert_array_equal(grouped[:4], np.broadcast_to(grouped[0], grouped[:4].shape))
    np.testing.assert_array_equal(grouped[4:], np.broadcast_to(grouped[4], grouped[4:].shape))
    assert not np.allclose(grouped[0], grouped[4])
    with pytest.raises(ValueError, match="num_sigma_groups"):
        augment_jax.gaussian_blur(images, jax.random.key(3), num_sigma_groups=3)


def test_blur_is_identity_on_tiny_images():
    images = jnp.asarray(RNG.random((8, 9, 9, 3)), jnp.float32)
    np.testing.assert_allclose(BLUR(images, jax.random.key(0), 1.0, (0.1, 2.0)), images, atol=1e-6)


# --- the device part of a pretraining view -------------------------------------------------------------


def _view_augment(path: str, image_size: int, *, blur: bool, randaugment: bool = False) -> augment_jax.ViewAugment:
    return augment_jax.ViewAugment(
        path=path,
        color_strength=1.0,
        randaugment=randaugment,
        blur=blur,
        blur_sigma_groups=None,
        solarize_p=0.0,
        image_size=image_size,
    )


def test_pretrain_device_augment():
    images = jnp.asarray(_colour_images(32, size=20))
    step = jax.jit(
        augment_jax.pretrain_device_augment,
        static_argnames=("color_on_device", "blur", "blur_sigma_groups", "blur_padding", "solarize_p"),
    )
    out = step(images, jax.random.key(0), color_on_device=True, blur_sigma_groups=8, solarize_p=1.0)
    out = np.asarray(out)
    assert out.shape == images.shape and out.min() >= 0
    assert out.max() <= 0.5 + 1e-6  # solarized everywhere, and blurring cannot exceed the maximum
    assert 0 < _is_grey(out).sum() < 32
    identity = augment_jax.pretrain_device_augment(images, jax.random.key(0), color_on_device=False, blur=False)
    np.testing.assert_array_equal(identity, images)
    with pytest.raises(ValueError, match="solarize_p.*color_on_device"):
        augment_jax.pretrain_device_augment(images, jax.random.key(0), color_on_device=False, solarize_p=0.2)


def test_augment_views_rescales_uint8_and_augments_each_view_tensor_separately():
    settings = _view_augment(layout.DEVICE_COLOUR, 16, blur=True)
    pixels = RNG.integers(0, 256, (6, 3, 16, 16, 3)).astype(np.uint8)  # (B, V, H, W, 3)
    key = jax.random.key(3)
    jitted = jax.jit(augment_jax.augment_views, static_argnames="settings")

    def views(images, settings=settings):
        return np.asarray(jitted({"images": images}, key, settings=settings))

    from_uint8 = views(jnp.asarray(pixels))
    assert from_uint8.dtype == np.float32 and from_uint8.shape == pixels.shape
    # The same images in every view slot: the V view tensors must still get different draws.
    out = views(jnp.repeat(jnp.asarray(pixels[:, :1]), 3, axis=1))
    assert not np.allclose(out[:, 0], out[:, 1]) and not np.allclose(out[:, 1], out[:, 2])
    nothing = dataclasses.replace(settings, path=layout.HOST, blur=False)
    np.testing.assert_array_equal(views(jnp.asarray(pixels / 255.0, jnp.float32), nothing), pixels / np.float32(255))
    # Without blur the device colour path on uint8 views is the colour ops on the rescaled views.
    colour = views(jnp.asarray(pixels), dataclasses.replace(settings, blur=False))
    keys = jax.random.split(key, 3)
    for view in range(3):
        expected = augment_jax.pretrain_device_augment(
            jnp.asarray(pixels[:, view], jnp.float32) / 255.0, keys[view], color_on_device=True, blur=False
        )
        np.testing.assert_allclose(colour[:, view], expected, atol=1e-5)  # float rounding: fused apart


@pytest.mark.parametrize("path", layout.DATA_PATHS)
def test_host_views_read_the_batch_of_their_path_and_name_a_mismatch(path):
    """Each data path takes its own batch layout (`layout.BATCH_LAYOUTS`) and no other: the error names the
    path, what the batch holds and what was expected."""
    canvases, crops = layout.random_canvases(2, 3, canvas=10)
    batches = {
        layout.HOST: {"images": np.zeros((2, 3, 8, 8, 3), np.float32)},
        layout.DEVICE_COLOUR: {"images": np.zeros((2, 3, 8, 8, 3), np.uint8)},
        layout.DEVICE_CROP: {"images": canvases, "crops": crops},
    }
    settings = _view_augment(path, 8, blur=False)
    labels = {"labels": np.zeros(2, np.int32)}
    views = augment_jax.host_views({**batches[path], **labels}, settings)
    assert views.shape == (2, 3, 8, 8, 3) and views.dtype == jnp.float32
    for other, batch in batches.items():
        if other != path:
            with pytest.raises(ValueError, match=f"data path '{path}' must hold .*; this one holds .*images: ") as err:
                augment_jax.host_views({**batch, **labels}, settings)
            assert "augment.on_device" in str(err.value)
    with pytest.raises(ValueError, match="data path 'gpu' is invalid: allowed are host, device_colour, device_crop"):
        dataclasses.replace(settings, path="gpu")


def test_view_augment_from_config():
    from fnc_jax import config_base

    config = config_base.pretrain_config()
    config.augment.on_device, config.augment.use_randaugment, config.augment.blur_sigma = True, False, "per_device"
    settings = augment_jax.ViewAugment.from_config(config, num_devices=8)
    assert settings.path == layout.DEVICE_COLOUR and settings.color_on_device and not settings.randaugment
    assert settings.blur and settings.blur_sigma_groups == 8 and settings.image_size == config.data.image_size
    config.augment.blur_sigma = "per_image"
    assert augment_jax.ViewAugment.from_config(config, num_devices=8).blur_sigma_groups is None
    config.augment.crop_on_device, config.augment.use_randaugment = True, True
    settings = augment_jax.ViewAugment.from_config(config, num_devices=8)
    assert settings.path == layout.DEVICE_CROP and settings.randaugment
    config.augment.on_device = config.augment.crop_on_device = False  # RandAugment stays on the host
    settings = augment_jax.ViewAugment.from_config(config, num_devices=8)
    assert settings.path == layout.HOST and not settings.color_on_device and not settings.randaugment


PHOTO = np.asarray(tf.image.resize(tf.constant(RNG.integers(0, 256, (12, 15, 3)), tf.float32), (60, 75)))


@pytest.mark.parametrize("size", [24, 96])  # the crops (6 to 75 px) are both shrunk and enlarged
def test_crop_resize_is_the_host_crop_resize_and_flip(size):
    """The device cut of a view (`crop_on_device`) equals TF1's legacy bicubic resize of the host's crop
    then its flip, over random crops, flips and crops touching every edge: same taps and weights, so
    only float rounding differs (XLA fuses the sums; op by op it is bitwise)."""
    image = tf.constant(np.clip(np.round(PHOTO), 0, 255).astype(np.uint8))  # smooth enough to overshoot
    canvas, shape = augment.fit_canvas(image, 80)
    assert canvas.shape == (80, 80, 3) and tuple(shape.numpy()) == (60, 75, 3)
    np.testing.assert_array_equal(canvas.numpy()[:60, :75], image.numpy())
    assert not canvas.numpy()[60:].any() and not canvas.numpy()[:, 75:].any()
    cut = jax.jit(augment_jax.crop_resize, static_argnums=2)
    flips = 0
    for i in range(16):
        seed = tf.constant([i, 5], tf.int64)
        crop = augment.crop_and_flip(shape, seed).numpy()
        seeds = augment.view_seeds(seed)  # the one seed layout of a view, shared by the device cut
        host = augment.random_resized_crop(image, seeds.crop, size=size, unit_scale=False)
        host = augment.random_flip(host, seeds.flip).numpy()
        np.testing.assert_allclose(
            cut(jnp.asarray(canvas.numpy()), jnp.asarray(crop), size), host, rtol=1e-6, atol=1e-4
        )
        flips += crop[4]
    assert 3 <= flips <= 13
    for crop in ([0, 0, 60, 75, 0], [54, 70, 6, 5, 1], [0, 69, 60, 6, 0]):  # whole image, corners, edges
        host = augment.resize_bicubic_legacy(
            tf.cast(image, tf.float32)[crop[0] : crop[0] + crop[2], crop[1] : crop[1] + crop[3]], size, size
        )
        host = host.numpy()[:, ::-1] if crop[4] else host.numpy()
        np.testing.assert_allclose(
            cut(jnp.asarray(canvas.numpy()), jnp.asarray(crop), size), host, rtol=1e-6, atol=1e-4
        )


def test_fit_canvas_shrinks_larger_images_keeping_the_aspect():
    image = tf.constant(np.clip(np.round(PHOTO), 0, 255).astype(np.uint8))  # 60 x 75
    canvas, shape = augment.fit_canvas(image, 30)
    assert canvas.shape == (30, 30, 3) and tuple(shape.numpy()) == (24, 30, 3)
    small = canvas.numpy()[:24].astype(np.float64)
    assert not canvas.numpy()[24:].any()
    assert abs(small.mean() - image.numpy().mean()) < 1.0  # area averaging keeps the mean


def test_host_views_cut_canvases_per_view_and_clip():
    settings = _view_augment(layout.DEVICE_CROP, 8, blur=False)
    canvases = RNG.integers(0, 256, (2, 10, 10, 3)).astype(np.uint8)
    crops = np.array([[[0, 0, 10, 10, 0], [2, 3, 4, 5, 1]], [[1, 1, 8, 9, 0], [0, 0, 10, 10, 1]]], np.int32)
    views = np.asarray(augment_jax.host_views({"images": jnp.asarray(canvases), "crops": jnp.asarray(crops)}, settings))
    assert views.shape == (2, 2, 8, 8, 3) and views.min() >= 0.0 and views.max() <= 1.0
    for b in range(2):
        for v in range(2):
            one = np.clip(np.asarray(augment_jax.crop_resize(canvases[b], crops[b, v], 8)), 0, 255) / 255
            np.testing.assert_allclose(views[b, v], one, rtol=1e-6)
    unflipped = np.clip(np.asarray(augment_jax.crop_resize(canvases[1], np.array([0, 0, 10, 10, 0]), 8)), 0, 255)
    np.testing.assert_allclose(views[1, 1], unflipped[:, ::-1] / 255, rtol=1e-6)  # flip = mirrored columns
    raw = np.asarray(augment_jax.crop_resize(canvases[0], crops[0, 0], 8))
    assert raw.min() < 0 or raw.max() > 255  # random pixels: the bicubic overshoot that host_views clips


def test_augment_views_cuts_sharded_canvases_like_one_device():
    """The train step's view path on a batch of canvases + crops sharded over 8 devices (as
    `parallel.global_batch` makes it), RandAugment included, gives the single-device views."""
    from fnc_jax import parallel

    settings = _view_augment(layout.DEVICE_CROP, 12, blur=True, randaugment=True)
    n, v = 16, 3
    canvases, crops = layout.random_canvases(n, v, canvas=20)
    batch = {"images": canvases, "crops": crops}
    step = jax.jit(augment_jax.augment_views, static_argnames="settings")
    key = jax.random.key(4)
    one = np.asarray(step(jax.tree.map(jnp.asarray, batch), key, settings=settings))
    sharded = step(parallel.global_batch(batch, parallel.create_mesh(jax.devices()[:8])), key, settings=settings)
    assert one.shape == (n, v, 12, 12, 3) and len(sharded.sharding.device_set) == 8
    # Float rounding only (the two programs fuse the colour ops differently): up to ~1.5e-6 measured.
    np.testing.assert_allclose(np.asarray(sharded), one, atol=1e-5)
