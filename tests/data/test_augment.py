"""Host-side augmentation (fnc_jax.data.augment): exact values where the recipe fixes them, binomial
statistics for the coins, determinism in seeds, and graph mode (tf.data) on dynamic shapes."""

import numpy as np
import pytest
import tensorflow as tf

from fnc_jax.data import augment, randaugment_host, randaugment_policy

RNG = np.random.default_rng(0)
COLOUR_IMAGE = RNG.integers(0, 256, (24, 20, 3)).astype(np.uint8)


def _seed(i: int) -> tf.Tensor:
    return tf.constant([i, 1234], tf.int64)


def _over_seeds(fn, n: int) -> np.ndarray:
    """fn(seed) for seeds [i, 1234], i < n, run as one batched tf.data pipeline (graph mode)."""
    seeds = tf.data.Dataset.range(n).map(lambda i: tf.stack([i, tf.constant(1234, tf.int64)]))
    return seeds.map(fn).batch(n).get_single_element().numpy()


def _within_binomial(count: int, n: int, p: float, sds: float = 4.0) -> bool:
    return abs(count - n * p) <= sds * np.sqrt(n * p * (1 - p))


def _rand_augment(image: np.ndarray, name: str, seed: int = 0) -> np.ndarray:
    index = randaugment_policy.OPS.index(name)
    return randaugment_host.rand_augment_op(tf.constant(image), index, _seed(seed)).numpy()


# --- resize and crop --------------------------------------------------------------------------------


def test_legacy_bicubic_matches_the_recipe_test_vector():
    row = tf.constant([0.0, 1.0, 2.0])[tf.newaxis, :, tf.newaxis]  # (1, 3, 1)
    out = augment.resize_bicubic_legacy(row, 1, 6).numpy().ravel()
    np.testing.assert_allclose(out, [0, 0.40625, 1, 1.59375, 2, 2.09375], atol=1e-6)


def test_legacy_bicubic_keeps_uint8_scale_and_returns_float32():
    image = tf.constant(COLOUR_IMAGE)
    out = augment.resize_bicubic_legacy(image, 24, 20)
    assert out.dtype == tf.float32
    np.testing.assert_allclose(out.numpy(), COLOUR_IMAGE, atol=1e-4)  # same size: exact samples


@pytest.mark.parametrize("area_range", [(0.08, 1.0), (0.2, 1.0)])
def test_crop_box_respects_sampler_bounds(area_range):
    height, width, n = 100, 80, 300
    boxes = _over_seeds(
        lambda s: tf.concat(augment.sample_crop_box(tf.constant([height, width, 3]), s, area_range=area_range), 0),
        n,
    )
    y, x, h, w = boxes[:, 0], boxes[:, 1], boxes[:, 3], boxes[:, 4]
    area = h * w / (height * width)
    assert np.all((y >= 0) & (x >= 0) & (y + h <= height) & (x + w <= width))
    assert area.min() >= max(0.1, area_range[0])  # min_object_covered makes 0.1 the floor
    assert area.max() <= 1.0
    assert area.min() < area_range[0] + 0.1 and area.max() > 0.7  # the range is actually explored
    aspect = w / h
    assert np.all((aspect > 0.75 - 1.0 / h) & (aspect < 4 / 3 + 1.0 / h))  # width = round(h·r)
    assert 0.85 < aspect.mean() < 1.2
    # The last offset is never drawn: a crop spanning all but one row never starts at row 1.
    assert not np.any((h == height - 1) & (y == 1))


def test_random_resized_crop_shape_scale_and_determinism():
    image = tf.constant(COLOUR_IMAGE)
    out = augment.random_resized_crop(image, _seed(1), size=16)
    assert out.shape == (16, 16, 3) and out.dtype == tf.float32
    assert -0.2 < out.numpy().min() and out.numpy().max() < 1.2  # [0, 1] scale, bicubic overshoot only
    from_float = augment.random_resized_crop(tf.constant(COLOUR_IMAGE / 255.0, tf.float32), _seed(1), size=16)
    np.testing.assert_allclose(out.numpy(), from_float.numpy(), atol=1e-5)
    np.testing.assert_array_equal(out.numpy(), augment.random_resized_crop(image, _seed(1), size=16).numpy())
    assert not np.allclose(out.numpy(), augment.random_resized_crop(image, _seed(2), size=16).numpy())


# --- coins and colour ---------------------------------------------------------------------------------


def test_flip_frequency_is_one_half():
    image = tf.constant(np.arange(8, dtype=np.float32).reshape(1, 8, 1) * np.ones((2, 1, 3), np.float32))
    out = _over_seeds(lambda s: augment.random_flip(image, s), 400)
    flipped = out[:, 0, 0, 0] == 7.0
    assert np.all(flipped | (out[:, 0, 0, 0] == 0.0))
    assert _within_binomial(flipped.sum(), 400, 0.5)


