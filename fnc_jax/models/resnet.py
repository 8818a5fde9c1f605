"""ResNet v1 encoder as used by SimCLR v2 / FNC (training recipe §3.1).

Layer order, padding and initialisers follow the official TF implementation so that results and
checkpoints carry over: BN after every conv, stride on the bottleneck 3×3, explicit symmetric padding
for strided convs, γ = 0 on the last BN of each residual branch. Parameter paths:
``stem_conv``/``stem_bn`` (ResNet-D: ``stem_conv0..2``/``stem_bn0..2``), then ``group{g}_block{b}``
with groups numbered 1–4 as in the official ``fine_tune_after_block`` (0 = stem) and blocks from 0.
"""

import functools
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

ModuleDef = Callable[..., nn.Module]

# depth -> (bottleneck?, blocks per group)
_LAYOUTS: dict[int, tuple[bool, tuple[int, ...]]] = {
    18: (False, (2, 2, 2, 2)),
    34: (False, (3, 4, 6, 3)),
    50: (True, (3, 4, 6, 3)),
    101: (True, (3, 4, 23, 3)),
    152: (True, (3, 8, 36, 3)),
    200: (True, (3, 24, 36, 3)),
}
DEPTHS = tuple(sorted(_LAYOUTS))

_CONV_INIT = nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal")


def resnet_layout(depth: int) -> tuple[bool, tuple[int, ...]]:
    """(bottleneck blocks?, blocks per group) of a ResNet `depth`."""
    if depth not in _LAYOUTS:
        raise ValueError(f"ResNet depth must be one of {sorted(_LAYOUTS)}, got {depth}.")
    return _LAYOUTS[depth]


def _width(channels: int, width_multiplier: float) -> int:
    return max(1, int(channels * width_multiplier))


def resnet_feature_dim(depth: int, width_multiplier: float = 1) -> int:
    """Width of the pooled encoder output: 2048w for bottleneck nets, 512w for basic ones."""
    bottleneck, _ = resnet_layout(depth)
    return _width(512, width_multiplier) * (4 if bottleneck else 1)


def fixed_padding(kernel_size: int, strides: int) -> str | tuple[tuple[int, int], ...]:
    """TF `conv2d_fixed_padding`: SAME at stride 1, else (k−1)//2 before, the rest after, VALID.

    Zero padding through `nn.Conv` is the same as padding the input and convolving with VALID.
    """
    if strides == 1:
        return "SAME"
    total = kernel_size - 1
    return ((total // 2, total - total // 2),) * 2


class SqueezeExcite(nn.Module):
    """Channel gate: global mean → 1×1 conv (bias) → ReLU → 1×1 conv (bias) → sigmoid."""

    hidden_features: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        conv = functools.partial(nn.Conv, kernel_size=(1, 1), kernel_init=_CONV_INIT, dtype=self.dtype)
        s = jnp.mean(x, axis=(1, 2), keepdims=True)
        s = nn.relu(conv(self.hidden_features, name="reduce")(s))
        s = conv(x.shape[-1], name="expand")(s)
        return nn.sigmoid(s) * x


class SelectiveKernel(nn.Module):
    """SK unit replacing the bottleneck 3×3 conv + BN-ReLU (SimCLR v2 `sk_conv2d`).

    One 3×3 conv produces two f-channel streams; a softmax over the streams, computed from their
    pooled sum, mixes them. There is no BN after the unit.
    """

    filters: int
    strides: int
    sk_ratio: float
    conv: ModuleDef
    norm: ModuleDef
    min_dim: int = 32

    @nn.compact
    def __call__(self, x):
        padding = fixed_padding(3, self.strides)
        x = self.conv(2 * self.filters, (3, 3), self.strides, padding=padding, name="conv")(x)
        x = nn.relu(self.norm(name="bn")(x))
        streams = jnp.stack(jnp.split(x, 2, axis=-1))  # (2, B, H, W, f)
        context = jnp.mean(jnp.sum(streams, axis=0), axis=(1, 2), keepdims=True)
        mid_dim = max(int(self.filters * self.sk_ratio), self.min_dim)
        context = nn.relu(self.norm(name="mix_bn")(self.conv(mid_dim, (1, 1), name="mix_reduce")(context)))
        mixing = self.conv(2 * self.filters, (1, 1), name="mix_expand")(context)
        mixing = nn.softmax(jnp.stack(jnp.split(mixing, 2, axis=-1)), axis=0)
        return jnp.sum(streams * mixing, axis=0)


class ProjectionShortcut(nn.Module):
    """1×1 conv (+ stride) → BN, no ReLU; with ResNet-D (`avg_down`) a 2×2 average pool does the stride.

    ResNet-D pools the shortcut input (official bug #9 pooled the main input for basic blocks).
    """

    features: int
    strides: int
    avg_down: bool
    conv: ModuleDef
    norm: ModuleDef

    @nn.compact
    def __call__(self, x):
        strides = self.strides
        if self.avg_down:
            if strides > 1:
                # TF `fixed_padding(x, 2)` pads (0, 1) with zeros, then VALID pooling.
                x = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))
                x = nn.avg_pool(x, (2, 2), strides=(strides, strides), padding="VALID")
            else:
                # TF SAME average pooling ignores the padded cells.
                x = nn.avg_pool(x, (2, 2), strides=(1, 1), padding="SAME", count_include_pad=False)
            strides = 1
        x = self.conv(self.features, (1, 1), strides, padding=fixed_padding(1, strides), name="conv")(x)
        return self.norm(name="bn")(x)


