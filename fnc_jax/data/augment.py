"""Host-side augmentation: stateless TensorFlow ops that build one view per call inside `tf.data`.

Every random draw is a `tf.random.stateless_*` draw from sub-seeds of the `seed` argument (a shape-(2,)
int32/int64 tensor), so a view is a pure function of (image, seed): a resumed run that replays the same
seeds rebuilds exactly the same views. The semantics are those of the official FNC / SimCLR v2 pipeline
(docs/training_recipe.md §2 and §7), including its quirks (§9.2). All functions work in graph mode on images
of dynamic height and width; images are (H, W, 3). RandAugment's host ops are in `randaugment_host`.
"""

import functools
from collections.abc import Callable, Sequence
from typing import NamedTuple

import tensorflow as tf

from fnc_jax.data import randaugment_host, recipe, stateless

# The whole image as the only "object" box: `min_object_covered` then bounds the crop area from below.
_WHOLE_IMAGE = (((0.0, 0.0, 1.0, 1.0),),)


class ViewSeeds(NamedTuple):
    """The sub-seeds of one pretraining view's seed, in split order: the one layout shared by the host
    view (`pretrain_view`) and the crop and flip the host draws for a view the device cuts
    (`crop_and_flip`), so that both modes crop and flip a view alike."""

    crop: tf.Tensor
    flip: tf.Tensor
    jitter_coin: tf.Tensor
    jitter: tf.Tensor
    randaugment: tf.Tensor
    gray_coin: tf.Tensor


def view_seeds(seed: tf.Tensor) -> ViewSeeds:
    return ViewSeeds(*stateless.split(seed, len(ViewSeeds._fields)))


@stateless.plain_tf
def resize_bicubic_legacy(image: tf.Tensor, height: int, width: int) -> tf.Tensor:
    """TF1 `resize_bicubic`: source coordinate = index·in/out, Keys a = −0.75, edges clamped.

    This is neither TF2 `tf.image.resize(..., 'bicubic')` nor PIL; the official pipeline used it, so
    crops keep its slight shift and overshoot (removed later by the pipeline's clip). Returns float32.
    """
    resized = tf.raw_ops.ResizeBicubic(
        images=image[tf.newaxis], size=[height, width], align_corners=False, half_pixel_centers=False
    )
    return resized[0]


@stateless.plain_tf
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


@stateless.plain_tf
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


@stateless.plain_tf
def random_flip(image: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
    """Horizontal flip with probability 0.5."""
    return tf.image.stateless_random_flip_left_right(image, seed)


@stateless.plain_tf
def crop_and_flip(image_shape: tf.Tensor, seed: tf.Tensor, *, area_range: Sequence[float] = (0.08, 1.0)) -> tf.Tensor:
    """int32 (top, left, height, width, flip) of a pretraining view: `pretrain_view`'s own draws.

    The crop box comes from the same sub-seed (`view_seeds`) and sampler, and `flip` is 1 exactly when
    `stateless_random_flip_left_right` mirrors (its uniform draw < 0.5), so the device can cut and
    resize the same view (`augment_jax.crop_resize_views`).
    """
    seeds = view_seeds(seed)
    begin, size = sample_crop_box(image_shape, seeds.crop, area_range=area_range)
    flip = tf.cast(stateless.uniform(seeds.flip, 0.0, 1.0) < 0.5, tf.int32)
    return tf.concat([begin[:2], size[:2], flip[tf.newaxis]], 0)


@stateless.plain_tf
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


@stateless.plain_tf
def random_apply(fn: Callable[[tf.Tensor], tf.Tensor], image: tf.Tensor, seed: tf.Tensor, p: float) -> tf.Tensor:
    """`fn(image)` with probability `p`, else `image`; `seed` draws only the coin.

    `fn` runs without AutoGraph (like everything here), so it must use TF control flow explicitly.
    """
    return tf.cond(stateless.uniform(seed, 0.0, 1.0) < p, lambda: fn(image), lambda: image)


@stateless.plain_tf
def to_grayscale(image: tf.Tensor) -> tf.Tensor:
    """Luma with weights 0.2989 / 0.5870 / 0.1140, copied to 3 channels."""
    return tf.tile(tf.image.rgb_to_grayscale(image), [1, 1, 3])


@stateless.plain_tf
def color_jitter(image: tf.Tensor, seed: tf.Tensor, *, strength: float = 1.0) -> tf.Tensor:
    """SimCLR v2 colour jitter (§2.3): 4 ops in a fresh random order, each followed by clip(0, 1).

    Brightness is multiplicative; contrast, saturation and hue use TF's `adjust_*` kernels. The lower
    factor bound is clamped at 0 (the official code crashes for strength > 1.25 instead).
    """
    order_seed, b_seed, c_seed, s_seed, h_seed = stateless.split(seed, 5)
    spread, hue_spread = recipe.JITTER_SPREAD * strength, recipe.HUE_SPREAD * strength
    lower, upper = max(0.0, 1.0 - spread), 1.0 + spread
    brightness = stateless.uniform(b_seed, lower, upper)
    contrast = stateless.uniform(c_seed, lower, upper)
    saturation = stateless.uniform(s_seed, lower, upper)
    hue = stateless.uniform(h_seed, -hue_spread, hue_spread)
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
# Whole views.


@stateless.plain_tf
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
    `augment_jax.augment_views` rescales it and does the rest, RandAugment included, on the device
    (`use_randaugment` is then the device's to apply). The crop and flip draw from the same sub-seeds
    (`view_seeds`) in every mode.
    """
    seeds = view_seeds(seed)
    shape = (image_size, image_size, 3)
    if color_on_device:
        view = random_resized_crop(image, seeds.crop, size=image_size, area_range=area_range, unit_scale=False)
        view = tf.saturate_cast(tf.round(view), tf.uint8)  # clips the bicubic overshoot, as below
        return tf.ensure_shape(random_flip(view, seeds.flip), shape)
    view = random_resized_crop(image, seeds.crop, size=image_size, area_range=area_range)
    view = random_flip(view, seeds.flip)
    jitter = functools.partial(color_jitter, seed=seeds.jitter, strength=color_strength)
    view = random_apply(jitter, view, seeds.jitter_coin, recipe.JITTER_P)
    if use_randaugment:
        view = randaugment_host.rand_augment(tf.clip_by_value(view, 0.0, 1.0), seeds.randaugment)
    view = random_apply(to_grayscale, view, seeds.gray_coin, recipe.GRAYSCALE_P)
    return tf.ensure_shape(tf.clip_by_value(view, 0.0, 1.0), shape)


@stateless.plain_tf
def finetune_view(image: tf.Tensor, seed: tf.Tensor, *, image_size: int) -> tf.Tensor:
    """Linear-eval / fine-tuning training view: crop with area (0.2, 1.0), flip, clip."""
    crop_seed, flip_seed = stateless.split(seed, 2)
    view = random_resized_crop(image, crop_seed, size=image_size, area_range=(0.2, 1.0))
    view = random_flip(view, flip_seed)
    return tf.ensure_shape(tf.clip_by_value(view, 0.0, 1.0), (image_size, image_size, 3))


@stateless.plain_tf
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