@pytest.mark.parametrize("p", [0.2, 0.8])
def test_random_apply_frequency(p):
    out = _over_seeds(lambda s: augment.random_apply(lambda x: x + 1.0, tf.zeros([]), s, p), 400)
    assert set(np.unique(out)) <= {0.0, 1.0}
    assert _within_binomial(out.sum(), 400, p)


def test_to_grayscale_weights():
    image = tf.constant(np.eye(3, dtype=np.float32)[np.newaxis])  # pure R, G, B pixels
    out = augment.to_grayscale(image).numpy()[0]
    np.testing.assert_allclose(out, np.repeat(np.array([[0.2989], [0.5870], [0.1140]]), 3, 1), atol=1e-6)


def test_color_jitter_brightness_is_multiplicative_in_its_range():
    # On a constant grey image contrast, saturation and hue are no-ops: only brightness acts.
    grey = tf.fill([2, 2, 3], 0.5)
    out = _over_seeds(lambda s: augment.color_jitter(grey, s)[0, 0, 0], 300)
    assert np.all((out >= 0.1 - 1e-6) & (out < 0.9 + 1e-6))  # 0.5 · U[0.2, 1.8)
    assert out.min() < 0.2 and out.max() > 0.8 and abs(out.mean() - 0.5) < 0.05


def test_color_jitter_zero_strength_is_identity_and_output_is_clipped():
    image = tf.constant(COLOUR_IMAGE / 255.0, tf.float32)
    identity = augment.color_jitter(image, _seed(0), strength=0.0)
    np.testing.assert_allclose(identity.numpy(), image.numpy(), atol=1e-5)
    out = _over_seeds(lambda s: augment.color_jitter(image, s), 50)
    assert out.min() >= 0.0 and out.max() <= 1.0
    assert len({o.tobytes() for o in out}) == 50


# --- RandAugment ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", randaugment_policy.OPS)
def test_rand_augment_op_smoke(name):
    out = _rand_augment(COLOUR_IMAGE, name, seed=3)
    assert out.dtype == np.uint8 and out.shape == COLOUR_IMAGE.shape
    np.testing.assert_array_equal(out, _rand_augment(COLOUR_IMAGE, name, seed=3))
    if name not in ("AutoContrast", "Sharpness"):  # near no-ops on a full-range noise image
        assert np.mean(out != COLOUR_IMAGE) > 0.05


def test_rand_augment_pointwise_ops_exact():
    x = COLOUR_IMAGE.astype(int)
    assert set(np.unique(_rand_augment(COLOUR_IMAGE, "Posterize"))) <= {0, 64, 128, 192}  # 2 bits
    np.testing.assert_array_equal(_rand_augment(COLOUR_IMAGE, "Posterize"), x & 0b11000000)
    np.testing.assert_array_equal(_rand_augment(COLOUR_IMAGE, "Solarize"), np.where(x < 179, x, 255 - x))
    np.testing.assert_array_equal(
        _rand_augment(COLOUR_IMAGE, "SolarizeAdd"), np.where(x < 128, np.minimum(x + 77, 255), x)
    )
    np.testing.assert_array_equal(_rand_augment(COLOUR_IMAGE, "Invert"), 255 - x)
    np.testing.assert_array_equal(
        _rand_augment(COLOUR_IMAGE, "Brightness"), np.clip(x * np.float32(1.36), 0, 255).astype(int)
    )


def test_rand_augment_contrast_keeps_the_official_pixel_count_mean():
    # 16×16 = 256 pixels, so the module's "mean" is 256 / 256 = 1, whatever the image.
    image = RNG.integers(0, 256, (16, 16, 3)).astype(np.uint8)
    expected = np.clip(1.0 + 1.36 * (image.astype(np.float32) - 1.0), 0, 255).astype(int)
    assert np.abs(_rand_augment(image, "Contrast").astype(int) - expected).max() <= 1


def test_rand_augment_matches_pil_where_the_module_claims_equivalence():
    image_module = pytest.importorskip("PIL.Image")
    from PIL import ImageEnhance, ImageOps

    image = RNG.integers(20, 200, (16, 20, 3)).astype(np.uint8)
    image[..., 2] = 77  # a flat channel: equalize and autocontrast must leave it alone
    pil = image_module.fromarray(image)
    references = {
        "Equalize": (ImageOps.equalize(pil), 0),
        "AutoContrast": (ImageOps.autocontrast(pil), 1),  # TF truncates where PIL rounds
        "Sharpness": (ImageEnhance.Sharpness(pil).enhance(1.36), 1),
        "Color": (ImageEnhance.Color(pil).enhance(1.36), 1),
    }
    for name, (reference, tolerance) in references.items():
        diff = np.abs(_rand_augment(image, name).astype(int) - np.asarray(reference).astype(int))
        assert diff.max() <= tolerance, name


