"""Config validation and derived settings, checked before anything is compiled.

Every error names the field, the value and what is allowed, so a typo in a `--config.x=y` override
fails in a second instead of after minutes of compilation.
"""

from __future__ import annotations

import math
from typing import Any

import ml_collections

from fnc_jax import config_base, errors, objectives, optim
from fnc_jax import field_checks as check
from fnc_jax.data import sources
from fnc_jax.models import resnet
from fnc_jax.objectives import FNConfig, FNSchedule

DTYPES = ("float32", "bfloat16")
EMA_INITS = ("copy", "independent")
BLUR_SIGMAS = ("per_image", "per_device")
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


# The fields of `config.fn` that make its schedule (`fn_schedule`); the others are `FNConfig`'s.
SCHEDULE_FIELDS = ("start_fraction", "ramp_fraction", "ramp_from_topk", "ramp_from_threshold")


def fn_config(config: ml_collections.ConfigDict) -> FNConfig:
    """The objective's `FNConfig` from `config.fn` (its validation names `fn.<field>`)."""
    fields = {k: v for k, v in config.fn.to_dict().items() if k not in SCHEDULE_FIELDS}
    try:
        return FNConfig(**fields)
    except TypeError as err:
        raise errors.ConfigError(f"config.fn has an unknown field: {err}") from None
    except ValueError as err:
        raise errors.ConfigError(f"config.{err}") from None


def schedule_is_on(config: ml_collections.ConfigDict) -> bool:
    return bool(config.fn.start_fraction or config.fn.ramp_fraction)


def validate_fn_schedule(config: ml_collections.ConfigDict, fn: FNConfig) -> None:
    start = check.number(config, "fn.start_fraction", 0.0, 1.0)
    ramp = check.number(config, "fn.ramp_fraction", 0.0, 1.0)
    if start + ramp > 1.0:
        raise check.invalid(
            "fn.ramp_fraction",
            ramp,
            f"numbers in [0, {1.0 - start:g}] (fn.start_fraction + "
            "fn.ramp_fraction <= 1: the ramp ends within the run)",
        )
    check.integer(config, "fn.ramp_from_topk", 0, fn.topk)  # the top-k runs at fn.topk and is cut to the ramp's k
    check.number(config, "fn.ramp_from_threshold", -math.inf)
    if schedule_is_on(config) and fn.mode == "none":
        raise check.invalid(
            "fn.start_fraction",
            start,
            "0 with fn.ramp_fraction=0 when fn.mode='none' (there is no cancellation to schedule)",
        )


def fn_schedule(config: ml_collections.ConfigDict, total_steps: int) -> FNSchedule | None:
    """The validated config's schedule in steps of a run of `total_steps`; None when it is off."""
    if not schedule_is_on(config):
        return None
    return FNSchedule(
        start_step=round(config.fn.start_fraction * total_steps),
        ramp_steps=round(config.fn.ramp_fraction * total_steps),
        from_topk=int(config.fn.ramp_from_topk),
        from_threshold=float(config.fn.ramp_from_threshold),
    )


def num_views(config: ml_collections.ConfigDict) -> int:
    return 2 + config.views.support_size


def validate_model(config: ml_collections.ConfigDict) -> None:
    if config.model.depth not in resnet.DEPTHS:
        raise check.invalid("model.depth", config.model.depth, ", ".join(map(str, resnet.DEPTHS)))
    check.number(config, "model.width_multiplier", 0.0, open_low=True)
    check.choice(config, "model.stem", STEMS)
    # Evaluations also take networks without a projection head (imported SimCLR v1 checkpoints).
    check.integer(config, "model.proj_layers", 1 if config.mode == config_base.PRETRAIN else 0)
    check.integer(config, "model.proj_out_dim", 1)
    check.integer(config, "model.proj_hidden_dim", 0)
    check.integer(config, "data.image_size", MIN_IMAGE_SIZE)
    check.choice(config, "dtype", DTYPES)


def validate_common(config: ml_collections.ConfigDict, *, num_devices: int, num_processes: int = 1) -> None:
    """Checks shared by every mode: batch, steps, data source, model, optimiser."""
    check.choice(config, "mode", config_base.MODES)
    check.integer(config, "seed", 0)
    batch = check.integer(config, "batch_size", 1)
    if batch % num_devices:
        raise check.invalid("batch_size", batch, f"multiples of the device count ({num_devices})")
    if batch % num_processes:
        raise check.invalid("batch_size", batch, f"multiples of the process count ({num_processes})")
    check.number(config, "epochs", 0.0, open_low=True)
    check.integer(config, "total_steps", 0)
    check.integer(config, "checkpoint_every_steps", 1)
    check.integer(config, "keep_checkpoints", 1)
    check.integer(config, "log_every_steps", 1)
    check.choice(config, "data.source", sources.SOURCES)
    validate_model(config)
    validate_optim(config)


