"""The official TF1 network in inference mode, with plain TF ops: a reference for checkpoints the official
code did not write for these tests (selective kernels, the CIFAR stem, SimCLR heads).

It follows the official `resnet.py` (google-research/simclr, whose copy FNC ships) and `model_util.py`
call by call: `conv2d_fixed_padding`, `batch_norm_relu`, `sk_conv2d`, the two block kinds and the stem,
then `projection_head` and `supervised_head`. Variables get their names the way `tf.layers` gives them,
from per-scope counters in call order, so this file knows nothing of the importer's mapping; the golden
checkpoints (written by the official code) check that it reproduces the official outputs.
"""

from __future__ import annotations

import pathlib

import numpy as np
import tensorflow as tf

BLOCKS = {18: (False, [2, 2, 2, 2]), 34: (False, [3, 4, 6, 3]), 50: (True, [3, 4, 6, 3])}


class Store:
    """Variables by checkpoint name: taken from `values`, or created with seeded random values (`created`)."""

    def __init__(self, values=None, seed: int = 0):
        self.values = dict(values or {})
        self.created: dict[str, np.ndarray] = {}
        self.rng = np.random.default_rng(seed)
        self.counters: dict[tuple[str, str], int] = {}

    def layer(self, scope: str, kind: str) -> str:
        n = self.counters.get((scope, kind), 0)
        self.counters[(scope, kind)] = n + 1
        return f"{scope}{kind}" if n == 0 else f"{scope}{kind}_{n}"

    def get(self, name: str, shape: tuple[int, ...]) -> tf.Tensor:
        if name not in self.values:
            leaf = name.rsplit("/", 1)[-1]
            if leaf == "kernel":
                value = self.rng.standard_normal(shape) / np.sqrt(np.prod(shape[:-1]))
            elif leaf in ("gamma", "moving_variance"):
                value = self.rng.uniform(0.5, 1.5, shape)
            elif leaf == "beta":
                value = self.rng.uniform(-0.25, 0.25, shape)
            else:  # moving_mean, bias
                value = 0.1 * self.rng.standard_normal(shape)
            self.values[name] = self.created[name] = value.astype(np.float32)
        value = self.values[name]
        assert tuple(value.shape) == tuple(shape), (name, value.shape, shape)
        return tf.constant(value)