@pytest.mark.parametrize("axis", [1, 0])
def test_rand_augment_translate_shifts_70_px_and_fills_grey(axis):
    line = np.arange(100, dtype=np.uint8).reshape((1, 100) if axis else (100, 1))
    ramp = np.ascontiguousarray(np.broadcast_to(line[..., None], (100, 100, 3)))
    name = "TranslateX" if axis else "TranslateY"
    signs = set()
    for seed in range(8):
        out = np.moveaxis(_rand_augment(ramp, name, seed), axis, 0)[:, 0, 0]  # one line along the axis
        grey = out == 128
        assert grey.sum() == 70
        kept = out[~grey]
        if grey[0]:  # content moved towards the end
            np.testing.assert_array_equal(kept, np.arange(30))
            signs.add(-1)
        else:
            np.testing.assert_array_equal(kept, np.arange(70, 100))
            signs.add(1)
    assert signs == {-1, 1}


def test_rand_augment_cutout_is_a_grey_square_of_side_at_most_56():
    image = np.zeros((64, 64, 3), np.uint8)
    for seed in range(4):
        grey = np.all(_rand_augment(image, "Cutout", seed) == 128, axis=-1)
        rows, cols = np.flatnonzero(grey.any(1)), np.flatnonzero(grey.any(0))
        assert 28 <= len(rows) <= 56 and 28 <= len(cols) <= 56
        assert grey.sum() == len(rows) * len(cols)  # one full rectangle
        assert np.all(_rand_augment(image, "Cutout", seed)[~grey] == 0)


def test_rand_augment_rotate_and_shear_fill_grey_and_keep_anchors():
    image = np.full((33, 33, 3), 10, np.uint8)
    rotated = _rand_augment(image, "Rotate")
    assert np.all(rotated[[0, 0, -1, -1], [0, -1, 0, -1]] == 128)  # corners leave the frame at 21°
    assert np.all(rotated[16, 16] == 10)  # centre of rotation
    ramp = RNG.integers(0, 100, (33, 33, 3)).astype(np.uint8)
    np.testing.assert_array_equal(_rand_augment(ramp, "ShearX")[0], ramp[0])  # x_in = x + 0.21·y
    np.testing.assert_array_equal(_rand_augment(ramp, "ShearY")[:, 0], ramp[:, 0])  # y_in = y + 0.21·x
    assert np.any(_rand_augment(ramp, "ShearX") == 128) and np.any(_rand_augment(ramp, "ShearY") == 128)


def test_rand_augment_round_trips_through_uint8():
    image = tf.constant(COLOUR_IMAGE / 255.0, tf.float32)
    out = _over_seeds(lambda s: randaugment_host.rand_augment(image, s), 16)
    assert out.shape == (16, 24, 20, 3) and out.min() >= 0 and out.max() <= 1
    np.testing.assert_allclose(out * 255, np.round(out * 255), atol=1e-3)
    assert len({o.tobytes() for o in out}) > 12


# --- whole views -----------------------------------------------------------------------------------------


def test_pretrain_view_coin_frequencies_simclr_order():
    """Against the crop+flip-only view of the same seed: grey 0.2, untouched 0.8·0.2, jittered 0.8·0.8."""
    image = tf.constant(COLOUR_IMAGE)
    n = 400
    views = _over_seeds(lambda s: augment.pretrain_view(image, s, image_size=8, use_randaugment=False), n)
    bases = _over_seeds(
        lambda s: augment.pretrain_view(image, s, image_size=8, use_randaugment=False, color_on_device=True),
        n,
    )
    grey = np.all(views == views[..., :1], axis=(1, 2, 3))
    # The on_device host view is the same crop + flip, rounded to uint8.
    untouched = np.all(np.abs(views - bases / 255.0) <= 0.5 / 255 + 1e-6, axis=(1, 2, 3))
    assert views.min() >= 0 and views.max() <= 1
    assert _within_binomial(grey.sum(), n, 0.2)
    assert _within_binomial(untouched.sum(), n, 0.16)
    assert _within_binomial((~grey & ~untouched).sum(), n, 0.64)


def test_pretrain_view_with_randaugment_greys_after_randaugment_and_graph_matches_eager():
    image = tf.constant(COLOUR_IMAGE)
    views = _over_seeds(lambda s: augment.pretrain_view(image, s, image_size=16), 64)
    assert views.shape == (64, 16, 16, 3) and views.min() >= 0 and views.max() <= 1
    # RandAugment leaves values on the uint8 grid; only a later grayscale takes them off it.
    off_grid = ~np.all(np.abs(views * 255 - np.round(views * 255)) < 1e-3, axis=(1, 2, 3))
    grey = np.all(views == views[..., :1], axis=(1, 2, 3))
    assert np.all(grey[off_grid]) and off_grid.sum() >= 4
    eager = augment.pretrain_view(image, tf.constant([7, 1234], tf.int64), image_size=16)
    np.testing.assert_array_equal(views[7], eager.numpy())  # a pure function of (image, seed)


