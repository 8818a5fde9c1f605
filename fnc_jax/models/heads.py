"""Projection head and linear classifier (training recipe §3.3–3.4)."""

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

_HEAD_INIT = nn.initializers.normal(stddev=0.01)


class ProjectionHead(nn.Module):
    """SimCLR v2 MLP head: `num_layers` × dense (no bias) → BN, ReLU on all but the last layer.

    Hidden layers have BN with γ and β; the last BN has γ only, since the output is l2-normalised in
    the loss. Parameter paths: ``dense_{i}``, ``bn_{i}``.
    """

    hidden_dim: int
    num_layers: int = 3
    out_dim: int = 128
    bn_momentum: float = 0.9
    bn_epsilon: float = 1e-5
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, *, train: bool) -> tuple[jnp.ndarray, list[jnp.ndarray]]:
        """Returns (output, hiddens) with hiddens = [input, layer 0 output, ..., output].

        Index `hiddens` with `ft_proj_selector` directly: 0 = encoder output, 1 = after layer 0
        (post-ReLU), −1 = last layer.
        """
        hiddens = [x]
        for i in range(self.num_layers):
            last = i == self.num_layers - 1
            x = nn.Dense(
                self.out_dim if last else self.hidden_dim,
                use_bias=False,
                kernel_init=_HEAD_INIT,
                dtype=self.dtype,
                name=f"dense_{i}",
            )(x)
            x = nn.BatchNorm(
                use_running_average=not train,
                momentum=self.bn_momentum,
                epsilon=self.bn_epsilon,
                use_bias=not last,
                dtype=self.dtype,
                name=f"bn_{i}",
            )(x)
            if not last:
                x = nn.relu(x)
            hiddens.append(x)
        return x, hiddens


class LinearClassifier(nn.Module):
    """Linear layer with bias, no BN. `zero_init` zeroes the kernel (linear eval, fine-tuning);
    otherwise the kernel is N(0, 0.01²). Logits are float32."""

    num_classes: int
    zero_init: bool = False
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        kernel_init = nn.initializers.zeros if self.zero_init else _HEAD_INIT
        logits = nn.Dense(self.num_classes, kernel_init=kernel_init, dtype=self.dtype, name="dense")(x)
        return logits.astype(jnp.float32)
