"""ResNet v1 encoder: parameter counts, shapes, padding, zero-γ init and BatchNorm modes."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from fnc_jax.models import ResNet, resnet_feature_dim
from fnc_jax.models.resnet import BasicBlock, BottleneckBlock, ProjectionShortcut, fixed_padding


def _shapes(model, image_size, batch=2, **kwargs):
    x = jnp.zeros((batch, image_size, image_size, 3))
    return jax.eval_shape(functools.partial(model.init, train=False, **kwargs), jax.random.key(0), x)


def _count(tree) -> int:
    return sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(tree))


def _init_cheaply(module, *args, **kwargs):
    """Real initial values except for kernels, which get numpy normals.

    Compiling JAX's random samplers takes seconds per shape on CPU; jitting an init that returns
    only the other leaves lets XLA drop them.
    """
    init = functools.partial(module.init, **kwargs)
    key = jax.random.key(0)
    shapes = traverse_util.flatten_dict(jax.eval_shape(init, key, *args))
    rest = jax.jit(
        lambda k: {p: v for p, v in traverse_util.flatten_dict(init(k, *args)).items() if p[-1] != "kernel"}
    )(key)
    rng = np.random.default_rng(0)
    kernels = {p: jnp.asarray(rng.normal(0.0, 0.2, s.shape), s.dtype) for p, s in shapes.items() if p[-1] == "kernel"}
    return traverse_util.unflatten_dict({**rest, **kernels})


def _block_parts(train: bool):
    conv = functools.partial(nn.Conv, use_bias=False)
    norm = functools.partial(nn.BatchNorm, use_running_average=not train, momentum=0.9, epsilon=1e-5)
    return conv, norm


@pytest.mark.parametrize(
    "depth, sk_ratio, expected",
    [
        (50, 0.0, 23_508_032),  # torchvision resnet50 (25,557,032) minus its fc layer
        (18, 0.0, 11_180_736),  # torchvision resnet18 minus fc, plus the 64→64 group-1 projection
        (50, 0.0625, 35_215_584),  # SimCLR v2's "R50 (1×+SK)": 35M
    ],
)
def test_trainable_parameter_counts(depth, sk_ratio, expected):
    variables = _shapes(ResNet(depth, sk_ratio=sk_ratio), 224, batch=1)
    assert _count(variables["params"]) == expected
    assert set(variables) == {"params", "batch_stats"}  # moving statistics are not parameters


def test_feature_dims():
    assert resnet_feature_dim(50, 1) == 2048
    assert resnet_feature_dim(50, 2) == 4096
    assert resnet_feature_dim(18, 1) == 512
    assert resnet_feature_dim(34, 3) == 1536
    assert resnet_feature_dim(50, 0.25) == 512
    # Fractional widths give the small networks used in tests and the default config.
    model = ResNet(18, width_multiplier=0.25, cifar_stem=True)
    out, _ = jax.eval_shape(
        functools.partial(model.init_with_output, train=False), jax.random.key(0), jnp.zeros((2, 8, 8, 3))
    )
    assert out.shape == (2, resnet_feature_dim(18, 0.25)) == (2, 128)
    with pytest.raises(ValueError, match="depth"):
        resnet_feature_dim(20, 1)


@pytest.mark.parametrize("cifar_stem, image_size", [(True, 32), (False, 128)])
def test_spatial_reduction(cifar_stem, image_size):
    """CIFAR stem (3×3/1, no pool) reduces 32 → 4; the standard stem reduces by 32."""
    model = ResNet(18, cifar_stem=cifar_stem)
    x = jnp.zeros((2, image_size, image_size, 3))
    last = lambda mdl, method_name: mdl.name == "group4_block1"  # noqa: E731
    out, state = jax.eval_shape(
        lambda k: model.init_with_output(k, x, train=False, capture_intermediates=last), jax.random.key(0)
    )
    assert out.shape == (2, 512) and out.dtype == jnp.float32
    assert state["intermediates"]["group4_block1"]["__call__"][0].shape == (2, 4, 4, 512)
    stem_kernel = state["params"]["stem_conv"]["kernel"].shape
    assert stem_kernel == ((3, 3, 3, 64) if cifar_stem else (7, 7, 3, 64))


def test_fixed_padding_is_symmetric_for_strided_convs():
    assert fixed_padding(3, 1) == "SAME"
    assert fixed_padding(7, 2) == ((3, 3), (3, 3))
    assert fixed_padding(3, 2) == ((1, 1), (1, 1))
    assert fixed_padding(1, 2) == ((0, 0), (0, 0))
    assert fixed_padding(2, 2) == ((0, 1), (0, 1))


def test_bfloat16_compute_keeps_float32_params():
    model = ResNet(18, cifar_stem=True, dtype=jnp.bfloat16)
    variables = _shapes(model, 8)
    assert {leaf.dtype for leaf in jax.tree.leaves(variables)} == {jnp.dtype(jnp.float32)}
    out = jax.eval_shape(lambda v: model.apply(v, jnp.zeros((2, 8, 8, 3)), train=False), variables)
    assert out.dtype == jnp.float32


@pytest.mark.parametrize("block_cls, width", [(BasicBlock, 8), (BottleneckBlock, 32)])
def test_fresh_identity_block_passes_its_input(block_cls, width):
    """The last BN of the residual branch starts at γ = 0, so a fresh block is ReLU(shortcut)."""
    conv, norm = _block_parts(train=True)
    block = block_cls(filters=8, strides=1, use_projection=False, conv=conv, norm=norm, se_ratio=0.25)
    x = jnp.asarray(np.random.default_rng(1).uniform(size=(2, 4, 4, width)), jnp.float32)
    variables = _init_cheaply(block, x)
    y, _ = jax.jit(lambda v, x: block.apply(v, x, mutable=["batch_stats"]))(variables, x)
    last_bn = "bn2" if block_cls is BasicBlock else "bn3"
    np.testing.assert_array_equal(variables["params"][last_bn]["scale"], 0.0)
    np.testing.assert_allclose(y, x, atol=1e-6)


def test_sk_se_bottleneck_with_resnet_d_shortcut_runs():
    conv, norm = _block_parts(train=True)
    block = BottleneckBlock(
        filters=8,
        strides=2,
        use_projection=True,
        conv=conv,
        norm=norm,
        avg_down=True,
        sk_ratio=0.0625,
        se_ratio=0.25,
    )
    x = jnp.asarray(np.random.default_rng(1).normal(size=(2, 5, 5, 16)), jnp.float32)
    variables = _init_cheaply(block, x)
    y, _ = jax.jit(lambda v, x: block.apply(v, x, mutable=["batch_stats"]))(variables, x)
    assert y.shape == (2, 3, 3, 32) and bool(jnp.all(jnp.isfinite(y)))
    params = variables["params"]
    assert params["sk"]["conv"]["kernel"].shape == (3, 3, 8, 16)
    assert params["sk"]["mix_reduce"]["kernel"].shape == (1, 1, 8, 32)  # max(int(8·0.0625), 32)
    assert params["se"]["reduce"]["kernel"].shape == (1, 1, 32, 2)  # max(1, int(8·0.25)), then back to 4f
    assert params["shortcut"]["conv"]["kernel"].shape == (1, 1, 16, 32)


@pytest.mark.parametrize("depth, sk_ratio, se_ratio", [(18, 0.0625, 0.0), (34, 0.0625, 0.25), (50, 0.0625, 0.25)])
def test_sk_and_se_networks_trace_on_odd_sizes(depth, sk_ratio, se_ratio):
    """ResNet-D pools the shortcut input, so strided basic blocks line up (official bug #9)."""
    model = ResNet(depth, sk_ratio=sk_ratio, se_ratio=se_ratio)
    variables = _shapes(model, 72)
    out = jax.eval_shape(lambda v: model.apply(v, jnp.zeros((2, 72, 72, 3)), train=False), variables)
    assert out.shape == (2, resnet_feature_dim(depth))
    assert variables["params"]["stem_conv0"]["kernel"].shape == (3, 3, 3, 32)


@pytest.mark.parametrize("strides", [1, 2])
def test_resnet_d_shortcut_pooling(strides):
    """Stride 2: zero-pad (0, 1) then 2×2 VALID mean. Stride 1: SAME mean that ignores padding."""
    conv, norm = _block_parts(train=False)
    shortcut = ProjectionShortcut(1, strides, avg_down=True, conv=conv, norm=norm)
    x = jnp.arange(9.0).reshape(1, 3, 3, 1)
    variables = _init_cheaply(shortcut, x)
    variables["params"]["conv"]["kernel"] = jnp.ones((1, 1, 1, 1))  # identity 1×1 conv
    y = jax.jit(shortcut.apply)(variables, x)
    if strides == 2:
        expected = [[(0 + 1 + 3 + 4) / 4, (2 + 5) / 4], [(6 + 7) / 4, 8 / 4]]
    else:
        expected = [[2, 3, 3.5], [5, 6, 6.5], [6.5, 7.5, 8]]
    np.testing.assert_allclose(y[0, :, :, 0], np.array(expected) / np.sqrt(1 + 1e-5), rtol=1e-6)


def test_batch_stats_update_in_train_mode_only():
    model = ResNet(18, width_multiplier=0.25, cifar_stem=True)
    x = jnp.asarray(np.random.default_rng(1).uniform(size=(4, 8, 8, 3)), jnp.float32)
    variables = _init_cheaply(model, x, train=False)
    params, stats = variables["params"], variables["batch_stats"]

    def new_stats(stats, train):
        variables = {"params": params, "batch_stats": stats}
        _, state = model.apply(variables, x, train=train, mutable=["batch_stats"])
        return state["batch_stats"]

    trained = jax.jit(new_stats, static_argnums=1)(stats, True)
    moved = jax.tree.map(lambda a, b: bool(jnp.any(a != b)), trained, stats)
    assert all(jax.tree.leaves(moved))
    # Inference mode returns the moving statistics untouched: the traced outputs are the inputs.
    eval_jaxpr = jax.make_jaxpr(new_stats, static_argnums=1)(stats, False).jaxpr
    assert eval_jaxpr.outvars == eval_jaxpr.invars
