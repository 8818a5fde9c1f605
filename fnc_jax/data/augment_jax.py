"""Device-side augmentation: pure JAX ops that run inside the jitted train step (BYOL style).

Each per-image op is `(image (H, W, 3) float32 in [0, 1], key) -> image`; the `batch_*` forms vmap it
over per-image keys from `jax.random.split(key, N)`. The colour ops match the host ops in `augment.py`
(TensorFlow's `adjust_*` kernels), so moving colour work onto the accelerator changes where it runs,
not what it computes. Blur is always done here, batched over one view tensor (docs/training_recipe.md §2.5).
With `augment.crop_on_device` the views themselves are cut here too (`crop_resize`: TF1's legacy
bicubic resize of the host's crop boxes, on canvases of the decoded images). Which of these run is the
data path (`layout.DATA_PATHS`), a static setting of the step, never a guess from the batch.
"""

import dataclasses
import functools
import itertools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from fnc_jax.data import layout, randaugment_jax, recipe

_GRAY_WEIGHTS = (0.2989, 0.5870, 0.1140)
# Orders of the colour-jitter ops (0 brightness, 1 contrast, 2 saturation, 3 hue).
_PERMUTATIONS = np.array(list(itertools.permutations(range(4))), np.int32)
# RandAugment's key is folded in from a view tensor's key, so the four older streams keep their draws.
_RANDAUGMENT_STREAM = 4


def rgb_to_hsv(rgb: jax.Array) -> jax.Array:
    """RGB → HSV, all channels in [0, 1]; hue 0 for greys (as TF's kernel)."""
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    value = jnp.max(rgb, axis=-1)
    spread = value - jnp.min(rgb, axis=-1)
    saturation = jnp.where(value > 0, spread / jnp.where(value > 0, value, 1.0), 0.0)
    safe = jnp.where(spread > 0, spread, 1.0)
    hue = jnp.where(r == value, (g - b) / safe, jnp.where(g == value, (b - r) / safe + 2.0, (r - g) / safe + 4.0))
    hue = jnp.where(spread > 0, jnp.mod(hue / 6.0, 1.0), 0.0)
    return jnp.stack([hue, saturation, value], axis=-1)


def hsv_to_rgb(hsv: jax.Array) -> jax.Array:
    """HSV → RGB with the continuous form of the piecewise formula (hue 1.0 is the same as 0.0)."""
    hue, saturation, value = hsv[..., 0], hsv[..., 1], hsv[..., 2]
    offsets = jnp.array([5.0, 3.0, 1.0])  # R, G, B
    k = jnp.mod(offsets + hue[..., None] * 6.0, 6.0)
    ramp = jnp.clip(jnp.minimum(k, 4.0 - k), 0.0, 1.0)
    return value[..., None] - (value * saturation)[..., None] * ramp


def adjust_brightness(image: jax.Array, factor: jax.Array) -> jax.Array:
    """Multiplicative brightness (SimCLR v2)."""
    return image * factor


def adjust_contrast(image: jax.Array, factor: jax.Array) -> jax.Array:
    """Per-channel contrast around the spatial mean (`tf.image.adjust_contrast`)."""
    mean = jnp.mean(image, axis=(-3, -2), keepdims=True)
    return (image - mean) * factor + mean


def _adjust_hsv(image: jax.Array, saturation_factor: jax.Array, hue_delta: jax.Array) -> jax.Array:
    """Saturation scaling (clipped to [0, 1]) and hue rotation (mod 1) in one HSV round trip."""
    hue, saturation, value = jnp.moveaxis(rgb_to_hsv(image), -1, 0)
    hue = jnp.mod(hue + hue_delta, 1.0)
    saturation = jnp.clip(saturation * saturation_factor, 0.0, 1.0)
    return hsv_to_rgb(jnp.stack([hue, saturation, value], axis=-1))


def adjust_saturation(image: jax.Array, factor: jax.Array) -> jax.Array:
    """Scales HSV saturation, clipped to [0, 1] (`tf.image.adjust_saturation`)."""
    return _adjust_hsv(image, factor, 0.0)


