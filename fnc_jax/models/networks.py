"""The two assembled networks: `ContrastiveModel` (pretraining) and `ClassifierModel` (evaluation).

Top-level parameter names are a contract with the optimiser masks and checkpoint restore rules:
``encoder``, ``projection_head``, ``probe`` (pretraining only) and ``head`` (classifier only).
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from fnc_jax.models.heads import LinearClassifier, ProjectionHead
from fnc_jax.models.resnet import ResNet, resnet_feature_dim


class _EncoderWithProjection(nn.Module):
    """Shared configuration so pretraining and evaluation build identically named submodules."""

    depth: int = 50
    width_multiplier: float = 1
    cifar_stem: bool = False
    sk_ratio: float = 0.0
    se_ratio: float = 0.0
    proj_layers: int = 3
    proj_out_dim: int = 128
    proj_hidden_dim: int | None = None  # None or 0: the encoder width
    bn_momentum: float = 0.9
    bn_epsilon: float = 1e-5
    dtype: Any = jnp.float32

    def _encoder(self) -> ResNet:
        return ResNet(
            depth=self.depth,
            width_multiplier=self.width_multiplier,
            cifar_stem=self.cifar_stem,
            sk_ratio=self.sk_ratio,
            se_ratio=self.se_ratio,
            bn_momentum=self.bn_momentum,
            bn_epsilon=self.bn_epsilon,
            dtype=self.dtype,
            name="encoder",
        )

    def _projection_head(self) -> ProjectionHead:
        hidden_dim = self.proj_hidden_dim or resnet_feature_dim(self.depth, self.width_multiplier)
        return ProjectionHead(
            hidden_dim=hidden_dim,
            num_layers=self.proj_layers,
            out_dim=self.proj_out_dim,
            bn_momentum=self.bn_momentum,
            bn_epsilon=self.bn_epsilon,
            dtype=self.dtype,
            name="projection_head",
        )


class ContrastiveModel(_EncoderWithProjection):
    """Pretraining network: encoder → projection head, plus an optional online linear probe.

    The probe (`num_classes > 0`) sees stop-gradient features, so it measures the representation
    without shaping it; it replaces the official all-zero-logits "label accuracy" (bug #5).
    """

    num_classes: int = 0

    @nn.compact
    def __call__(self, images, *, train: bool) -> dict[str, jnp.ndarray]:
        """images (N, H, W, 3) → {features (N, F), projection (N, out_dim) float32[, probe_logits]}."""
        features = self._encoder()(images, train=train)
        projection, _ = self._projection_head()(features, train=train)
        outputs = {"features": features, "projection": projection.astype(jnp.float32)}
        if self.num_classes > 0:
            probe = LinearClassifier(self.num_classes, dtype=self.dtype, name="probe")
            outputs["probe_logits"] = probe(jax.lax.stop_gradient(features))
        return outputs


class ClassifierModel(_EncoderWithProjection, kw_only=True):
    """Linear-evaluation / fine-tuning network: encoder → [projection head] → zero-init `head`.

    `ft_proj_selector` picks the classifier input from the projection head's hiddens (§3.3):
    0 = pooled encoder features, k = output of head layer k−1, −1 = last layer. With 0 the
    projection head is not built, so its parameters are absent and a restore from a pretraining
    checkpoint must drop `projection_head` (and `probe`). With k ≠ 0 the whole head runs, so every
    pretrained `projection_head` parameter has a counterpart. Freezing parts of the network is the
    optimiser's job (mask by top-level name), not the model's.
    """

    num_classes: int
    ft_proj_selector: int = 0
    zero_init_head: bool = True

    @nn.compact
    def __call__(self, images, *, train: bool) -> jnp.ndarray:
        """images (N, H, W, 3) → float32 logits (N, num_classes)."""
        x = self._encoder()(images, train=train)
        if self.ft_proj_selector != 0:
            _, hiddens = self._projection_head()(x, train=train)
            x = hiddens[self.ft_proj_selector]
        head = LinearClassifier(self.num_classes, self.zero_init_head, self.dtype, name="head")
        return head(x)
