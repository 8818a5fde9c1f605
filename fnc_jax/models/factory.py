"""The networks of a config, and the key that initialises them.

Pretraining, evaluation, the benchmarks and the tests build their networks here, so that every mode
gets the same architecture (and the same parameter names) from `config.model`.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from fnc_jax.models.networks import ClassifierModel, ContrastiveModel


def uses_cifar_stem(config: ml_collections.ConfigDict) -> bool:
    """The CIFAR stem (3x3/1, no max-pool) is the default at 32 px and below (training recipe §3.1)."""
    return config.model.stem == "cifar" or (config.model.stem == "auto" and config.data.image_size <= 32)


def compute_dtype(config: ml_collections.ConfigDict) -> Any:
    """The dtype of convolutions and matmuls (`config.dtype`); parameters always stay float32."""
    return jnp.bfloat16 if config.dtype == "bfloat16" else jnp.float32


def network_kwargs(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """The architecture arguments from `config.model` shared by the pretraining and evaluation networks."""
    m = config.model
    return dict(
        depth=m.depth,
        width_multiplier=m.width_multiplier,
        cifar_stem=uses_cifar_stem(config),
        sk_ratio=m.sk_ratio,
        se_ratio=m.se_ratio,
        proj_layers=m.proj_layers,
        proj_out_dim=m.proj_out_dim,
        proj_hidden_dim=m.proj_hidden_dim or None,
        dtype=compute_dtype(config),
    )


def contrastive_model(config: ml_collections.ConfigDict, num_classes: int = 0) -> ContrastiveModel:
    """The pretraining network (features and projections); `num_classes > 0` adds the online probe."""
    return ContrastiveModel(**network_kwargs(config), num_classes=num_classes)


def classifier_model(
    config: ml_collections.ConfigDict, num_classes: int, *, bn_momentum: float = 0.9
) -> ClassifierModel:
    """The linear-eval / fine-tuning network for `config.model` (same submodule names as pretraining)."""
    return ClassifierModel(
        **network_kwargs(config),
        bn_momentum=bn_momentum,
        num_classes=num_classes,
        ft_proj_selector=config.model.ft_proj_selector,
        zero_init_head=config.model.zero_init_head,
    )


def init_key(seed: int) -> jax.Array:
    """Key for parameter initialisation: RBG (XLA's RngBitGenerator) compiles a ResNet's ~100
    initialisers about 10x faster than threefry on CPU (minutes → seconds)."""
    return jax.random.key(seed, impl="rbg")