def test_pretrain_view_dynamic_shapes_in_tf_data():
    sizes = tf.data.Dataset.from_tensor_slices([[20, 30], [31, 17], [24, 24]])
    images = sizes.map(lambda hw: tf.zeros(tf.concat([hw, [3]], 0), tf.uint8) + 100)
    views = images.enumerate().map(
        lambda i, im: augment.pretrain_view(im, tf.stack([i, 5]), image_size=8, use_randaugment=False)
    )
    batch = views.batch(3).get_single_element()
    assert batch.shape == (3, 8, 8, 3)


def test_on_device_host_view_is_the_rounded_uint8_crop_and_flip():
    """With colour on the device the host sends uint8: the float crop + flip + clip of the same seeds,
    rounded (the device rescales by 1/255)."""
    image = tf.constant(COLOUR_IMAGE)

    def float_view(seed):
        seeds = augment.view_seeds(seed)
        view = augment.random_resized_crop(image, seeds.crop, size=12, area_range=(0.2, 1.0))
        return tf.clip_by_value(augment.random_flip(view, seeds.flip), 0.0, 1.0)

    def uint8_view(seed):
        return augment.pretrain_view(
            image, seed, image_size=12, use_randaugment=False, color_on_device=True, area_range=(0.2, 1.0)
        )

    expected, got = _over_seeds(float_view, 64), _over_seeds(uint8_view, 64)
    assert got.dtype == np.uint8 and got.shape == (64, 12, 12, 3)
    np.testing.assert_allclose(got.astype(np.float32), expected * 255.0, atol=0.5 + 1e-3)
    assert len({g.tobytes() for g in got}) > 48  # seeds draw their own crops (whole-image fallbacks repeat)


def test_on_device_host_view_leaves_randaugment_to_the_device():
    """With colour on the device the host view is the uint8 crop + flip whether or not RandAugment is on
    (the device applies it), and RandAugment on the host changes the view."""
    image = tf.constant(COLOUR_IMAGE)

    def views(**kwargs):
        return _over_seeds(lambda s: augment.pretrain_view(image, s, image_size=8, **kwargs), 16)

    with_randaugment = views(color_on_device=True, use_randaugment=True)
    assert with_randaugment.dtype == np.uint8
    np.testing.assert_array_equal(with_randaugment, views(color_on_device=True, use_randaugment=False))
    assert not np.array_equal(views(use_randaugment=True), views(use_randaugment=False))


def test_finetune_view_shape_range_and_determinism():
    image = tf.constant(COLOUR_IMAGE)
    out = augment.finetune_view(image, _seed(3), image_size=16).numpy()
    assert out.shape == (16, 16, 3) and out.min() >= 0 and out.max() <= 1
    np.testing.assert_array_equal(out, augment.finetune_view(image, _seed(3), image_size=16).numpy())


def test_eval_preprocess_centre_crop_offsets_and_side():
    # min(H, W) = 44: side = rint(38.5) = 38 (half to even); offsets ((44-38)+1)//2 = 3, ((50-38)+1)//2 = 6.
    image = RNG.integers(0, 256, (44, 50, 3)).astype(np.uint8)
    out = augment.eval_preprocess(tf.constant(image), image_size=38).numpy()  # same size: no resampling
    np.testing.assert_allclose(out, image[3:41, 6:44] / 255.0, atol=1e-6)
    resized = augment.eval_preprocess(tf.constant(image), image_size=64).numpy()
    expected = augment.resize_bicubic_legacy(tf.constant(image[3:41, 6:44] / 255.0, tf.float32), 64, 64)
    np.testing.assert_allclose(resized, np.clip(expected.numpy(), 0, 1), atol=1e-6)


def test_eval_preprocess_small_images_are_not_cropped():
    image = RNG.integers(0, 256, (32, 32, 3)).astype(np.uint8)
    same = augment.eval_preprocess(tf.constant(image), image_size=32).numpy()
    np.testing.assert_allclose(same, image / 255.0, atol=1e-6)
    larger = RNG.integers(0, 256, (40, 36, 3)).astype(np.uint8)
    out = augment.eval_preprocess(tf.constant(larger), image_size=32).numpy()
    expected = augment.resize_bicubic_legacy(tf.constant(larger / 255.0, tf.float32), 32, 32).numpy()
    expected = np.clip(expected, 0, 1)
    np.testing.assert_allclose(out, expected, atol=1e-6)