class OfficialNetwork:
    """`resnet_v1(depth, width_multiplier, cifar_stem)` under FLAGS.sk_ratio, then the heads; inference only."""

    def __init__(
        self,
        store: Store,
        *,
        depth: int,
        width_multiplier: float,
        sk_ratio: float = 0.0,
        cifar_stem: bool = False,
        prefix: str = "",
    ):
        self.store, self.depth, self.w, self.sk_ratio, self.cifar_stem = (
            store,
            depth,
            width_multiplier,
            sk_ratio,
            cifar_stem,
        )
        self.scope = prefix + "base_model/"
        self.prefix = prefix
        self.stages: dict[str, np.ndarray] = {}

    # resnet.py -------------------------------------------------------------------------------------
    def conv(self, x, filters, kernel_size, strides):
        """conv2d_fixed_padding; tf.layers turns a float `filters` into int(filters)."""
        if strides > 1:
            total = kernel_size - 1
            x = tf.pad(x, [[0, 0], [total // 2, total - total // 2], [total // 2, total - total // 2], [0, 0]])
        name = self.store.layer(self.scope, "conv2d")
        kernel = self.store.get(name + "/kernel", (kernel_size, kernel_size, x.shape[-1], int(filters)))
        return tf.nn.conv2d(x, kernel, strides, "SAME" if strides == 1 else "VALID")

    def bn(self, x, relu=True, scope=None, center=True):
        name = scope or self.store.layer(self.scope, "batch_normalization")
        c = x.shape[-1]
        beta = self.store.get(name + "/beta", (c,)) if center else None
        gamma = self.store.get(name + "/gamma", (c,))
        mean = self.store.get(name + "/moving_mean", (c,))
        var = self.store.get(name + "/moving_variance", (c,))
        x = tf.nn.batch_normalization(x, mean, var, beta, gamma, 1e-5)
        return tf.nn.relu(x) if relu else x

    def sk_conv2d(self, x, filters, strides, min_dim=32):
        x = self.bn(self.conv(x, 2 * filters, 3, strides))
        x = tf.stack(tf.split(x, 2, axis=3))
        mid_dim = max(int(filters * self.sk_ratio), min_dim)
        g = tf.reduce_mean(tf.reduce_sum(x, axis=0), [1, 2], keepdims=True)
        g = self.bn(self.conv(g, mid_dim, 1, 1))
        mixing = self.conv(g, 2 * filters, 1, 1)
        mixing = tf.nn.softmax(tf.stack(tf.split(mixing, 2, axis=3)), axis=0)
        return tf.reduce_sum(x * mixing, axis=0)

    def residual_block(self, x, filters, strides, use_projection):
        assert self.sk_ratio == 0, "the official SK basic block cannot be built at stride 2"
        shortcut = x
        if use_projection:
            shortcut = self.bn(self.conv(x, filters, 1, strides), relu=False)
        x = self.bn(self.conv(x, filters, 3, strides))
        x = self.bn(self.conv(x, filters, 3, 1), relu=False)
        return tf.nn.relu(x + shortcut)

    def bottleneck_block(self, x, filters, strides, use_projection):
        shortcut = x
        if use_projection:
            if self.sk_ratio > 0:
                if strides > 1:
                    shortcut = tf.pad(x, [[0, 0], [0, 1], [0, 1], [0, 0]])
                shortcut = tf.nn.avg_pool2d(shortcut, 2, strides, "SAME" if strides == 1 else "VALID")
                shortcut = self.conv(shortcut, 4 * filters, 1, 1)
            else:
                shortcut = self.conv(x, 4 * filters, 1, strides)
            shortcut = self.bn(shortcut, relu=False)
        x = self.bn(self.conv(x, filters, 1, 1))
        if self.sk_ratio > 0:
            x = self.sk_conv2d(x, filters, strides)
        else:
            x = self.bn(self.conv(x, filters, 3, strides))
        x = self.bn(self.conv(x, 4 * filters, 1, 1), relu=False)
        return tf.nn.relu(x + shortcut)

    def encoder(self, images) -> tf.Tensor:
        bottleneck, layers = BLOCKS[self.depth]
        w = self.w
        x = tf.constant(images)
        if self.cifar_stem:
            x = self.conv(x, 64 * w, 3, 1)
            self.stages["initial_conv"] = x
            x = self.bn(x)
        else:
            if self.sk_ratio > 0:
                x = self.bn(self.conv(x, 64 * w // 2, 3, 2))
                x = self.bn(self.conv(x, 64 * w // 2, 3, 1))
                x = self.conv(x, 64 * w, 3, 1)
            else:
                x = self.conv(x, 64 * w, 7, 2)
            self.stages["initial_conv"] = x
            x = tf.nn.max_pool2d(self.bn(x), 3, 2, "SAME")
        self.stages["initial_max_pool"] = x
        block = self.bottleneck_block if bottleneck else self.residual_block
        for g, n in enumerate(layers):
            filters = int(64 * 2**g * w)
            x = block(x, filters, 1 if g == 0 else 2, True)
            for _ in range(1, n):
                x = block(x, filters, 1, False)
            self.stages[f"block_group{g + 1}"] = x
        x = tf.reduce_mean(x, [1, 2])
        self.stages["final_avg_pool"] = x
        return x

    # model_util.py ---------------------------------------------------------------------------------
    def projection_head(self, x, name, num_layers=3, out_dim=128):
        self.stages["proj_hidden_0"] = x
        mid = x.shape[-1]
        for j in range(num_layers):
            last = j == num_layers - 1
            scope = f"{self.prefix}{name}/nl_{j}/"
            kernel = self.store.get(scope + "dense/kernel", (x.shape[-1], out_dim if last else mid))
            x = self.bn(tf.matmul(x, kernel), relu=False, scope=scope + "batch_normalization", center=not last)
            self.stages[f"proj_nl_{j}_out"] = x
            x = x if last else tf.nn.relu(x)
            self.stages[f"proj_hidden_{j + 1}"] = x
        self.stages["proj_out"] = x
        return x

    def supervised_head(self, x, num_classes):
        kernel = self.store.get("head_supervised/linear_layer/dense/kernel", (x.shape[-1], num_classes))
        bias = self.store.get("head_supervised/linear_layer/dense/bias", (num_classes,))
        logits = tf.matmul(x, kernel) + bias
        self.stages["logits_sup"] = logits
        return logits


def run(
    store: Store,
    images: np.ndarray,
    *,
    head: str | None = "head_contrastive",
    num_classes: int = 0,
    ft_proj_selector: int = 0,
    prefix: str = "",
    **architecture,
) -> dict[str, np.ndarray]:
    """Every stage output of one network (the supervised head reads `proj_hidden_{ft_proj_selector}`)."""
    net = OfficialNetwork(store, prefix=prefix, **architecture)
    net.encoder(images.astype(np.float32))
    if head:
        net.projection_head(net.stages["final_avg_pool"], head)
    if num_classes:
        hidden = net.stages[f"proj_hidden_{ft_proj_selector}"] if head else net.stages["final_avg_pool"]
        net.supervised_head(hidden, num_classes)
    return {k: v.numpy() for k, v in net.stages.items()}


def save(values: dict[str, np.ndarray], prefix: str) -> str:
    """A TF checkpoint holding exactly `values` under their names (what the official Saver writes)."""
    pathlib.Path(prefix).parent.mkdir(parents=True, exist_ok=True)
    names = sorted(values)
    tf.raw_ops.SaveV2(
        prefix=prefix,
        tensor_names=names,
        shape_and_slices=[""] * len(names),
        tensors=[tf.constant(values[n]) for n in names],
    )
    return prefix
