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
LR_SCALINGS = ("linear", "sqrt", "none")

# Top-level submodules that LARS treats as plain momentum SGD: the supervised head and online probe.
_LARS_EXCLUDED_MODULES = ("head", "probe")


def warmup_steps_from_epochs(warmup_epochs: float, num_train: int, batch_size: int) -> int:
    """Official rule: floor division before rounding, e.g. 10 · 1,281,167 // 4096 = 3127."""
    return int(round(warmup_epochs * num_train // batch_size))


def total_steps_from_epochs(epochs: int, num_train: int, batch_size: int) -> int:
    """Official rule `N·epochs // B + 1`, e.g. 31,279 for 100 ImageNet epochs at B = 4096."""
    return num_train * epochs // batch_size + 1


def learning_rate_schedule(
    *, base_lr: float, batch_size: int, scaling: str, warmup_steps: int, total_steps: int
) -> optax.Schedule:
    """Linear warm-up from 0 to the scaled LR, then cosine decay to 0 at `total_steps` (§4.2).

    `sqrt` scaling is base·√B (not base·√(B/256), despite the official flag help); `linear` is
    base·B/256. The schedule is evaluated at the step count before the update, so with warm-up the
    first update uses LR 0, as in the official code.
    """
    if scaling == "linear":
        peak = base_lr * batch_size / 256.0
    elif scaling == "sqrt":
        peak = base_lr * math.sqrt(batch_size)
    elif scaling == "none":
        peak = base_lr
    else:
        raise ValueError(f"learning-rate scaling must be one of {LR_SCALINGS}, got {scaling!r}.")
    if total_steps <= warmup_steps:
        raise ValueError(f"total_steps ({total_steps}) must exceed warmup_steps ({warmup_steps}).")
    decay_steps = total_steps - warmup_steps

    def schedule(step):
        step = jnp.asarray(step, jnp.float32)
        warmup = peak * step / max(warmup_steps, 1)
        progress = jnp.minimum(step - warmup_steps, decay_steps) / decay_steps
        cosine = peak * 0.5 * (1.0 + jnp.cos(jnp.pi * progress))
        return jnp.where(step < warmup_steps, warmup, cosine)

    return schedule


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
    return jax.tree_util.tree_map_with_path(
        lambda path, _: rule(tuple(map(_key_name, path)), with_kernel), params
    )


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
    raise ValueError(f"optim.name must be one of {OPTIMIZERS}, got {name!r}.")