class BasicBlock(nn.Module):
    """3×3 (stride) → BN-ReLU → 3×3 → BN(γ=0) → [SE] → + shortcut → ReLU; output width `filters`."""

    filters: int
    strides: int
    use_projection: bool
    conv: ModuleDef
    norm: ModuleDef
    avg_down: bool = False
    se_ratio: float = 0.0
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        shortcut = x
        if self.use_projection:
            shortcut = ProjectionShortcut(
                self.filters, self.strides, self.avg_down, self.conv, self.norm, name="shortcut"
            )(x)
        padding = fixed_padding(3, self.strides)
        y = self.conv(self.filters, (3, 3), self.strides, padding=padding, name="conv1")(x)
        y = nn.relu(self.norm(name="bn1")(y))
        y = self.conv(self.filters, (3, 3), name="conv2")(y)
        y = self.norm(scale_init=nn.initializers.zeros, name="bn2")(y)
        if self.se_ratio > 0:
            y = SqueezeExcite(max(1, int(self.filters * self.se_ratio)), self.dtype, name="se")(y)
        return nn.relu(y + shortcut)


class BottleneckBlock(nn.Module):
    """1×1 → BN-ReLU → 3×3 (stride; or SK) → BN-ReLU → 1×1 (4f) → BN(γ=0) → [SE] → + shortcut → ReLU.

    Output width 4 × `filters`.
    """

    filters: int
    strides: int
    use_projection: bool
    conv: ModuleDef
    norm: ModuleDef
    avg_down: bool = False
    sk_ratio: float = 0.0
    se_ratio: float = 0.0
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        shortcut = x
        if self.use_projection:
            shortcut = ProjectionShortcut(
                4 * self.filters, self.strides, self.avg_down, self.conv, self.norm, name="shortcut"
            )(x)
        y = nn.relu(self.norm(name="bn1")(self.conv(self.filters, (1, 1), name="conv1")(x)))
        if self.sk_ratio > 0:
            y = SelectiveKernel(self.filters, self.strides, self.sk_ratio, self.conv, self.norm, name="sk")(y)
        else:
            padding = fixed_padding(3, self.strides)
            y = self.conv(self.filters, (3, 3), self.strides, padding=padding, name="conv2")(y)
            y = nn.relu(self.norm(name="bn2")(y))
        y = self.conv(4 * self.filters, (1, 1), name="conv3")(y)
        y = self.norm(scale_init=nn.initializers.zeros, name="bn3")(y)
        if self.se_ratio > 0:
            y = SqueezeExcite(max(1, int(self.filters * self.se_ratio)), self.dtype, name="se")(y)
        return nn.relu(y + shortcut)


class ResNet(nn.Module):
    """ResNet v1 encoder returning globally average-pooled float32 features (B, `resnet_feature_dim`).

    `sk_ratio > 0` switches to ResNet-D (deep stem, average-pooled shortcuts) and, for bottleneck
    nets, SK 3×3 units. Under `jit` on global arrays BatchNorm statistics are global (over every view of
    every device) with no axis name. `dtype` is the compute dtype;
    parameters stay float32. Fractional `width_multiplier`s (e.g. 0.25) give small test networks.
    """

    depth: int
    width_multiplier: float = 1
    cifar_stem: bool = False
    sk_ratio: float = 0.0
    se_ratio: float = 0.0
    bn_momentum: float = 0.9
    bn_epsilon: float = 1e-5
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, *, train: bool):
        bottleneck, layout = resnet_layout(self.depth)
        w = self.width_multiplier
        conv = functools.partial(nn.Conv, use_bias=False, kernel_init=_CONV_INIT, dtype=self.dtype)
        norm = functools.partial(
            nn.BatchNorm,
            use_running_average=not train,
            momentum=self.bn_momentum,
            epsilon=self.bn_epsilon,
            dtype=self.dtype,
        )
        avg_down = self.sk_ratio > 0

        x = x.astype(self.dtype)
        if self.cifar_stem:
            x = nn.relu(norm(name="stem_bn")(conv(_width(64, w), (3, 3), name="stem_conv")(x)))
        else:
            if avg_down:
                stem = ((_width(32, w), 2), (_width(32, w), 1), (_width(64, w), 1))
                for i, (features, strides) in enumerate(stem):
                    padding = fixed_padding(3, strides)
                    x = conv(features, (3, 3), strides, padding=padding, name=f"stem_conv{i}")(x)
                    x = nn.relu(norm(name=f"stem_bn{i}")(x))
            else:
                x = conv(_width(64, w), (7, 7), 2, padding=fixed_padding(7, 2), name="stem_conv")(x)
                x = nn.relu(norm(name="stem_bn")(x))
            x = nn.max_pool(x, (3, 3), strides=(2, 2), padding="SAME")

        for g, num_blocks in enumerate(layout):
            for b in range(num_blocks):
                kwargs: dict[str, Any] = dict(
                    filters=_width(64 * 2**g, w),
                    strides=(1 if g == 0 else 2) if b == 0 else 1,
                    use_projection=b == 0,
                    conv=conv,
                    norm=norm,
                    avg_down=avg_down,
                    se_ratio=self.se_ratio,
                    dtype=self.dtype,
                    name=f"group{g + 1}_block{b}",
                )
                if bottleneck:
                    x = BottleneckBlock(sk_ratio=self.sk_ratio, **kwargs)(x)
                else:
                    x = BasicBlock(**kwargs)(x)
        return jnp.mean(x.astype(jnp.float32), axis=(1, 2))
