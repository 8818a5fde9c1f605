"""RandAugment on the host: TensorFlow ops on uint8 images with the TPU-models EfficientNet `autoaugment`
module's semantics (the official FNC pipeline's), including its quirks.

The list of ops, their arguments at a magnitude and the fill value live in `randaugment_policy`, shared
with the device implementation (`randaugment_jax`); this module only applies them. Random draws come
from the `seed` argument (`stateless`), so an augmented image is a pure function of (image, seed).
"""

from collections.abc import Sequence

import tensorflow as tf

from fnc_jax.data import randaugment_policy as policy
from fnc_jax.data import stateless


def _blend(image1: tf.Tensor, image2: tf.Tensor, factor: float) -> tf.Tensor:
    """image1 + factor·(image2 − image1) on uint8, truncated; clipped only when extrapolating."""
    if factor == 0.0:
        return image1
    if factor == 1.0:
        return image2
    image1 = tf.cast(image1, tf.float32)
    blended = image1 + factor * (tf.cast(image2, tf.float32) - image1)
    if not 0.0 < factor < 1.0:
        blended = tf.clip_by_value(blended, 0.0, 255.0)
    return tf.cast(blended, tf.uint8)


def _autocontrast(image: tf.Tensor) -> tf.Tensor:
    """Stretches each channel to [0, 255] (PIL's autocontrast without cutoff); flat channels are kept."""
    pixels = tf.cast(image, tf.float32)
    lo = tf.reduce_min(pixels, axis=[0, 1])
    hi = tf.reduce_max(pixels, axis=[0, 1])
    scale = 255.0 / tf.maximum(hi - lo, 1.0)
    stretched = tf.cast(tf.clip_by_value(pixels * scale - lo * scale, 0.0, 255.0), tf.uint8)
    return tf.where(hi > lo, stretched, image)


