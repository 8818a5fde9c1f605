"""The data path of pretraining: where the parts of a view are made, and the batch the host sends for it.

One named list of paths (`DATA_PATHS`), chosen from the config by `data_path`; the host pipeline builds
its batches by it and the device augmentation (`augment_jax.host_views`) reads them by it, so neither
guesses the path from what a batch holds. `check_batch` names the path, the batch and what was expected
when they do not match.
"""

from collections.abc import Mapping
from typing import Any

import ml_collections
import numpy as np

HOST = "host"  # the host makes whole float32 views; the device only blurs
DEVICE_COLOUR = "device_colour"  # augment.on_device: the host crops and flips (uint8), the device does the colour
DEVICE_CROP = "device_crop"  # augment.crop_on_device too: the host sends canvases and crop boxes
DATA_PATHS = (HOST, DEVICE_COLOUR, DEVICE_CROP)

# Each path's batch besides "labels": key -> (dtype, rank) for (B, V, S, S, 3) views, (B, C, C, 3)
# canvases and (B, V, 5) crops (top, left, height, width, flip).
BATCH_LAYOUTS = {
    HOST: {"images": ("float32", 5)},
    DEVICE_COLOUR: {"images": ("uint8", 5)},
    DEVICE_CROP: {"images": ("uint8", 4), "crops": ("int32", 3)},
}
_IGNORED_KEYS = ("labels",)


def data_path(config: ml_collections.ConfigDict) -> str:
    """The path of a validated config: `augment.crop_on_device`, else `augment.on_device`, else the host."""
    if config.augment.crop_on_device:
        return DEVICE_CROP
    return DEVICE_COLOUR if config.augment.on_device else HOST


def check_path(path: str) -> None:
    if path not in DATA_PATHS:
        raise ValueError(f"data path {path!r} is invalid: allowed are {', '.join(DATA_PATHS)}")


def _describe(layout: Mapping[str, tuple[str, int]]) -> str:
    return ", ".join(f"{key}: {dtype} rank {rank}" for key, (dtype, rank) in sorted(layout.items()))


def check_batch(path: str, batch: Mapping[str, Any]) -> None:
    """Raises ValueError unless `batch` (numpy or JAX arrays, or tracers) has the layout of `path`."""
    expected = BATCH_LAYOUTS[path]
    got = {key: (str(value.dtype), value.ndim) for key, value in batch.items() if key not in _IGNORED_KEYS}
    if got != expected:
        raise ValueError(
            f"a batch of data path {path!r} must hold {_describe(expected)} (and labels); this one holds "
            f"{_describe(got) or 'no images'}: build the batches and the step from the same config "
            "(augment.on_device, augment.crop_on_device)"
        )


def random_canvases(batch: int, views: int, canvas: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A random `DEVICE_CROP` batch's images and crops: uint8 canvases (batch, canvas, canvas, 3) holding a
    3:4 image at the top-left, and int32 crops (batch, views, 5): 1/3 to all of each of the image's
    sides, anywhere in it, with random flips. For the tests and benchmarks of the device cut."""
    rng = np.random.default_rng(seed)
    image_h, image_w = canvas * 3 // 4, canvas
    height = rng.integers(image_h // 3, image_h + 1, (batch, views))
    width = rng.integers(image_w // 3, image_w + 1, (batch, views))
    top, left = rng.integers(0, image_h - height + 1), rng.integers(0, image_w - width + 1)
    crops = np.stack([top, left, height, width, rng.integers(0, 2, (batch, views))], -1)
    return rng.integers(0, 256, (batch, canvas, canvas, 3), dtype=np.uint8), crops.astype(np.int32)
