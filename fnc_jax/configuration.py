"""Config validation and derived settings, checked before anything is compiled.

Every error names the field, the value and what is allowed, so a typo in a `--config.x=y` override
fails in a second instead of after minutes of compilation.
"""

from __future__ import annotations

import math
from typing import Any

import jax.numpy as jnp
import ml_collections

from fnc_jax.objectives import FNConfig

RESNET_DEPTHS = (18, 34, 50, 101, 152, 200)
MODES = ("pretrain", "linear_eval", "finetune", "knn", "fn_analysis", "transfer")
DTYPES = ("float32", "bfloat16")
LR_SCALINGS = ("sqrt", "linear", "none")
OPTIMIZERS = ("lars", "sgd_nesterov", "adamw")
EMA_INITS = ("copy", "independent")
BLUR_SIGMAS = ("per_image", "per_device")
SOURCES = ("embedded", "tfds", "image_folder")
STEMS = ("auto", "cifar", "imagenet")
MIN_IMAGE_SIZE = 8

# Settings a resumed run may change; everything else must match the workdir's config.json.
RESUMABLE_CHANGES = (
    "eval.",
    "log_every_steps",
    "checkpoint_every_steps",
    "keep_checkpoints",
    "total_steps",
    "epochs",
    "data.data_dir",
)


def _invalid(field: str, value: Any, allowed: str) -> ValueError:
    return ValueError(f"config.{field}={value!r} is invalid: allowed values are {allowed}.")


def _choice(config: ml_collections.ConfigDict, field: str, allowed: tuple[str, ...]) -> None:
    value = _get(config, field)
    if value not in allowed:
        raise _invalid(field, value, ", ".join(allowed))


def _get(config: ml_collections.ConfigDict, field: str) -> Any:
    value = config
    for part in field.split("."):
        value = value[part]
    return value


def _integer(config: ml_collections.ConfigDict, field: str, minimum: int) -> int:
    value = _get(config, field)
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise _invalid(field, value, f"integers >= {minimum}")
    return value


def _number(config: ml_collections.ConfigDict, field: str, low: float, high: float = math.inf, *, open_low=False):
    value = _get(config, field)
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (value > low if open_low else value >= low) and value <= high
    if not ok:
        bound = f"> {low}" if open_low else f">= {low}"
        raise _invalid(field, value, f"numbers {bound}" + (f" and <= {high}" if high < math.inf else ""))
    return value


def fn_config(config: ml_collections.ConfigDict) -> FNConfig:
    """The objective's `FNConfig` from `config.fn` (its validation names `fn.<field>`)."""
    try:
        return FNConfig(**config.fn.to_dict())
    except TypeError as err:
        raise ValueError(f"config.fn has an unknown field: {err}") from None
    except ValueError as err:
        raise ValueError(f"config.{err}") from None


def num_views(config: ml_collections.ConfigDict) -> int:
    return 2 + config.views.support_size


def uses_cifar_stem(config: ml_collections.ConfigDict) -> bool:
    """The CIFAR stem (3x3/1, no max-pool) is the default at 32 px and below (training_recipe.md §3.1)."""
    return config.model.stem == "cifar" or (config.model.stem == "auto" and config.data.image_size <= 32)


def compute_dtype(config: ml_collections.ConfigDict) -> Any:
    """The dtype of convolutions and matmuls (`config.dtype`); parameters always stay float32."""
    return jnp.bfloat16 if config.dtype == "bfloat16" else jnp.float32


