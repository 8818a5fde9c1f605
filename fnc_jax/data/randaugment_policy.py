"""RandAugment's policy, shared by the host ops (`randaugment_host`) and the device ops (`randaugment_jax`).

The one list of ops (order of the TPU-models EfficientNet `autoaugment` module), the fill value and the
arguments each op takes at a magnitude, so that both implementations draw and apply the same policy.
"""

import dataclasses

OPS = (
    "AutoContrast",
    "Equalize",
    "Invert",
    "Rotate",
    "Posterize",
    "Solarize",
    "Color",
    "Contrast",
    "Brightness",
    "Sharpness",
    "ShearX",
    "ShearY",
    "TranslateX",
    "TranslateY",
    "Cutout",
    "SolarizeAdd",
)
GRAY = 128  # fill value of the geometric ops and cutout
NEGATE_P = 0.5  # probability that a signed argument (rotate, shear, translate) is negated
MAX_LEVEL = 10.0
NUM_LAYERS = 2  # the official recipe: RandAugment(2, 7)
MAGNITUDE = 7


@dataclasses.dataclass(frozen=True)
class Arguments:
    """Arguments of the ops at one magnitude. Rotate, shear and translate take sign·level·scale (the
    module's float32 order), with the scales below and a random sign."""

    level: float
    rotate_scale: float  # degrees
    posterize_bits: int
    solarize_threshold: int
    solarize_addition: int
    enhance: float
    shear_scale: float
    translate_scale: float  # pixels
    cutout_half_size: int


def arguments(magnitude: float) -> Arguments:
    """At magnitude 7: rotate 21°, posterize 2 bits, solarize 179, +77, enhance 1.36, shear 0.21, 70 px, 28."""
    level = magnitude / MAX_LEVEL
    return Arguments(
        level=level,
        rotate_scale=30.0,
        posterize_bits=int(level * 4),
        solarize_threshold=int(level * 256),
        solarize_addition=int(level * 110),
        enhance=level * 1.8 + 0.1,
        shear_scale=0.3,
        translate_scale=100.0,
        cutout_half_size=int(level * 40),
    )