def _equalize(image: tf.Tensor) -> tf.Tensor:
    """PIL's equalize per channel: lookup table from the cumulative histogram, whose step ignores the
    last occupied bin; channels with a zero step are kept."""
    values = tf.transpose(tf.cast(image, tf.int32), [2, 0, 1])  # (3, H, W)
    binned = values + 256 * tf.range(3)[:, tf.newaxis, tf.newaxis]
    histogram = tf.reshape(tf.math.bincount(tf.reshape(binned, [-1]), minlength=768, maxlength=768), [3, 256])
    last_occupied = tf.gather(histogram, tf.reduce_max(values, axis=[1, 2]), batch_dims=1)
    step = (tf.reduce_sum(histogram, axis=1) - last_occupied) // 255
    safe_step = tf.maximum(step, 1)[:, tf.newaxis]
    lut = (tf.cumsum(histogram, axis=1) + safe_step // 2) // safe_step
    lut = tf.clip_by_value(tf.pad(lut[:, :-1], [[0, 0], [1, 0]]), 0, 255)
    equalized = tf.gather(lut, values, batch_dims=1)
    equalized = tf.where(step[:, tf.newaxis, tf.newaxis] > 0, equalized, values)
    return tf.cast(tf.transpose(equalized, [1, 2, 0]), tf.uint8)


def _contrast(image: tf.Tensor, factor: float) -> tf.Tensor:
    """Contrast around the official module's "mean", which is really (number of pixels) / 256.

    The module sums the grey-level histogram (the pixel count) and divides by 256 bins instead of
    averaging the grey levels: 196 at 224 px, 4 at 32 px. Kept because it shaped the published numbers.
    """
    pixels = tf.cast(tf.shape(image)[0] * tf.shape(image)[1], tf.float32)
    degenerate = tf.cast(tf.clip_by_value(pixels / 256.0, 0.0, 255.0), tf.uint8)
    return _blend(tf.fill(tf.shape(image), degenerate), image, factor)


def _sharpness(image: tf.Tensor, factor: float) -> tf.Tensor:
    """PIL's sharpness: blend with the 3×3 SMOOTH filter output; the 1-px border stays original."""
    kernel = tf.constant([[1, 1, 1], [1, 5, 1], [1, 1, 1]], tf.float32) / 13.0
    kernel = tf.tile(kernel[:, :, tf.newaxis, tf.newaxis], [1, 1, 3, 1])
    smooth = tf.nn.depthwise_conv2d(tf.cast(image, tf.float32)[tf.newaxis], kernel, [1, 1, 1, 1], "VALID")[0]
    smooth = tf.cast(tf.clip_by_value(smooth, 0.0, 255.0), tf.uint8)
    interior = tf.pad(tf.ones_like(smooth, tf.bool), [[1, 1], [1, 1], [0, 0]])
    degenerate = tf.where(interior, tf.pad(smooth, [[1, 1], [1, 1], [0, 0]]), image)
    return _blend(degenerate, image, factor)


def _affine(image: tf.Tensor, transform: Sequence[tf.Tensor | float]) -> tf.Tensor:
    """Projective transform (output → input coordinates), nearest neighbour, grey outside the image.

    The module painted grey where a transformed all-ones alpha channel became 0; with nearest-neighbour
    sampling that is exactly the set of outputs sampled outside the image, i.e. the op's fill value.
    """
    transform = tf.reshape(tf.stack([tf.cast(t, tf.float32) for t in transform]), [1, 8])
    return tf.raw_ops.ImageProjectiveTransformV3(
        images=image[tf.newaxis],
        transforms=transform,
        output_shape=tf.shape(image)[:2],
        fill_value=float(policy.GRAY),
        interpolation="NEAREST",
        fill_mode="CONSTANT",
    )[0]


def _rotate(image: tf.Tensor, degrees: tf.Tensor) -> tf.Tensor:
    """Rotation about the image centre (tf.contrib.image.rotate's transform)."""
    height = tf.cast(tf.shape(image)[0], tf.float32) - 1.0
    width = tf.cast(tf.shape(image)[1], tf.float32) - 1.0
    radians = degrees * (3.141592653589793 / 180.0)
    cos, sin = tf.cos(radians), tf.sin(radians)
    x_offset = (width - (cos * width - sin * height)) / 2.0
    y_offset = (height - (sin * width + cos * height)) / 2.0
    return _affine(image, [cos, -sin, x_offset, sin, cos, y_offset, 0.0, 0.0])


def _cutout(image: tf.Tensor, seed: tf.Tensor, half_size: int) -> tf.Tensor:
    """Grey square of side 2·half_size (clipped at the borders) centred at a uniform pixel."""
    height, width = tf.shape(image)[0], tf.shape(image)[1]
    y_seed, x_seed = stateless.split(seed, 2)
    cy = tf.random.stateless_uniform([], y_seed, minval=0, maxval=height, dtype=tf.int32)
    cx = tf.random.stateless_uniform([], x_seed, minval=0, maxval=width, dtype=tf.int32)
    rows, cols = tf.range(height), tf.range(width)
    in_rows = (rows >= cy - half_size) & (rows < cy + half_size)
    in_cols = (cols >= cx - half_size) & (cols < cx + half_size)
    inside = (in_rows[:, tf.newaxis] & in_cols[tf.newaxis, :])[:, :, tf.newaxis]
    return tf.where(inside, tf.constant(policy.GRAY, tf.uint8), image)


@stateless.plain_tf
def rand_augment_op(
    image: tf.Tensor, index: int | tf.Tensor, seed: tf.Tensor, *, magnitude: int = policy.MAGNITUDE
) -> tf.Tensor:
    """Applies op `policy.OPS[index]` at `magnitude` (of 10) to a uint8 image; `seed` draws the
    sign of signed arguments (positive with p = 0.5) and the cutout centre.

    Arguments at magnitude 7: rotate ±21°, posterize 2 bits, solarize 179, solarize-add +77 below 128,
    enhance factor 1.36, shear ±0.21, translate ±70 px, cutout half-size 28.
    """
    args = policy.arguments(magnitude)
    level = args.level
    sign_seed, cutout_seed = stateless.split(seed, 2)
    sign = tf.where(stateless.uniform(sign_seed, 0.0, 1.0) < policy.NEGATE_P, -1.0, 1.0)
    enhance = args.enhance
    shear = sign * level * args.shear_scale
    shift = sign * level * args.translate_scale
    bits = args.posterize_bits
    threshold = args.solarize_threshold
    addition = args.solarize_addition

    def posterize() -> tf.Tensor:
        drop = 8 - bits
        return tf.bitwise.left_shift(tf.bitwise.right_shift(image, drop), drop)

    def solarize_add() -> tf.Tensor:
        added = tf.cast(tf.clip_by_value(tf.cast(image, tf.int32) + addition, 0, 255), tf.uint8)
        return tf.where(image < 128, added, image)

    branches = {
        "AutoContrast": lambda: _autocontrast(image),
        "Equalize": lambda: _equalize(image),
        "Invert": lambda: 255 - image,
        "Rotate": lambda: _rotate(image, sign * level * args.rotate_scale),
        "Posterize": posterize,
        "Solarize": lambda: tf.where(image < threshold, image, 255 - image),
        "Color": lambda: _blend(tf.image.grayscale_to_rgb(tf.image.rgb_to_grayscale(image)), image, enhance),
        "Contrast": lambda: _contrast(image, enhance),
        "Brightness": lambda: _blend(tf.zeros_like(image), image, enhance),
        "Sharpness": lambda: _sharpness(image, enhance),
        "ShearX": lambda: _affine(image, [1.0, shear, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0]),
        "ShearY": lambda: _affine(image, [1.0, 0.0, 0.0, shear, 1.0, 0.0, 0.0, 0.0]),
        "TranslateX": lambda: _affine(image, [1.0, 0.0, shift, 0.0, 1.0, 0.0, 0.0, 0.0]),
        "TranslateY": lambda: _affine(image, [1.0, 0.0, 0.0, 0.0, 1.0, shift, 0.0, 0.0]),
        "Cutout": lambda: _cutout(image, cutout_seed, args.cutout_half_size),
        "SolarizeAdd": solarize_add,
    }
    index = tf.convert_to_tensor(index, tf.int32)
    result = tf.switch_case(index, [branches[name] for name in policy.OPS])
    return tf.ensure_shape(result, image.shape)


def layer_draws(seed: tf.Tensor, num_layers: int) -> list[tuple[tf.Tensor, tf.Tensor]]:
    """(op index, uniform over `policy.OPS`; seed of the op's arguments) of each layer."""
    draws = []
    for layer_seed in stateless.split(seed, num_layers):
        op_seed, arg_seed = stateless.split(layer_seed, 2)
        index = tf.random.stateless_uniform([], op_seed, minval=0, maxval=len(policy.OPS), dtype=tf.int32)
        draws.append((index, arg_seed))
    return draws


@stateless.plain_tf
def rand_augment(
    image: tf.Tensor, seed: tf.Tensor, *, num_layers: int = policy.NUM_LAYERS, magnitude: int = policy.MAGNITUDE
) -> tf.Tensor:
    """RandAugment on a float [0, 1] image: each layer applies one uniformly chosen op, always.

    Converts to uint8 as trunc(min(x·255.5, 255)) and back with /255, as the official pipeline did.
    """
    image = tf.image.convert_image_dtype(image, tf.uint8, saturate=True)
    for index, arg_seed in layer_draws(seed, num_layers):
        image = rand_augment_op(image, index, arg_seed, magnitude=magnitude)
    return tf.image.convert_image_dtype(image, tf.float32)
