"""Optimiser tests: official schedule numbers, LARS masks by path, LARS / Nesterov against NumPy."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import traverse_util

from fnc_jax import optim
from fnc_jax.models import ClassifierModel, ContrastiveModel

IMAGENET_TRAIN = 1_281_167


def test_official_step_counts():
    assert optim.warmup_steps_from_epochs(10, IMAGENET_TRAIN, 4096) == 3127
    assert optim.total_steps_from_epochs(100, IMAGENET_TRAIN, 4096) == 31_279
    assert optim.total_steps_from_epochs(1000, IMAGENET_TRAIN, 4096) == 312_785
    assert optim.total_steps_from_epochs(90, IMAGENET_TRAIN, 1024) == 112_603
    assert optim.total_steps_from_epochs(60, 12_811, 1024) == 751
    assert optim.warmup_steps_from_epochs(0, IMAGENET_TRAIN, 1024) == 0


def test_pretraining_schedule():
    lr = optim.learning_rate_schedule(
        base_lr=0.1, batch_size=4096, scaling="sqrt", warmup_steps=3127, total_steps=31_279
    )
    assert float(lr(0)) == 0.0  # the first update runs at lr 0
    np.testing.assert_allclose(float(lr(1)), 6.4 / 3127, rtol=1e-6)
    np.testing.assert_allclose(float(lr(3126)), 6.4 * 3126 / 3127, rtol=1e-6)
    np.testing.assert_allclose(float(lr(3127)), 6.4, rtol=1e-6)  # peak: 0.1·√4096
    mid = 3127 + (31_279 - 3127) // 2
    np.testing.assert_allclose(float(lr(mid)), 3.2, rtol=1e-4)
    np.testing.assert_allclose(float(lr(20_000)), 3.2 * (1 + math.cos(math.pi * 16_873 / 28_152)), rtol=1e-5)
    assert abs(float(lr(31_279))) < 1e-6 and abs(float(lr(40_000))) < 1e-6


def test_schedule_scalings_without_warmup():
    kwargs = dict(base_lr=0.005, batch_size=1024, warmup_steps=0, total_steps=112_603)
    for scaling, peak in [("sqrt", 0.16), ("linear", 0.02), ("none", 0.005)]:
        schedule = optim.learning_rate_schedule(scaling=scaling, **kwargs)
        np.testing.assert_allclose(float(schedule(0)), peak, rtol=1e-6)
    with pytest.raises(ValueError, match="sqrt"):
        optim.learning_rate_schedule(scaling="log", **kwargs)
    with pytest.raises(ValueError, match="warmup_steps"):
        optim.learning_rate_schedule(base_lr=0.1, batch_size=256, scaling="none", warmup_steps=10, total_steps=10)


def _true_paths(mask) -> set[tuple[str, ...]]:
    return {path for path, on in traverse_util.flatten_dict(mask).items() if on}


def test_lars_mask_selects_encoder_and_projection_kernels():
    model = ContrastiveModel(depth=18, width_multiplier=0.25, cifar_stem=True, se_ratio=0.25, num_classes=10)
    params = jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0), jnp.zeros((2, 8, 8, 3)))[
        "params"
    ]
    flat = traverse_util.flatten_dict(params)
    kernels = {p for p in flat if p[-1] == "kernel" and p[0] in ("encoder", "projection_head")}
    mask = optim.lars_exclusion_mask(params)
    assert jax.tree.structure(mask) == jax.tree.structure(params)
    assert _true_paths(mask) == kernels
    # Spot checks of what is left out: BN γ/β, SE conv biases, the probe.
    for path in [
        ("encoder", "stem_bn", "scale"),
        ("encoder", "group1_block0", "bn2", "bias"),
        ("encoder", "group1_block0", "se", "reduce", "bias"),
        ("projection_head", "bn_2", "scale"),
        ("probe", "dense", "kernel"),
    ]:
        assert path in flat and path not in kernels
    assert optim.lars_exclusion_mask({"params": params}) == {"params": mask}

    # The non-LARS L2 term covers everything except normalisation γ/β.
    non_norm = _true_paths(optim.non_norm_mask(params))
    assert non_norm == {p for p in flat if not (p[-2].startswith(("bn", "stem_bn", "mix_bn")))}
    assert ("encoder", "group1_block0", "se", "reduce", "bias") in non_norm
    assert ("probe", "dense", "bias") in non_norm


def test_lars_mask_leaves_out_the_supervised_head():
    model = ClassifierModel(depth=18, width_multiplier=0.25, cifar_stem=True, num_classes=10, ft_proj_selector=1)
    params = jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0), jnp.zeros((2, 8, 8, 3)))[
        "params"
    ]
    assert not any(path[0] == "head" for path in _true_paths(optim.lars_exclusion_mask(params)))


def _toy_params(rng):
    """A model-shaped tree: trust-ratio kernels (one all-zero), BN, bias, probe and head."""
    return {
        "encoder": {
            "conv": {"kernel": rng.normal(size=(3, 3, 2, 4))},
            "zero": {"kernel": np.zeros((4, 4))},
            "bn": {"scale": rng.normal(size=4), "bias": rng.normal(size=4)},
        },
        "projection_head": {"dense_0": {"kernel": rng.normal(size=(4, 3))}},
        "probe": {"dense": {"kernel": rng.normal(size=(4, 2)), "bias": rng.normal(size=2)}},
        "head": {"dense": {"kernel": rng.normal(size=(4, 2)), "bias": rng.normal(size=2)}},
    }


def _run(tx, params, grads):
    params = jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), params)
    state = tx.init(params)

    @jax.jit
    def step(params, state, g):
        updates, state = tx.update(g, state, params)
        return optax.apply_updates(params, updates), state

    for g in grads:
        params, state = step(params, state, jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), g))
    return params


def _lars_reference(params, grads, lrs, *, wd, eta, momentum, head_l2):
    """Recipe §4.1 in NumPy; `head_l2` adds the official explicit L2 term on supervised-head kernels."""
    flat = {k: v.copy() for k, v in traverse_util.flatten_dict(params).items()}
    velocity = {k: np.zeros_like(v) for k, v in flat.items()}
    for g_tree, lr in zip(grads, lrs):
        for path, g in traverse_util.flatten_dict(g_tree).items():
            w = flat[path]
            trust = 1.0
            if path[-1] == "kernel" and path[0] in ("encoder", "projection_head"):
                g = g + wd * w
                w_norm, g_norm = np.linalg.norm(w), np.linalg.norm(g)
                if w_norm > 0 and g_norm > 0:
                    trust = eta * w_norm / g_norm
            elif head_l2 and path == ("head", "dense", "kernel"):
                g = g + wd * w
            velocity[path] = momentum * velocity[path] + lr * trust * g
            flat[path] = w - velocity[path]
    return traverse_util.unflatten_dict(flat)


def _assert_trees_close(actual, expected):
    jax.tree.map(lambda a, e: np.testing.assert_allclose(a, e, rtol=2e-5, atol=1e-7), actual, expected)


def test_lars_matches_numpy_reference():
    rng = np.random.default_rng(0)
    params = _toy_params(rng)
    grads = [jax.tree.map(lambda a: rng.normal(size=a.shape), params) for _ in range(3)]
    schedule = lambda step: 0.5 * (step + 1)  # noqa: E731  (varying lr shows it sits inside the buffer)
    mask = optim.lars_exclusion_mask(params)
    tx = optim.lars(schedule, weight_decay=0.1, momentum=0.9, trust_coefficient=0.01, mask=mask)
    expected = _lars_reference(params, grads, [0.5, 1.0, 1.5], wd=0.1, eta=0.01, momentum=0.9, head_l2=False)
    _assert_trees_close(_run(tx, params, grads), expected)


def test_create_optimizer_lars_adds_head_l2():
    rng = np.random.default_rng(1)
    params = _toy_params(rng)
    grads = [jax.tree.map(lambda a: rng.normal(size=a.shape), params) for _ in range(3)]
    tx = optim.create_optimizer(
        name="lars", schedule=0.2, weight_decay=0.05, momentum=0.9, trust_coefficient=0.001, params=params
    )
    expected = _lars_reference(params, grads, [0.2] * 3, wd=0.05, eta=0.001, momentum=0.9, head_l2=True)
    _assert_trees_close(_run(tx, params, grads), expected)


def test_create_optimizer_sgd_nesterov_matches_tf_momentum():
    """TF MomentumOptimizer(use_nesterov=True) with the L2 term on every non-BN parameter."""
    rng = np.random.default_rng(2)
    params = _toy_params(rng)
    grads = [jax.tree.map(lambda a: rng.normal(size=a.shape), params) for _ in range(3)]
    lrs = [0.3, 0.2, 0.1]
    tx = optim.create_optimizer(
        name="sgd_nesterov",
        schedule=lambda step: 0.3 - 0.1 * step,
        weight_decay=0.01,
        momentum=0.9,
        trust_coefficient=0.001,
        params=params,
    )
    flat = {k: v.copy() for k, v in traverse_util.flatten_dict(params).items()}
    accum = {k: np.zeros_like(v) for k, v in flat.items()}
    for g_tree, lr in zip(grads, lrs):
        for path, g in traverse_util.flatten_dict(g_tree).items():
            if path[-2] != "bn":
                g = g + 0.01 * flat[path]
            accum[path] = 0.9 * accum[path] + g
            flat[path] = flat[path] - lr * (g + 0.9 * accum[path])
    _assert_trees_close(_run(tx, params, grads), traverse_util.unflatten_dict(flat))


def test_create_optimizer_adamw_and_invalid_name():
    params = _toy_params(np.random.default_rng(3))
    tx = optim.create_optimizer(
        name="adamw", schedule=1e-3, weight_decay=0.05, momentum=0.9, trust_coefficient=0.001, params=params
    )
    updated = _run(tx, params, [params])
    assert all(bool(jnp.all(jnp.isfinite(leaf))) for leaf in jax.tree.leaves(updated))
    with pytest.raises(ValueError, match=r"optim\.name='sgd' is invalid: allowed values are lars, sgd_nesterov, adamw"):
        optim.create_optimizer(
            name="sgd", schedule=0.1, weight_decay=0.0, momentum=0.9, trust_coefficient=0.001, params=params
        )


@pytest.mark.parametrize("name", optim.OPTIMIZERS)
def test_probe_lr_multiplier_is_the_probe_lr_times_the_multiplier(name):
    """Exactly the probe trained at multiplier × the LR; every other parameter as without it."""
    rng = np.random.default_rng(4)
    params = _toy_params(rng)
    grads = [jax.tree.map(lambda a: rng.normal(size=a.shape), params) for _ in range(3)]
    schedule = lambda step: 0.3 - 0.1 * step  # noqa: E731
    make = functools.partial(
        optim.create_optimizer, name=name, weight_decay=0.01, momentum=0.9, trust_coefficient=0.001, params=params
    )
    got = _run(make(schedule=schedule, probe_lr_multiplier=0.1), params, grads)
    main = _run(make(schedule=schedule), params, grads)
    slow = _run(make(schedule=lambda step: 0.1 * schedule(step)), params, grads)
    assert not np.allclose(main["probe"]["dense"]["kernel"], slow["probe"]["dense"]["kernel"])
    _assert_trees_close(got["probe"], slow["probe"])
    _assert_trees_close({k: v for k, v in got.items() if k != "probe"}, {k: v for k, v in main.items() if k != "probe"})
    # The official default adds nothing to the optimiser state (old checkpoints keep their structure).
    plain = optim.create_optimizer(
        name=name, schedule=schedule, weight_decay=0.01, momentum=0.9, trust_coefficient=0.001, params=params
    )
    assert jax.tree.structure(make(schedule=schedule, probe_lr_multiplier=1.0).init(params)) == jax.tree.structure(
        plain.init(params)
    )