def adjust_hue(image: jax.Array, delta: jax.Array) -> jax.Array:
    """Rotates hue by `delta` turns, mod 1 (`tf.image.adjust_hue`)."""
    return _adjust_hsv(image, 1.0, delta)


def to_grayscale(image: jax.Array) -> jax.Array:
    """Luma (0.2989 / 0.5870 / 0.1140) copied to 3 channels."""
    luma = image @ jnp.asarray(_GRAY_WEIGHTS, image.dtype)
    return jnp.repeat(luma[..., None], 3, axis=-1)


def _maybe(key: jax.Array, p: float, transformed: jax.Array, image: jax.Array) -> jax.Array:
    return jnp.where(jax.random.uniform(key) < p, transformed, image)


def color_jitter(image: jax.Array, key: jax.Array, *, strength: float = 1.0, p: float = recipe.JITTER_P) -> jax.Array:
    """With probability p: brightness, contrast, saturation, hue in a random order, each clipped to [0, 1].

    Same factor ranges as the host `augment.color_jitter`: U[max(0, 1 − 0.8s), 1 + 0.8s) for the first
    three, hue shift U[−0.2s, 0.2s). Under vmap every branch of a switch would run, so one scan step
    serves all four ops (saturation and hue share the HSV round trip, the unused one at its identity
    value), and the order is one of the 24 permutations picked by a single uniform draw.
    """
    coin, b, c, s, h, pick = jax.random.uniform(key, (6,))
    spread = recipe.JITTER_SPREAD * strength  # strength may be traced
    lower, upper = jnp.maximum(0.0, 1.0 - spread), 1.0 + spread
    brightness, contrast, saturation = (lower + (upper - lower) * u for u in (b, c, s))
    hue = recipe.HUE_SPREAD * strength * (2.0 * h - 1.0)
    order = jnp.asarray(_PERMUTATIONS)[jnp.minimum(jnp.floor(pick * 24).astype(jnp.int32), 23)]

    def step(x: jax.Array, op: jax.Array) -> tuple[jax.Array, None]:
        hsv = _adjust_hsv(x, jnp.where(op == 2, saturation, 1.0), jnp.where(op == 3, hue, 0.0))
        out = jnp.where(op == 1, adjust_contrast(x, contrast), hsv)
        out = jnp.where(op == 0, adjust_brightness(x, brightness), out)
        return jnp.clip(out, 0.0, 1.0), None

    jittered, _ = jax.lax.scan(step, image, order)
    return jnp.where(coin < p, jittered, image)


def grayscale(image: jax.Array, key: jax.Array, *, p: float = recipe.GRAYSCALE_P) -> jax.Array:
    """`to_grayscale` with probability p."""
    return _maybe(key, p, to_grayscale(image), image)


def solarize(image: jax.Array, key: jax.Array, *, p: float, threshold: float = 0.5) -> jax.Array:
    """With probability p, inverts the pixels at or above `threshold` (x → 1 − x)."""
    return _maybe(key, p, jnp.where(image < threshold, image, 1.0 - image), image)


def _per_image(op, images: jax.Array, key: jax.Array, **kwargs) -> jax.Array:
    keys = jax.random.split(key, images.shape[0])
    return jax.vmap(functools.partial(op, **kwargs))(images, keys)


def batch_color_jitter(
    images: jax.Array, key: jax.Array, *, strength: float = 1.0, p: float = recipe.JITTER_P
) -> jax.Array:
    """`color_jitter` on (N, H, W, 3) with an independent draw per image."""
    return _per_image(color_jitter, images, key, strength=strength, p=p)


def batch_grayscale(images: jax.Array, key: jax.Array, *, p: float = recipe.GRAYSCALE_P) -> jax.Array:
    """`grayscale` on (N, H, W, 3) with an independent coin per image."""
    return _per_image(grayscale, images, key, p=p)


def batch_solarize(images: jax.Array, key: jax.Array, *, p: float, threshold: float = 0.5) -> jax.Array:
    """`solarize` on (N, H, W, 3) with an independent coin per image."""
    return _per_image(solarize, images, key, p=p, threshold=threshold)


