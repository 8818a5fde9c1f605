"""RandAugment on the device: pure JAX ops with the host's (`randaugment_host.rand_augment`) semantics.

Images are float32 (H, W, 3) on the uint8 grid (integers 0..255), as the host's uint8 images. Under vmap
every branch of a switch runs, so one layer is one fused pass whatever the op: a per-channel lookup table
(AutoContrast, Equalize, Invert, Posterize, Solarize, Contrast, Brightness, SolarizeAdd), a blend with a
degenerate image (Color, Sharpness), ONE affine nearest-neighbour resampling with grey fill (Rotate,
ShearX/Y, TranslateX/Y) and a cutout box; the ops not chosen run at their identity (identity table,
factor 1, identity matrix, empty box), which is exact on integers.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from fnc_jax.data import randaugment_policy as policy

_UNIT = np.float32(1.0 / 255.0)
_GREY_WEIGHTS = np.array([0.2989, 0.5870, 0.1140], np.float32)
_SMOOTH = np.array([[1, 1, 1], [1, 5, 1], [1, 1, 1]], np.float32) / np.float32(13.0)
_IDENTITY = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
_NONE, _GREY, _SMOOTHED = 0, 1, 2  # degenerate image of the blend stage


def to_grid(image: jax.Array) -> jax.Array:
    """[0, 1] float → the uint8 grid as the host converts: trunc(min(x·255.5, 255))."""
    return jnp.floor(jnp.clip(image * np.float32(255.5), 0.0, 255.0))


def from_grid(image: jax.Array) -> jax.Array:
    return image * _UNIT


def _blend_value(degenerate: jax.Array, image: jax.Array, factor: jax.Array) -> jax.Array:
    """The host's `_blend`: trunc(clip(d + f·(x − d))); exact for f = 0 and f = 1."""
    return jnp.floor(jnp.clip(degenerate + factor * (image - degenerate), 0.0, 255.0))