def network_kwargs(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """The architecture arguments from `config.model` shared by the pretraining and evaluation networks."""
    m = config.model
    return dict(
        depth=m.depth,
        width_multiplier=m.width_multiplier,
        cifar_stem=uses_cifar_stem(config),
        sk_ratio=m.sk_ratio,
        se_ratio=m.se_ratio,
        proj_layers=m.proj_layers,
        proj_out_dim=m.proj_out_dim,
        proj_hidden_dim=m.proj_hidden_dim or None,
        dtype=compute_dtype(config),
    )


def validate_model(config: ml_collections.ConfigDict) -> None:
    if config.model.depth not in RESNET_DEPTHS:
        raise _invalid("model.depth", config.model.depth, ", ".join(map(str, RESNET_DEPTHS)))
    _number(config, "model.width_multiplier", 0.0, open_low=True)
    _choice(config, "model.stem", STEMS)
    # Evaluations also take networks without a projection head (imported SimCLR v1 checkpoints).
    _integer(config, "model.proj_layers", 1 if config.mode == "pretrain" else 0)
    _integer(config, "model.proj_out_dim", 1)
    _integer(config, "model.proj_hidden_dim", 0)
    _integer(config, "data.image_size", MIN_IMAGE_SIZE)
    _choice(config, "dtype", DTYPES)


def validate_common(config: ml_collections.ConfigDict, *, num_devices: int, num_processes: int = 1) -> None:
    """Checks shared by every mode: batch, steps, data source, model, optimiser."""
    _choice(config, "mode", MODES)
    _integer(config, "seed", 0)
    batch = _integer(config, "batch_size", 1)
    if batch % num_devices:
        raise _invalid("batch_size", batch, f"multiples of the device count ({num_devices})")
    if batch % num_processes:
        raise _invalid("batch_size", batch, f"multiples of the process count ({num_processes})")
    _number(config, "epochs", 0.0, open_low=True)
    _integer(config, "total_steps", 0)
    _integer(config, "checkpoint_every_steps", 1)
    _integer(config, "keep_checkpoints", 1)
    _integer(config, "log_every_steps", 1)
    _choice(config, "data.source", SOURCES)
    validate_model(config)
    _choice(config, "optim.name", OPTIMIZERS)
    _choice(config, "optim.lr_scaling", LR_SCALINGS)
    _number(config, "optim.base_lr", 0.0)
    _number(config, "optim.warmup_epochs", 0.0)
    _number(config, "optim.weight_decay", 0.0)
    _number(config, "optim.momentum", 0.0, 1.0)


def validate_pretrain(config: ml_collections.ConfigDict, *, num_devices: int, num_processes: int = 1) -> FNConfig:
    """Validates a pretraining config; returns the objective's FNConfig."""
    validate_common(config, num_devices=num_devices, num_processes=num_processes)
    support = _integer(config, "views.support_size", 0)
    fn = fn_config(config)
    if fn.support_set == "support_only" and support == 0:
        raise ValueError(
            "config.fn.support_set='support_only' needs support views, but config.views.support_size=0: "
            "allowed are views.support_size >= 1, or fn.support_set='all_views'."
        )
    _number(config, "loss.temperature", 0.0, open_low=True)
    views = num_views(config)
    multiplier = _integer(config, "memory.multiplier", 0)
    if 0 < multiplier < views:
        raise _invalid("memory.multiplier", multiplier, f"0 (no memory) or integers >= the number of views V = {views}")
    if multiplier and not fn.support_as_positives:
        raise _invalid("fn.support_as_positives", False, "True when memory.multiplier > 0")
    _number(config, "ema.decay", 0.0, 1.0)
    _choice(config, "ema.init", EMA_INITS)
    _number(config, "optim.probe_lr_multiplier", 0.0)
    validate_augment(config)
    return fn


def validate_augment(config: ml_collections.ConfigDict) -> None:
    """The pretraining-view augmentation (`config.augment`), shared by pretraining and the FN analysis."""
    aug = config.augment
    _number(config, "augment.color_strength", 0.0)
    _choice(config, "augment.blur_sigma", BLUR_SIGMAS)
    _number(config, "augment.solarize_p", 0.0, 1.0)
    if aug.on_device and aug.use_randaugment:
        raise ValueError(
            "config.augment.on_device=True needs config.augment.use_randaugment=False (RandAugment runs on the "
            "host between colour jitter and grayscale): allowed are on_device=False, or use_randaugment=False."
        )
    if aug.solarize_p > 0 and not aug.on_device:
        raise _invalid("augment.solarize_p", aug.solarize_p, "0 unless augment.on_device=True")
    if aug.crop_on_device and not aug.on_device:
        raise _invalid("augment.crop_on_device", True, "False unless augment.on_device=True")
    _integer(config, "augment.canvas_size", 0)
    area = tuple(aug.area_range)
    if len(area) != 2 or not 0 < area[0] <= area[1] <= 1:
        raise _invalid("augment.area_range", area, "pairs (low, high) with 0 < low <= high <= 1")


def canvas_size(config: ml_collections.ConfigDict, image_shape: tuple[int, ...] | None) -> int:
    """Side of the host canvas with `augment.crop_on_device`: `augment.canvas_size`, or for 0 the
    source's fixed image side (`image_shape` from `sources.get_source_info`, None when sizes vary)."""
    size = _integer(config, "augment.canvas_size", 0)
    if size:
        return size
    if image_shape is None:
        raise _invalid(
            "augment.canvas_size", 0, "a positive side for sources whose image sizes vary, e.g. 512 (ImageNet; "
            "larger images are shrunk to fit); 0 only for fixed-size sources"
        )
    return max(image_shape[:2])


def changed_fields(old: dict, new: dict, prefix: str = "") -> list[str]:
    """Dotted names of the fields whose values differ between two config dicts (missing counts)."""
    changed = []
    for key in sorted(set(old) | set(new)):
        name = f"{prefix}{key}"
        a, b = old.get(key, "<missing>"), new.get(key, "<missing>")
        if isinstance(a, dict) and isinstance(b, dict):
            changed += changed_fields(a, b, f"{name}.")
        elif _normalise(a) != _normalise(b):
            changed.append(name)
    return changed


def _normalise(value: Any) -> Any:
    return list(value) if isinstance(value, (tuple, list)) else value


def incompatible_changes(old: dict, new: dict, defaults: dict | None = None) -> list[str]:
    """Changed fields that a resumed run may not change (model, batch, views, objective, data...).

    A field that `old` lacks (written before the field existed) and that `new` leaves at its value in
    `defaults` (the code's base config) is no change: new fields default to the old behaviour.
    """

    def added_at_default(field: str) -> bool:
        return (
            defaults is not None
            and _lookup(old, field) is _ABSENT
            and _normalise(_lookup(new, field)) == _normalise(_lookup(defaults, field))
        )

    return [
        f for f in changed_fields(old, new)
        if not any(f.startswith(p) for p in RESUMABLE_CHANGES) and not added_at_default(f)
    ]


_ABSENT = object()


def _lookup(tree: dict, field: str) -> Any:
    for key in field.split("."):
        if not isinstance(tree, dict) or key not in tree:
            return _ABSENT
        tree = tree[key]
    return tree
