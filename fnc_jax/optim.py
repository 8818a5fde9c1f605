"""Optimisers and learning-rate schedules (training recipe §4–6).

Which parameters get weight decay and the LARS trust ratio is a rule over parameter paths
(`lars_exclusion_mask`), so it works for any model built from `fnc_jax.models`.
"""

import math
from typing import Any

import jax
import jax.numpy as jnp
import optax

OPTIMIZERS = ("lars", "sgd_nesterov", "adamw")
LR_SCALINGS = ("sqrt", "linear", "none")

# Top-level submodules that LARS treats as plain momentum SGD: the supervised head and online probe.
_LARS_EXCLUDED_MODULES = ("head", "probe")


def warmup_steps_from_epochs(warmup_epochs: float, num_train: int, batch_size: int) -> int:
    """Official rule: floor division before rounding, e.g. 10 · 1,281,167 // 4096 = 3127."""
    return int(round(warmup_epochs * num_train // batch_size))


def total_steps_from_epochs(epochs: int, num_train: int, batch_size: int) -> int:
    """Official rule `N·epochs // B + 1`, e.g. 31,279 for 100 ImageNet epochs at B = 4096."""
    return num_train * epochs // batch_size + 1


def peak_learning_rate(base_lr: float, batch_size: int, scaling: str) -> float:
    """The scaled LR (§4.2): base·√B (`sqrt`; not base·√(B/256), despite the official flag help),
    base·B/256 (`linear`) or base (`none`)."""
    if scaling == "linear":
        return base_lr * batch_size / 256.0
    if scaling == "sqrt":
        return base_lr * math.sqrt(batch_size)
    if scaling == "none":
        return base_lr
    raise ValueError(f"optim.lr_scaling={scaling!r} is invalid: allowed values are {', '.join(LR_SCALINGS)}.")


def warmup_cosine(step: Any, *, peak: Any, warmup_steps: Any, total_steps: Any) -> jax.Array:
    """Linear warm-up from 0 to `peak`, then cosine decay to 0 at `total_steps` (§4.2).

    Every argument may be a Python number or a (traced) array, so one compiled step serves any
    schedule (the classifier sweeps keep peak, warm-up and total in the state). The schedule is
    evaluated at the step count before the update, so with warm-up the first update uses LR 0, as in
    the official code.
    """
    step = jnp.asarray(step, jnp.float32)
    decay_steps = jnp.maximum(total_steps - warmup_steps, 1)
    warmup = peak * step / jnp.maximum(warmup_steps, 1)
    progress = jnp.minimum(step - warmup_steps, decay_steps) / decay_steps
    cosine = peak * 0.5 * (1.0 + jnp.cos(jnp.pi * progress))
    return jnp.where(step < warmup_steps, warmup, cosine)


def learning_rate_schedule(
    *, base_lr: float, batch_size: int, scaling: str, warmup_steps: int, total_steps: int
) -> optax.Schedule:
    """`warmup_cosine` at the scaled peak LR (`peak_learning_rate`), as an optax schedule."""
    peak = peak_learning_rate(base_lr, batch_size, scaling)
    if total_steps <= warmup_steps:
        raise ValueError(f"total_steps ({total_steps}) must exceed warmup_steps ({warmup_steps}).")
    return lambda step: warmup_cosine(step, peak=peak, warmup_steps=warmup_steps, total_steps=total_steps)


def step_counts(config: Any, num_train: int) -> tuple[int, int]:
    """(warmup_steps, total_steps) of a run: `config.total_steps` when > 0, else from `config.epochs`
    (official rules); a run shorter than its warm-up still ends with a decay step."""
    total = config.total_steps or total_steps_from_epochs(config.epochs, num_train, config.batch_size)
    warmup = warmup_steps_from_epochs(config.optim.warmup_epochs, num_train, config.batch_size)
    return min(warmup, total - 1), int(total)


def schedule_from_config(config: Any, num_train: int) -> tuple[optax.Schedule, int, int]:
    """(schedule, warmup_steps, total_steps) of `config.optim` for a training split of `num_train`."""
    warmup, total = step_counts(config, num_train)
    schedule = learning_rate_schedule(
        base_lr=config.optim.base_lr,
        batch_size=config.batch_size,
        scaling=config.optim.lr_scaling,
        warmup_steps=warmup,
        total_steps=total,
    )
    return schedule, warmup, total


def _key_name(entry: Any) -> str:
    return str(getattr(entry, "key", getattr(entry, "name", entry)))


def _paths(params) -> list[tuple[str, ...]]:
    return [tuple(map(_key_name, path)) for path, _ in jax.tree_util.tree_flatten_with_path(params)[0]]


def _mask_from(params, rule) -> Any:
    """Applies `rule(path, modules_with_kernel)` to every leaf path, keeping the tree's containers.

    Flax dense and conv layers always hold a `kernel`; BatchNorm/LayerNorm hold only `scale`/`bias`.
    So a `bias` in a module without a kernel is a normalisation parameter.
    """
    with_kernel = {path[:-1] for path in _paths(params) if path[-1] == "kernel"}
    return jax.tree_util.tree_map_with_path(lambda path, _: rule(tuple(map(_key_name, path)), with_kernel), params)


def _top_level(path: tuple[str, ...]) -> str:
    return path[1] if path[0] == "params" and len(path) > 1 else path[0]


def lars_exclusion_mask(params) -> Any:
    """True where LARS applies weight decay and the trust ratio: kernels outside `head`/`probe`.

    False for every normalisation parameter, every bias, and everything under the top-level `head`
    and `probe` submodules (§4.1). Works on the `params` collection with or without the `params`
    key on top.
    """

    def rule(path, _):
        return path[-1] == "kernel" and _top_level(path) not in _LARS_EXCLUDED_MODULES

    return _mask_from(params, rule)


def non_norm_mask(params) -> Any:
    """True for every parameter except normalisation γ/β: the official L2 term for non-LARS runs."""
    return _mask_from(params, lambda path, with_kernel: path[-1] == "kernel" or path[:-1] in with_kernel)


def _head_kernel_mask(params) -> Any:
    """Kernels of the supervised `head`: with LARS the official code adds their L2 term to the loss."""
    return _mask_from(params, lambda path, _: path[-1] == "kernel" and _top_level(path) == "head")


def lars(
    learning_rate: optax.ScalarOrSchedule,
    *,
    weight_decay: float,
    momentum: float = 0.9,
    trust_coefficient: float = 0.001,
    mask: Any,
) -> optax.GradientTransformation:
    """LARS as in SimCLR v2 (§4.1): decay → trust ratio → ×LR → classic momentum.

    Per masked parameter: g ← g + wd·w; g ← η‖w‖/‖g‖·g (1 when either norm is 0, no epsilon).
    Unmasked parameters get neither. Then v ← m·v + lr·g and w ← w − v: the LR sits inside the
    momentum buffer. `optax.lars` has exactly this order.
    """
    return optax.lars(
        learning_rate,
        weight_decay=weight_decay,
        weight_decay_mask=mask,
        trust_coefficient=trust_coefficient,
        eps=0.0,
        trust_ratio_mask=mask,
        momentum=momentum,
        nesterov=False,
    )


def sgd_nesterov(
    learning_rate: optax.ScalarOrSchedule,
    momentum: float = 0.9,
    weight_decay: float = 0.0,
    *,
    weight_decay_mask: Any = True,
) -> optax.GradientTransformation:
    """TF `MomentumOptimizer(use_nesterov=True)`; weight decay acts as an L2 gradient term.

    v ← m·v + g; w ← w − lr·(g + m·v), with g ← g + wd·w on `weight_decay_mask`.
    """
    return optax.chain(
        optax.add_decayed_weights(weight_decay, mask=weight_decay_mask),
        optax.sgd(learning_rate, momentum=momentum, nesterov=True),
    )


def create_optimizer(
    *,
    name: str,
    schedule: optax.ScalarOrSchedule,
    weight_decay: float,
    momentum: float,
    trust_coefficient: float,
    params: Any,
    probe_lr_multiplier: float = 1.0,
) -> optax.GradientTransformation:
    """The optimiser for `optim.name`, with masks derived from the parameter paths of `params`.

    - `lars`: `lars` with `lars_exclusion_mask`; kernels of the supervised `head` also get the
      official L2 gradient wd·w (no trust ratio). The `probe` gets plain momentum SGD.
    - `sgd_nesterov`: L2 on every parameter except normalisation γ/β (biases and head included).
    - `adamw`: decoupled decay on the kernels LARS decays; `momentum`, `trust_coefficient` unused.

    `params` is the tree the optimiser will update; pass only trainable parameters.
    `probe_lr_multiplier` scales the online probe's updates, which for all three optimisers is exactly
    its LR times the multiplier (the update is linear in the LR and the probe has no decay or trust
    ratio). At 1.0 (official: the probe follows the main schedule) nothing is added to the state.
    """
    tx = _base_optimizer(name, schedule, weight_decay, momentum, trust_coefficient, params)
    if probe_lr_multiplier == 1.0:
        return tx
    probe = _mask_from(params, lambda path, _: _top_level(path) == "probe")
    return optax.chain(tx, optax.masked(optax.scale(probe_lr_multiplier), probe))


def _base_optimizer(name, schedule, weight_decay, momentum, trust_coefficient, params):
    if name == "lars":
        return optax.chain(
            optax.add_decayed_weights(weight_decay, mask=_head_kernel_mask(params)),
            lars(
                schedule,
                weight_decay=weight_decay,
                momentum=momentum,
                trust_coefficient=trust_coefficient,
                mask=lars_exclusion_mask(params),
            ),
        )
    if name == "sgd_nesterov":
        return sgd_nesterov(schedule, momentum, weight_decay, weight_decay_mask=non_norm_mask(params))
    if name == "adamw":
        return optax.adamw(schedule, weight_decay=weight_decay, mask=lars_exclusion_mask(params))
    raise ValueError(f"optim.name={name!r} is invalid: allowed values are {', '.join(OPTIMIZERS)}.")
