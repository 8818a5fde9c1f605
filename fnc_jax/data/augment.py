"""Host-side augmentation: stateless TensorFlow ops that build one view per call inside `tf.data`.

Every random draw is a `tf.random.stateless_*` draw from sub-seeds of the `seed` argument (a shape-(2,)
int32/int64 tensor), so a view is a pure function of (image, seed): a resumed run that replays the same
seeds rebuilds exactly the same views. The semantics are those of the official FNC / SimCLR v2 pipeline
(docs/training_recipe.md §2 and §7), including its quirks (§9.2). All functions work in graph mode on images
of dynamic height and width; images are (H, W, 3).
"""

import functools
from collections.abc import Callable, Sequence

import tensorflow as tf

from fnc_jax.data import randaugment_policy as policy

# The whole image as the only "object" box: `min_object_covered` then bounds the crop area from below.
_WHOLE_IMAGE = (((0.0, 0.0, 1.0, 1.0),),)


RAND_AUGMENT_OPS = policy.OPS


# These functions use explicit tf.cond / tf.switch_case and no Python control flow on tensors, so
# AutoGraph has nothing to convert; skipping its source transformation makes tracing (e.g. in
# `tf.data.Dataset.map`) several times faster.
_plain_tf = tf.autograph.experimental.do_not_convert


def _split(seed: tf.Tensor, num: int) -> list[tf.Tensor]:
    return tf.unstack(tf.random.experimental.stateless_split(seed, num))


def _uniform(seed: tf.Tensor, minval: float, maxval: float) -> tf.Tensor:
    return tf.random.stateless_uniform([], seed, minval=minval, maxval=maxval)


@_plain_tf
def resize_bicubic_legacy(image: tf.Tensor, height: int, width: int) -> tf.Tensor:
    """TF1 `resize_bicubic`: source coordinate = index·in/out, Keys a = −0.75, edges clamped.

    This is neither TF2 `tf.image.resize(..., 'bicubic')` nor PIL; the official pipeline used it, so
    crops keep its slight shift and overshoot (removed later by the pipeline's clip). Returns float32.
    """
    resized = tf.raw_ops.ResizeBicubic(
        images=image[tf.newaxis], size=[height, width], align_corners=False, half_pixel_centers=False
    )
    return resized[0]


@_plain_tf
def sample_crop_box(
    image_shape: tf.Tensor,
    seed: tf.Tensor,
    *,
    area_range: Sequence[float] = (0.08, 1.0),
    aspect_range: Sequence[float] = (3 / 4, 4 / 3),
    min_object_covered: float = 0.1,
    max_attempts: int = 100,
) -> tuple[tf.Tensor, tf.Tensor]:
    """Crop window (begin [y, x, 0], size [h, w, -1]) with `sample_distorted_bounding_box` semantics.

    Uniform aspect ratio, uniform integer height, last offset never drawn, area ≥ `min_object_covered`
    of the image (so the effective minimum area is 0.1, not 0.08), whole image after `max_attempts`.
    """
    begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
        image_shape,
        bounding_boxes=tf.constant(_WHOLE_IMAGE, tf.float32),
        seed=seed,
        min_object_covered=min_object_covered,
        aspect_ratio_range=list(aspect_range),
        area_range=list(area_range),
        max_attempts=max_attempts,
        use_image_if_no_bounding_boxes=True,
    )
    return begin, size


