"""Projection head, linear classifier and the assembled ContrastiveModel / ClassifierModel."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from fnc_jax.models import ClassifierModel, ContrastiveModel, LinearClassifier, ProjectionHead

IMAGES = jnp.zeros((2, 8, 8, 3))
SMALL = dict(depth=18, width_multiplier=0.25, cifar_stem=True)
WIDTH = 128  # resnet_feature_dim(18, 0.25)


def _shapes(model, x, **kwargs):
    return jax.eval_shape(functools.partial(model.init, **kwargs), jax.random.key(0), x)


@functools.cache
def _pretrained_shapes():
    return _shapes(ContrastiveModel(**SMALL, num_classes=10), IMAGES, train=False)


def _numpy_fill(shapes):
    """Random parameters and unit moving statistics without compiling JAX's samplers (slow on CPU)."""
    rng = np.random.default_rng(0)

    def fill(path, leaf):
        if path[-1] == "var":
            return jnp.ones(leaf.shape, leaf.dtype)
        if path[-1] == "mean":
            return jnp.zeros(leaf.shape, leaf.dtype)
        return jnp.asarray(rng.normal(0.0, 0.1, leaf.shape), leaf.dtype)

    flat = traverse_util.flatten_dict(shapes)
    return traverse_util.unflatten_dict({path: fill(path, leaf) for path, leaf in flat.items()})


def test_projection_head_layers_and_hiddens():
    head = ProjectionHead(hidden_dim=256, num_layers=3, out_dim=8)
    x = jnp.asarray(np.random.default_rng(1).normal(size=(16, 32)), jnp.float32)
    variables = jax.jit(functools.partial(head.init, train=False))(jax.random.key(0), x)
    params = variables["params"]
    assert {k: set(v) for k, v in params.items()} == {
        "dense_0": {"kernel"},
        "dense_1": {"kernel"},
        "dense_2": {"kernel"},
        "bn_0": {"scale", "bias"},
        "bn_1": {"scale", "bias"},
        "bn_2": {"scale"},  # γ only on the output layer
    }
    assert params["dense_0"]["kernel"].shape == (32, 256) and params["dense_2"]["kernel"].shape == (256, 8)
    assert abs(float(jnp.std(params["dense_1"]["kernel"])) - 0.01) < 0.0005

    apply = jax.jit(lambda v, x: head.apply(v, x, train=True, mutable=["batch_stats"]))
    (out, hiddens), _ = apply(variables, x)
    assert len(hiddens) == 4
    np.testing.assert_array_equal(hiddens[0], x)
    np.testing.assert_array_equal(hiddens[-1], out)
    assert [h.shape for h in hiddens] == [(16, 32), (16, 256), (16, 256), (16, 8)]
    assert all(bool(jnp.all(h >= 0)) for h in hiddens[1:3])  # hidden layers end with ReLU
    assert bool(jnp.any(out < 0))  # the output layer does not
    np.testing.assert_allclose(jnp.mean(out, axis=0), 0.0, atol=1e-5)  # BN without β


@pytest.mark.parametrize("zero_init", [True, False])
def test_linear_classifier_init(zero_init):
    classifier = LinearClassifier(num_classes=100, zero_init=zero_init)
    x = jnp.ones((4, 512))
    logits, variables = jax.jit(classifier.init_with_output)(jax.random.key(0), x)
    kernel, bias = variables["params"]["dense"]["kernel"], variables["params"]["dense"]["bias"]
    assert kernel.shape == (512, 100) and logits.dtype == jnp.float32
    np.testing.assert_array_equal(bias, 0.0)
    if zero_init:
        np.testing.assert_array_equal(kernel, 0.0)
        np.testing.assert_array_equal(logits, 0.0)
    else:
        assert abs(float(jnp.std(kernel)) - 0.01) < 0.0005


@pytest.mark.parametrize("num_classes", [0, 10])
def test_contrastive_model_names_and_outputs(num_classes):
    model = ContrastiveModel(**SMALL, num_classes=num_classes, dtype=jnp.bfloat16)
    outputs, variables = jax.eval_shape(
        functools.partial(model.init_with_output, train=False), jax.random.key(0), IMAGES
    )
    heads = {"probe"} if num_classes else set()
    assert set(variables["params"]) == {"encoder", "projection_head"} | heads
    assert set(variables["batch_stats"]) == {"encoder", "projection_head"}
    # The hidden width defaults to the encoder width.
    assert variables["params"]["projection_head"]["dense_0"]["kernel"].shape == (WIDTH, WIDTH)
    expected = {"features": (2, WIDTH), "projection": (2, 128)}
    if num_classes:
        expected["probe_logits"] = (2, 10)
    assert {k: v.shape for k, v in outputs.items()} == expected
    assert all(v.dtype == jnp.float32 for v in outputs.values())