def validate_optim(config: ml_collections.ConfigDict) -> None:
    """`config.optim`, for pretraining and every trained evaluation mode."""
    check.choice(config, "optim.name", optim.OPTIMIZERS)
    check.choice(config, "optim.lr_scaling", optim.LR_SCALINGS)
    check.number(config, "optim.base_lr", 0.0)
    check.number(config, "optim.warmup_epochs", 0.0)
    check.number(config, "optim.weight_decay", 0.0)
    check.number(config, "optim.momentum", 0.0, 1.0)
    check.number(config, "optim.trust_coefficient", 0.0)


def validate_pretrain(config: ml_collections.ConfigDict, *, num_devices: int, num_processes: int = 1) -> FNConfig:
    """Validates a pretraining config; returns the objective's FNConfig."""
    validate_common(config, num_devices=num_devices, num_processes=num_processes)
    support = check.integer(config, "views.support_size", 0)
    fn = fn_config(config)
    if fn.support_set == "support_only" and support == 0:
        raise errors.ConfigError(
            "config.fn.support_set='support_only' needs support views, but config.views.support_size=0: "
            "allowed are views.support_size >= 1, or fn.support_set='all_views'."
        )
    check.number(config, "loss.temperature", 0.0, open_low=True)
    validate_fn_schedule(config, fn)
    validate_loss(config, fn)
    views = num_views(config)
    multiplier = check.integer(config, "memory.multiplier", 0)
    if 0 < multiplier < views:
        raise check.invalid(
            "memory.multiplier", multiplier, f"0 (no memory) or integers >= the number of views V = {views}"
        )
    if multiplier and not fn.support_as_positives:
        raise check.invalid("fn.support_as_positives", False, "True when memory.multiplier > 0")
    check.number(config, "ema.decay", 0.0, 1.0)
    check.choice(config, "ema.init", EMA_INITS)
    check.number(config, "optim.probe_lr_multiplier", 0.0)
    validate_augment(config)
    return fn


def validate_loss(config: ml_collections.ConfigDict, fn: FNConfig) -> None:
    """The objective (`loss.name`) and its parameters; DCL and HCL (docs/related_objectives.md) take
    elimination or no cancellation, and the in-batch candidates only."""
    check.choice(config, "loss.name", objectives.OBJECTIVES)
    check.number(config, "loss.tau_plus", 0.0, 1.0)
    if config.loss.tau_plus >= 1.0:
        raise check.invalid("loss.tau_plus", config.loss.tau_plus, "numbers in [0, 1)")
    check.number(config, "loss.beta", 0.0)
    if config.loss.name == "fnc":
        return
    if fn.mode not in objectives.DEBIASED_FN_MODES:
        raise check.invalid(
            "fn.mode",
            fn.mode,
            f"{', '.join(objectives.DEBIASED_FN_MODES)} with loss.name={config.loss.name!r} "
            "(the debiased estimator already corrects the negatives for false negatives; attraction would count "
            "them twice)",
        )
    if config.memory.multiplier:
        raise check.invalid(
            "memory.multiplier",
            config.memory.multiplier,
            f"0 with loss.name={config.loss.name!r} (DCL and HCL use the in-batch candidates)",
        )


def validate_augment(config: ml_collections.ConfigDict) -> None:
    """The pretraining-view augmentation (`config.augment`), shared by pretraining and the FN analysis.

    Every data path (`layout.DATA_PATHS`) runs the whole recipe, RandAugment included; what the device
    adds (solarisation) needs the colour ops there, and the device cut needs them too."""
    aug = config.augment
    check.number(config, "augment.color_strength", 0.0)
    check.choice(config, "augment.blur_sigma", BLUR_SIGMAS)
    check.number(config, "augment.solarize_p", 0.0, 1.0)
    if aug.solarize_p > 0 and not aug.on_device:
        raise check.invalid("augment.solarize_p", aug.solarize_p, "0 unless augment.on_device=True")
    if aug.crop_on_device and not aug.on_device:
        raise check.invalid("augment.crop_on_device", True, "False unless augment.on_device=True")
    check.integer(config, "augment.canvas_size", 0)
    area = tuple(aug.area_range)
    if len(area) != 2 or not 0 < area[0] <= area[1] <= 1:
        raise check.invalid("augment.area_range", area, "pairs (low, high) with 0 < low <= high <= 1")


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
        f
        for f in changed_fields(old, new)
        if not any(f.startswith(p) for p in RESUMABLE_CHANGES) and not added_at_default(f)
    ]


_ABSENT = object()


def _lookup(tree: dict, field: str) -> Any:
    for key in field.split("."):
        if not isinstance(tree, dict) or key not in tree:
            return _ABSENT
        tree = tree[key]
    return tree