def _equalize_lut(q: jax.Array) -> jax.Array:
    """PIL's equalize table per channel (3, 256), the host's integer arithmetic."""
    values = q.astype(jnp.int32)
    index = values + 256 * jnp.arange(3)
    histogram = jnp.zeros(768, jnp.int32).at[index.reshape(-1)].add(1).reshape(3, 256)
    last = jnp.take_along_axis(histogram, jnp.max(values, axis=(0, 1))[:, None], axis=1)[:, 0]
    step = (jnp.sum(histogram, axis=1) - last) // 255
    safe = jnp.maximum(step, 1)[:, None]
    lut = (jnp.cumsum(histogram, axis=1) + safe // 2) // safe
    lut = jnp.clip(jnp.pad(lut[:, :-1], ((0, 0), (1, 0))), 0, 255)
    return jnp.where(step[:, None] > 0, lut, jnp.arange(256)).astype(jnp.float32)


def _luts(q: jax.Array, args: policy.Arguments) -> jax.Array:
    """(16, 3, 256) table of every op (identity for the ops that are no table)."""
    v = jnp.broadcast_to(jnp.arange(256, dtype=jnp.float32), (3, 256))
    lo, hi = jnp.min(q, axis=(0, 1))[:, None], jnp.max(q, axis=(0, 1))[:, None]
    scale = 255.0 / jnp.maximum(hi - lo, 1.0)
    autocontrast = jnp.where(hi > lo, jnp.floor(jnp.clip(v * scale - lo * scale, 0.0, 255.0)), v)
    drop = 2.0 ** (8 - args.posterize_bits)
    contrast_mean = float(int(min(q.shape[0] * q.shape[1] / 256.0, 255.0)))
    enhance = np.float32(args.enhance)
    tables = {
        "AutoContrast": autocontrast,
        "Equalize": _equalize_lut(q),
        "Invert": 255.0 - v,
        "Posterize": jnp.floor(v / drop) * drop,
        "Solarize": jnp.where(v < args.solarize_threshold, v, 255.0 - v),
        "Contrast": _blend_value(jnp.full_like(v, contrast_mean), v, enhance),
        "Brightness": _blend_value(jnp.zeros_like(v), v, enhance),
        "SolarizeAdd": jnp.where(v < 128, jnp.minimum(v + args.solarize_addition, 255.0), v),
    }
    return jnp.stack([tables.get(name, v) for name in policy.OPS])


def _matrices(shape: tuple[int, ...], sign: jax.Array, args: policy.Arguments) -> jax.Array:
    """(16, 6) output → input transforms (a0, a1, a2, a3, a4, a5), computed in the host's float32 order."""
    level = sign * np.float32(args.level)
    degrees = level * np.float32(args.rotate_scale)
    radians = degrees * np.float32(np.pi / 180.0)
    cos, sin = jnp.cos(radians), jnp.sin(radians)
    height, width = np.float32(shape[0] - 1), np.float32(shape[1] - 1)
    x_offset = (width - (cos * width - sin * height)) / 2.0
    y_offset = (height - (sin * width + cos * height)) / 2.0
    shear, shift = level * np.float32(args.shear_scale), level * np.float32(args.translate_scale)
    one, zero = jnp.float32(1.0), jnp.float32(0.0)
    transforms = {
        "Rotate": (cos, -sin, x_offset, sin, cos, y_offset),
        "ShearX": (one, shear, zero, zero, one, zero),
        "ShearY": (one, zero, zero, shear, one, zero),
        "TranslateX": (one, zero, shift, zero, one, zero),
        "TranslateY": (one, zero, zero, zero, one, shift),
    }
    identity = tuple(jnp.float32(t) for t in _IDENTITY)
    return jnp.stack([jnp.stack(transforms.get(name, identity)) for name in policy.OPS])


def _round_half_away(x: jax.Array) -> jax.Array:
    """std::round (TF's nearest-neighbour sampling), exactly: half away from zero."""
    t = jnp.trunc(x)
    return t + jnp.where(jnp.abs(x - t) >= 0.5, jnp.sign(x), 0.0)


def _resample(q: jax.Array, m: jax.Array) -> jax.Array:
    """`ImageProjectiveTransformV3` (NEAREST, CONSTANT fill 128) with an affine transform."""
    height, width = q.shape[0], q.shape[1]
    y, x = jnp.meshgrid(jnp.arange(height, dtype=jnp.float32), jnp.arange(width, dtype=jnp.float32), indexing="ij")
    x_in = _round_half_away(m[0] * x + m[1] * y + m[2])
    y_in = _round_half_away(m[3] * x + m[4] * y + m[5])
    inside = (x_in >= 0) & (x_in < width) & (y_in >= 0) & (y_in < height)
    flat = (jnp.where(inside, y_in, 0) * width + jnp.where(inside, x_in, 0)).astype(jnp.int32)
    sampled = q.reshape(-1, 3)[flat.reshape(-1)].reshape(q.shape)
    return jnp.where(inside[..., None], sampled, float(policy.GRAY))


def _smoothed(q: jax.Array) -> jax.Array:
    """PIL's SMOOTH filter (3×3, VALID, clipped, truncated) inside, the original on the 1-px border."""
    height, width = q.shape[0], q.shape[1]
    acc = sum(_SMOOTH[i, j] * q[i : height - 2 + i, j : width - 2 + j] for i in range(3) for j in range(3))
    smooth = jnp.floor(jnp.clip(acc, 0.0, 255.0))
    return q.at[1:-1, 1:-1].set(smooth)


def apply_op(q: jax.Array, index: jax.Array, magnitude: float, key: jax.Array) -> jax.Array:
    """Op `policy.OPS[index]` at `magnitude` on one image on the uint8 grid; `key` draws the sign of
    signed arguments (positive with p = 0.5) and the cutout centre, as the host's seed does."""
    args = policy.arguments(magnitude)
    sign_key, y_key, x_key = jax.random.split(key, 3)
    sign = jnp.where(jax.random.uniform(sign_key) < policy.NEGATE_P, -1.0, 1.0)
    height, width = q.shape[0], q.shape[1]
    lut = _luts(q, args)[index]
    q = jnp.take_along_axis(lut, q.astype(jnp.int32).reshape(-1, 3).T, axis=1).T.reshape(q.shape)
    kinds = jnp.array([{"Color": _GREY, "Sharpness": _SMOOTHED}.get(n, _NONE) for n in policy.OPS])[index]
    grey = jnp.floor((from_grid(q) @ _GREY_WEIGHTS) * np.float32(255.5))[..., None]
    degenerate = jnp.where(kinds == _GREY, grey, jnp.where(kinds == _SMOOTHED, _smoothed(q), q))
    q = _blend_value(degenerate, q, jnp.where(kinds == _NONE, 1.0, np.float32(args.enhance)))
    q = _resample(q, _matrices(q.shape, sign, args)[index])
    half = jnp.where(index == policy.OPS.index("Cutout"), args.cutout_half_size, 0)
    cy, cx = jax.random.randint(y_key, (), 0, height), jax.random.randint(x_key, (), 0, width)
    rows, cols = jnp.arange(height), jnp.arange(width)
    inside = ((rows >= cy - half) & (rows < cy + half))[:, None] & ((cols >= cx - half) & (cols < cx + half))[None]
    return jnp.where(inside[..., None], float(policy.GRAY), q)


def op(name: str):
    """The op `name` as `(image on the uint8 grid, magnitude, key) -> image`."""
    index = policy.OPS.index(name)
    return lambda image, magnitude, key: apply_op(image, jnp.int32(index), magnitude, key)


def layer_draws(key: jax.Array, num_layers: int) -> list[tuple[jax.Array, jax.Array]]:
    """(op index, uniform over `policy.OPS`; key of the op's arguments) of each layer, as the host's
    `randaugment_host.layer_draws`."""
    draws = []
    for layer_key in jax.random.split(key, num_layers):
        op_key, arg_key = jax.random.split(layer_key)
        draws.append((jax.random.randint(op_key, (), 0, len(policy.OPS)), arg_key))
    return draws


def rand_augment(
    image: jax.Array, key: jax.Array, *, num_layers: int = policy.NUM_LAYERS, magnitude: float = policy.MAGNITUDE
) -> jax.Array:
    """RandAugment on a [0, 1] float image: each layer applies one uniformly chosen op; returns [0, 1]."""
    q = to_grid(image)
    for index, arg_key in layer_draws(key, num_layers):
        q = apply_op(q, index, magnitude, arg_key)
    return from_grid(q)


def batch_rand_augment(images: jax.Array, key: jax.Array, **kwargs) -> jax.Array:
    """`rand_augment` on (N, H, W, 3), image i with the key `fold_in(key, i)`: an image's draws depend on
    its index only, not on the batch size or how the batch is sharded."""
    keys = jax.vmap(functools.partial(jax.random.fold_in, key))(jnp.arange(images.shape[0]))
    return jax.vmap(functools.partial(rand_augment, **kwargs))(images, keys)