def test_contrastive_model_projection_hidden_dim():
    model = ContrastiveModel(**SMALL, proj_hidden_dim=64, proj_layers=2, proj_out_dim=16)
    params = _shapes(model, IMAGES, train=False)["params"]["projection_head"]
    assert params["dense_0"]["kernel"].shape == (WIDTH, 64)
    assert params["dense_1"]["kernel"].shape == (64, 16)


def test_probe_gradient_does_not_reach_encoder():
    model = ContrastiveModel(**SMALL, num_classes=10)
    variables = _numpy_fill(_pretrained_shapes())

    def probe_loss(params):
        state = {"params": params, "batch_stats": variables["batch_stats"]}
        outputs, _ = model.apply(state, IMAGES, train=True, mutable=["batch_stats"])
        return jnp.sum(outputs["probe_logits"])

    # Only the encoder and projection-head gradients are returned; they are symbolically zero, so
    # XLA drops the forward pass and this compiles quickly.
    grads = jax.jit(lambda p: {k: v for k, v in jax.grad(probe_loss)(p).items() if k != "probe"})(variables["params"])
    assert all(bool(jnp.all(g == 0)) for g in jax.tree.leaves(grads))


@pytest.mark.parametrize("selector, head_in", [(0, WIDTH), (1, WIDTH), (2, WIDTH), (-1, 128)])
def test_classifier_model_parameters(selector, head_in):
    model = ClassifierModel(**SMALL, num_classes=10, ft_proj_selector=selector)
    params = _shapes(model, IMAGES, train=False)["params"]
    assert params["head"]["dense"]["kernel"].shape == (head_in, 10)
    if selector == 0:
        assert set(params) == {"encoder", "head"}
    else:  # every pretrained projection-head parameter has a counterpart to restore into
        assert set(params) == {"encoder", "projection_head", "head"}
        pretrained = _pretrained_shapes()["params"]
        for name in ("encoder", "projection_head"):
            assert jax.tree.map(jnp.shape, params[name]) == jax.tree.map(jnp.shape, pretrained[name])


def test_classifier_head_is_zero_initialised():
    model = ClassifierModel(**SMALL, num_classes=10)
    # Returning only the head lets XLA drop the encoder's random initialisers.
    head = jax.jit(lambda k: model.init(k, IMAGES, train=False)["params"]["head"])(jax.random.key(0))
    assert all(bool(jnp.all(leaf == 0)) for leaf in jax.tree.leaves(head))
    with pytest.raises(TypeError, match="num_classes"):
        ClassifierModel(**SMALL)


def test_classifier_selector_feeds_the_chosen_hidden_layer():
    """`ft_proj_selector = 1` classifies the post-ReLU output of projection layer 0.

    The variables are pretraining ones restored by name, minus the probe, plus a new head.
    """
    model = ClassifierModel(**SMALL, num_classes=10, ft_proj_selector=1)
    pretrained = _numpy_fill(_pretrained_shapes())
    rng = np.random.default_rng(2)
    head = {"kernel": jnp.asarray(rng.normal(size=(WIDTH, 10)), jnp.float32), "bias": jnp.ones((10,))}
    params = {k: v for k, v in pretrained["params"].items() if k != "probe"} | {"head": {"dense": head}}
    variables = {"params": params, "batch_stats": pretrained["batch_stats"]}
    images = jnp.asarray(rng.uniform(size=IMAGES.shape), jnp.float32)
    logits, state = jax.jit(lambda v, x: model.apply(v, x, train=False, capture_intermediates=True))(variables, images)
    _, hiddens = state["intermediates"]["projection_head"]["__call__"][0]
    assert bool(jnp.all(hiddens[1] >= 0))
    np.testing.assert_allclose(logits, hiddens[1] @ head["kernel"] + head["bias"], rtol=1e-5, atol=1e-5)