@_plain_tf
def random_resized_crop(
    image: tf.Tensor,
    seed: tf.Tensor,
    *,
    size: int,
    area_range: Sequence[float] = (0.08, 1.0),
    aspect_range: Sequence[float] = (3 / 4, 4 / 3),
    min_object_covered: float = 0.1,
    max_attempts: int = 100,
    unit_scale: bool = True,
) -> tf.Tensor:
    """Random crop (§2.1 sampler) of a uint8 image resized to size×size by legacy bicubic; float32.

    On the [0, 1] scale, or with `unit_scale=False` on the image's 0–255 scale (skips the scaling
    pass; a plain float cast is also faster than resizing uint8 directly, whose kernel converts per tap).
    """
    begin, crop_size = sample_crop_box(
        tf.shape(image),
        seed,
        area_range=area_range,
        aspect_range=aspect_range,
        min_object_covered=min_object_covered,
        max_attempts=max_attempts,
    )
    crop = tf.slice(image, begin, crop_size)
    crop = tf.image.convert_image_dtype(crop, tf.float32) if unit_scale else tf.cast(crop, tf.float32)
    return resize_bicubic_legacy(crop, size, size)


@_plain_tf
def random_flip(image: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
    """Horizontal flip with probability 0.5."""
    return tf.image.stateless_random_flip_left_right(image, seed)


@_plain_tf
def crop_and_flip(image_shape: tf.Tensor, seed: tf.Tensor, *, area_range: Sequence[float] = (0.08, 1.0)) -> tf.Tensor:
    """int32 (top, left, height, width, flip) of a pretraining view: `pretrain_view`'s own draws.

    The crop box comes from the same sub-seed and sampler, and `flip` is 1 exactly when
    `stateless_random_flip_left_right` mirrors (its uniform draw < 0.5), so the device can cut and
    resize the same view (`augment_jax.crop_resize_views`).
    """
    crop_seed, flip_seed = _split(seed, 6)[:2]
    begin, size = sample_crop_box(image_shape, crop_seed, area_range=area_range)
    flip = tf.cast(_uniform(flip_seed, 0.0, 1.0) < 0.5, tf.int32)
    return tf.concat([begin[:2], size[:2], flip[tf.newaxis]], 0)


@_plain_tf
def fit_canvas(image: tf.Tensor, canvas_size: int) -> tuple[tf.Tensor, tf.Tensor]:
    """(canvas, shape): the uint8 image at the top-left of a zero canvas_size × canvas_size canvas,
    and the shape (H, W, 3) it has there, which crops are drawn from.

    An image with a side over `canvas_size` is first shrunk to fit, aspect kept (area averaging, then
    rounded): crops of it are then cut from the smaller image, a departure from the recipe that
    `augment.canvas_size` >= the largest image avoids.
    """
    shape = tf.shape(image)
    too_big = tf.reduce_max(shape[:2]) > canvas_size

    def shrink() -> tf.Tensor:
        small = tf.image.resize(image, (canvas_size, canvas_size), method="area", preserve_aspect_ratio=True)
        return tf.saturate_cast(tf.round(small), tf.uint8)

    image = tf.cond(too_big, shrink, lambda: image)
    return tf.image.pad_to_bounding_box(image, 0, 0, canvas_size, canvas_size), tf.shape(image)


@_plain_tf
def random_apply(fn: Callable[[tf.Tensor], tf.Tensor], image: tf.Tensor, seed: tf.Tensor, p: float) -> tf.Tensor:
    """`fn(image)` with probability `p`, else `image`; `seed` draws only the coin.

    `fn` runs without AutoGraph (like everything here), so it must use TF control flow explicitly.
    """
    return tf.cond(_uniform(seed, 0.0, 1.0) < p, lambda: fn(image), lambda: image)


@_plain_tf
def to_grayscale(image: tf.Tensor) -> tf.Tensor:
    """Luma with weights 0.2989 / 0.5870 / 0.1140, copied to 3 channels."""
    return tf.tile(tf.image.rgb_to_grayscale(image), [1, 1, 3])


@_plain_tf
def color_jitter(image: tf.Tensor, seed: tf.Tensor, *, strength: float = 1.0) -> tf.Tensor:
    """SimCLR v2 colour jitter (§2.3): 4 ops in a fresh random order, each followed by clip(0, 1).

    Brightness is multiplicative; contrast, saturation and hue use TF's `adjust_*` kernels. The lower
    factor bound is clamped at 0 (the official code crashes for strength > 1.25 instead).
    """
    order_seed, b_seed, c_seed, s_seed, h_seed = _split(seed, 5)
    lower, upper = max(0.0, 1.0 - 0.8 * strength), 1.0 + 0.8 * strength
    brightness = _uniform(b_seed, lower, upper)
    contrast = _uniform(c_seed, lower, upper)
    saturation = _uniform(s_seed, lower, upper)
    hue = _uniform(h_seed, -0.2 * strength, 0.2 * strength)
    order = tf.argsort(tf.random.stateless_uniform([4], order_seed))
    for i in range(4):
        branches = [
            lambda x=image: x * brightness,
            lambda x=image: tf.image.adjust_contrast(x, contrast),
            lambda x=image: tf.image.adjust_saturation(x, saturation),
            lambda x=image: tf.image.adjust_hue(x, hue),
        ]
        image = tf.clip_by_value(tf.switch_case(order[i], branches), 0.0, 1.0)
    return image


# ---------------------------------------------------------------------------------------------------
# RandAugment (TPU-models EfficientNet `autoaugment` module), on uint8 images.


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
    y_seed, x_seed = _split(seed, 2)
    cy = tf.random.stateless_uniform([], y_seed, minval=0, maxval=height, dtype=tf.int32)
    cx = tf.random.stateless_uniform([], x_seed, minval=0, maxval=width, dtype=tf.int32)
    rows, cols = tf.range(height), tf.range(width)
    in_rows = (rows >= cy - half_size) & (rows < cy + half_size)
    in_cols = (cols >= cx - half_size) & (cols < cx + half_size)
    inside = (in_rows[:, tf.newaxis] & in_cols[tf.newaxis, :])[:, :, tf.newaxis]
    return tf.where(inside, tf.constant(policy.GRAY, tf.uint8), image)


@_plain_tf
def rand_augment_op(image: tf.Tensor, index: int | tf.Tensor, seed: tf.Tensor, *, magnitude: int = 7) -> tf.Tensor:
    """Applies op `RAND_AUGMENT_OPS[index]` at `magnitude` (of 10) to a uint8 image; `seed` draws the
    sign of signed arguments (positive with p = 0.5) and the cutout centre.

    Arguments at magnitude 7: rotate ±21°, posterize 2 bits, solarize 179, solarize-add +77 below 128,
    enhance factor 1.36, shear ±0.21, translate ±70 px, cutout half-size 28.
    """
    args = policy.arguments(magnitude)
    level = args.level
    sign_seed, cutout_seed = _split(seed, 2)
    sign = tf.where(_uniform(sign_seed, 0.0, 1.0) < 0.5, -1.0, 1.0)
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
    result = tf.switch_case(index, [branches[name] for name in RAND_AUGMENT_OPS])
    return tf.ensure_shape(result, image.shape)


@_plain_tf
def rand_augment(image: tf.Tensor, seed: tf.Tensor, *, num_layers: int = 2, magnitude: int = 7) -> tf.Tensor:
    """RandAugment on a float [0, 1] image: each layer applies one uniformly chosen op, always.

    Converts to uint8 as trunc(min(x·255.5, 255)) and back with /255, as the official pipeline did.
    """
    image = tf.image.convert_image_dtype(image, tf.uint8, saturate=True)
    for layer_seed in _split(seed, num_layers):
        op_seed, arg_seed = _split(layer_seed, 2)
        index = tf.random.stateless_uniform([], op_seed, minval=0, maxval=len(RAND_AUGMENT_OPS), dtype=tf.int32)
        image = rand_augment_op(image, index, arg_seed, magnitude=magnitude)
    return tf.image.convert_image_dtype(image, tf.float32)


# ---------------------------------------------------------------------------------------------------
# Whole views.


@_plain_tf
def pretrain_view(
    image: tf.Tensor,
    seed: tf.Tensor,
    *,
    image_size: int,
    color_strength: float = 1.0,
    use_randaugment: bool = True,
    color_on_device: bool = False,
    area_range: Sequence[float] = (0.08, 1.0),
) -> tf.Tensor:
    """One pretraining view (image_size, image_size, 3) of a uint8 image (blur is left to the device).

    Official order: crop → flip → jitter (p 0.8) → clip → RandAugment → grayscale (p 0.2). Without
    RandAugment, SimCLR's: crop → flip → jitter (p 0.8) → grayscale (p 0.2) → clip. These return
    float32 in [0, 1]. With `color_on_device`, only crop → clip → flip here, and the view is returned
    as uint8 (the bicubic output rounded, at most 0.5/255 off): 4x fewer bytes to batch and send, and
    `augment_jax.augment_views` rescales it and does the rest on the device. The crop and flip draw
    from the same sub-seeds in every mode.
    """
    if color_on_device and use_randaugment:
        raise ValueError(
            "color_on_device=True requires use_randaugment=False: RandAugment runs on the host between "
            "colour jitter and grayscale, so the colour ops cannot move to the device around it."
        )
    crop_seed, flip_seed, jitter_coin, jitter_seed, randaug_seed, gray_coin = _split(seed, 6)
    shape = (image_size, image_size, 3)
    if color_on_device:
        view = random_resized_crop(image, crop_seed, size=image_size, area_range=area_range, unit_scale=False)
        view = tf.saturate_cast(tf.round(view), tf.uint8)  # clips the bicubic overshoot, as below
        return tf.ensure_shape(random_flip(view, flip_seed), shape)
    view = random_resized_crop(image, crop_seed, size=image_size, area_range=area_range)
    view = random_flip(view, flip_seed)
    jitter = functools.partial(color_jitter, seed=jitter_seed, strength=color_strength)
    view = random_apply(jitter, view, jitter_coin, 0.8)
    if use_randaugment:
        view = rand_augment(tf.clip_by_value(view, 0.0, 1.0), randaug_seed)
    view = random_apply(to_grayscale, view, gray_coin, 0.2)
    return tf.ensure_shape(tf.clip_by_value(view, 0.0, 1.0), shape)


@_plain_tf
def finetune_view(image: tf.Tensor, seed: tf.Tensor, *, image_size: int) -> tf.Tensor:
    """Linear-eval / fine-tuning training view: crop with area (0.2, 1.0), flip, clip."""
    crop_seed, flip_seed = _split(seed, 2)
    view = random_resized_crop(image, crop_seed, size=image_size, area_range=(0.2, 1.0))
    view = random_flip(view, flip_seed)
    return tf.ensure_shape(tf.clip_by_value(view, 0.0, 1.0), (image_size, image_size, 3))


@_plain_tf
def eval_preprocess(image: tf.Tensor, *, image_size: int) -> tf.Tensor:
    """Evaluation view (§7): centre crop of side rint(0.875·min(H, W)), legacy bicubic, clip.

    At image_size ≤ 32 (CIFAR-like) there is no crop, and a resize only if the source size differs.
    """
    image = tf.image.convert_image_dtype(image, tf.float32)
    height, width = tf.shape(image)[0], tf.shape(image)[1]
    if image_size <= 32:
        same_size = (height == image_size) & (width == image_size)
        resized = functools.partial(resize_bicubic_legacy, image, image_size, image_size)
        image = tf.cond(same_size, lambda: image, resized)
    else:
        side = tf.cast(tf.math.rint(0.875 * tf.cast(tf.minimum(height, width), tf.float32)), tf.int32)
        top, left = (height - side + 1) // 2, (width - side + 1) // 2
        crop = tf.slice(image, [top, left, 0], [side, side, -1])
        image = resize_bicubic_legacy(crop, image_size, image_size)
    return tf.ensure_shape(tf.clip_by_value(image, 0.0, 1.0), (image_size, image_size, 3))