def gaussian_kernel(sigma: jax.Array, image_size: int) -> jax.Array:
    """Normalised 1-D Gaussian taps: radius (image_size // 10) // 2, so 23 taps at 224 px, 3 at 32 px,
    and a single tap (identity) below 20 px."""
    radius = (image_size // 10) // 2
    x = jnp.arange(-radius, radius + 1, dtype=jnp.float32)
    taps = jnp.exp(-(x**2) / (2.0 * jnp.square(sigma)))
    return taps / jnp.sum(taps)


def _blur_along(images: jax.Array, kernels: jax.Array, axis: int, padding: str) -> jax.Array:
    """Correlates each image of (N, H, W, C) along `axis` with its own symmetric kernel (N, taps).

    A sum of shifted slices rather than a grouped convolution: exact in float32 on every backend, and
    the batch axis stays untouched, so a batch-sharded array needs no communication.
    """
    taps = kernels.shape[1]
    radius = taps // 2
    pad = [(0, 0)] * images.ndim
    pad[axis] = (radius, radius)
    padded = jnp.pad(images, pad, mode="constant" if padding == "zeros" else "reflect")
    size = images.shape[axis]
    weights = kernels[:, :, None, None, None]  # (N, taps, 1, 1, 1)
    return sum(weights[:, t] * jax.lax.slice_in_dim(padded, t, t + size, axis=axis) for t in range(taps))


def gaussian_blur(
    images: jax.Array,
    key: jax.Array,
    *,
    p: float = recipe.BLUR_P,
    sigma_range: Sequence[float] = recipe.BLUR_SIGMA_RANGE,
    num_sigma_groups: int | None = None,
    padding: str = "zeros",
) -> jax.Array:
    """Separable Gaussian blur of (N, H, W, 3): horizontal then vertical, kept per image with prob p,
    then clip(0, 1).

    σ ~ U(sigma_range) per image by default. `num_sigma_groups=G` makes G contiguous groups of N/G
    images share one σ: with G = number of devices and a device-major batch this is the official
    one-σ-per-device-batch quirk. `padding="zeros"` (official) darkens the borders; "reflect" does not.
    """
    if padding not in ("zeros", "reflect"):
        raise ValueError(f"padding must be 'zeros' or 'reflect', got {padding!r}")
    n, height = images.shape[0], images.shape[1]
    sigma_key, apply_key = jax.random.split(key)
    low, high = sigma_range
    if num_sigma_groups is None:
        sigma = jax.random.uniform(sigma_key, (n,), minval=low, maxval=high)
    else:
        if n % num_sigma_groups:
            raise ValueError(f"num_sigma_groups={num_sigma_groups} must divide the batch size {n}")
        sigma = jax.random.uniform(sigma_key, (num_sigma_groups,), minval=low, maxval=high)
        sigma = jnp.repeat(sigma, n // num_sigma_groups)
    kernels = jax.vmap(gaussian_kernel, in_axes=(0, None))(sigma, height)
    blurred = _blur_along(_blur_along(images, kernels, 2, padding), kernels, 1, padding)
    keep = jax.random.uniform(apply_key, (n, 1, 1, 1)) < p
    return jnp.clip(jnp.where(keep, blurred, images), 0.0, 1.0)


# TF1 `resize_bicubic` (half_pixel_centers=False) reads its Keys-cubic weights (a = -0.75) from a table
# over 1024 sub-pixel offsets, built in double precision and stored as float32: kept identical here.
_BICUBIC_TABLE_SIZE = 1024


def _legacy_bicubic_table() -> np.ndarray:
    a, x = -0.75, np.arange(_BICUBIC_TABLE_SIZE + 1, dtype=np.float64) / _BICUBIC_TABLE_SIZE
    near = ((a + 2) * x - (a + 3)) * x * x + 1  # weight at distance x in [0, 1]
    far = ((a * (x + 1) - 5 * a) * (x + 1) + 8 * a) * (x + 1) - 4 * a  # at distance x + 1
    return np.stack([near, far], axis=-1).astype(np.float32)


_BICUBIC_TABLE = _legacy_bicubic_table()


def legacy_bicubic_taps(start: jax.Array, length: jax.Array, out_size: int) -> tuple[jax.Array, jax.Array]:
    """Source indices and weights, each (out_size, 4), resizing [start, start + length) to out_size.

    TF1 `resize_bicubic` along one axis: source = index · (length / out_size) in float32, taps at
    floor − 1 … floor + 2 clamped to the crop (edge pixels repeat), weights from the table at the
    fractional part rounded to 1/1024.
    """
    scale = length.astype(jnp.float32) / out_size
    source = jnp.arange(out_size, dtype=jnp.float32) * scale
    floor = jnp.floor(source)
    offset = jnp.round((source - floor) * _BICUBIC_TABLE_SIZE).astype(jnp.int32)  # lrintf: half to even
    table = jnp.asarray(_BICUBIC_TABLE)
    ahead, behind = table[offset], table[_BICUBIC_TABLE_SIZE - offset]  # distances from the taps
    weights = jnp.stack([ahead[:, 1], ahead[:, 0], behind[:, 0], behind[:, 1]], axis=-1)
    taps = floor.astype(jnp.int32)[:, None] + jnp.arange(-1, 3)
    return start + jnp.clip(taps, 0, length - 1), weights


def crop_resize(canvas: jax.Array, crop: jax.Array, size: int) -> jax.Array:
    """One view (size, size, 3) float32 on the 0–255 scale, cut from a uint8 canvas (C, C, 3).

    `crop` = int32 (top, left, height, width, flip) from `augment.crop_and_flip`: the legacy bicubic
    resize of the crop, then the flip, as the host computes them, in two separable 4-tap passes
    (rows, then columns, the order of TF's kernel). Not clipped: the bicubic overshoot remains.
    Each pass gathers whole rows (of the canvas, then of the transposed intermediate) and weights the 4
    taps with a float32 contraction: 5-6x faster on XLA:CPU than a gather along the second axis or a
    multiply-and-sum, and at full precision on GPUs (no TF32).
    """
    top, left, height, width, flip = (crop[i] for i in range(5))
    rows, row_weights = legacy_bicubic_taps(top, height, size)
    cols, col_weights = legacy_bicubic_taps(left, width, size)
    mirrored = flip > 0
    cols = jnp.where(mirrored, cols[::-1], cols)
    col_weights = jnp.where(mirrored, col_weights[::-1], col_weights)
    exact = jax.lax.Precision.HIGHEST
    by_rows = jnp.einsum("skwc,sk->swc", canvas[rows].astype(jnp.float32), row_weights, precision=exact)
    by_cols = jnp.einsum("tksc,tk->tsc", jnp.swapaxes(by_rows, 0, 1)[cols], col_weights, precision=exact)
    return jnp.swapaxes(by_cols, 0, 1)  # (size, size, 3)


def crop_resize_views(canvases: jax.Array, crops: jax.Array, size: int) -> jax.Array:
    """Views (B, V, size, size, 3) float32 in [0, 1] from canvases (B, C, C, 3) and crops (B, V, 5)."""
    views = jax.vmap(jax.vmap(crop_resize, in_axes=(None, 0, None)), in_axes=(0, 0, None))(canvases, crops, size)
    return jnp.clip(views, 0.0, 255.0) / 255.0


def pretrain_device_augment(
    images: jax.Array,
    key: jax.Array,
    *,
    color_on_device: bool,
    color_strength: float = 1.0,
    randaugment: bool = False,
    blur: bool = True,
    blur_sigma_groups: int | None = None,
    blur_padding: str = "zeros",
    solarize_p: float = 0.0,
) -> jax.Array:
    """Device part of a pretraining view, applied to one view tensor (N, H, W, 3).

    With `color_on_device` (host did only crop and flip), the host's order (`augment.pretrain_view`):
    jitter (p 0.8) → clip → RandAugment(2, 7) (if `randaugment`, per-image keys) → grayscale (p 0.2)
    → clip → solarize (if solarize_p > 0). Then blur (p 0.5) if `blur`.
    """
    if solarize_p > 0 and not color_on_device:
        raise ValueError("solarize_p > 0 requires color_on_device=True (solarization follows the device colour ops)")
    if randaugment and not color_on_device:
        raise ValueError("randaugment=True requires color_on_device=True (it runs between jitter and grayscale)")
    color_key, gray_key, solarize_key, blur_key = jax.random.split(key, 4)
    if color_on_device:
        images = batch_color_jitter(images, color_key, strength=color_strength)
        if randaugment:
            randaugment_key = jax.random.fold_in(key, _RANDAUGMENT_STREAM)
            images = randaugment_jax.batch_rand_augment(jnp.clip(images, 0.0, 1.0), randaugment_key)
        images = jnp.clip(batch_grayscale(images, gray_key), 0.0, 1.0)
        if solarize_p > 0:
            images = batch_solarize(images, solarize_key, p=solarize_p)
    if blur:
        images = gaussian_blur(images, blur_key, num_sigma_groups=blur_sigma_groups, padding=blur_padding)
    return images


@dataclasses.dataclass(frozen=True)
class ViewAugment:
    """Static settings of the device part of the pretraining views (hashable: part of jit cache keys).

    `path` (`layout.DATA_PATHS`) is what the host sends and so what runs here; `randaugment` is
    RandAugment on the device, which needs the colour ops here too (on the host path it runs there).
    """

    path: str
    color_strength: float
    randaugment: bool
    blur: bool
    blur_sigma_groups: int | None
    solarize_p: float
    image_size: int

    def __post_init__(self) -> None:
        layout.check_path(self.path)

    @property
    def color_on_device(self) -> bool:
        return self.path != layout.HOST

    @classmethod
    def from_config(cls, config: ml_collections.ConfigDict, num_devices: int) -> "ViewAugment":
        """From `config.augment` and the view size `config.data.image_size`; `blur_sigma='per_device'`
        draws one blur sigma per device group."""
        augment = config.augment
        path = layout.data_path(config)
        return cls(
            path=path,
            color_strength=float(augment.color_strength),
            randaugment=bool(augment.use_randaugment) and path != layout.HOST,
            blur=bool(augment.blur),
            blur_sigma_groups=num_devices if augment.blur_sigma == "per_device" else None,
            solarize_p=float(augment.solarize_p),
            image_size=int(config.data.image_size),
        )


def host_views(batch: dict[str, jax.Array], settings: ViewAugment) -> jax.Array:
    """The views of a host batch as the host pipeline made them: (B, V, S, S, 3) float32 in [0, 1].

    By the data path (`layout.BATCH_LAYOUTS`, checked): the host sends float32 views, uint8 views
    (`augment.on_device`: 4x fewer bytes), or, with `augment.crop_on_device`, one uint8 canvas per image
    (B, C, C, 3) and its views' crops (B, V, 5), which are cut and resized here.
    """
    layout.check_batch(settings.path, batch)
    images = batch["images"]
    if settings.path == layout.DEVICE_CROP:
        return crop_resize_views(images, batch["crops"], settings.image_size)
    if settings.path == layout.DEVICE_COLOUR:
        return images.astype(jnp.float32) / 255.0
    return images


def augment_views(batch: dict[str, jax.Array], key: jax.Array, settings: ViewAugment) -> jax.Array:
    """The pretraining views (B, V, S, S, 3) float32 in [0, 1] of a host batch, device part applied.

    `host_views`, then colour and RandAugment (with `augment.on_device`) and blur. Each of the V view
    tensors gets its own key, as in the official pipeline.
    """
    images = host_views(batch, settings)
    if not (settings.blur or settings.color_on_device):
        return images
    one_view = functools.partial(
        pretrain_device_augment,
        color_on_device=settings.color_on_device,
        color_strength=settings.color_strength,
        randaugment=settings.randaugment,
        blur=settings.blur,
        blur_sigma_groups=settings.blur_sigma_groups,
        solarize_p=settings.solarize_p,
    )
    return jax.vmap(one_view, in_axes=(1, 0), out_axes=1)(images, jax.random.split(key, images.shape[1]))
