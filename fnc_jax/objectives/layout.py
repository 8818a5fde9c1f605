"""The `(V, B, d)` layout shared by every objective: normalisation, own columns, cross-device candidates.

Candidates are columns `c = v * N + g` (view v of global sample g, view-major over the global batch of
N = R * B samples on R devices along `axis_name`); local sample i on device r has g = r * B + i. The
gather is differentiable (its transpose is a reduce-scatter), so sharded gradients are exact.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array


def l2_normalize(x: Array, eps: float = 1e-12) -> Array:
    """Row-wise x / sqrt(max(||x||^2, eps)), as `tf.math.l2_normalize` (finite gradient at 0)."""
    return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=-1, keepdims=True), eps))


def prepare_embeddings(embeddings: Array, hidden_norm: bool) -> Array:
    if embeddings.ndim != 3:
        raise ValueError(f"embeddings must have shape (V, B, d); got shape {embeddings.shape}.")
    if embeddings.shape[0] < 2:
        raise ValueError(f"embeddings need at least 2 views (V >= 2); got V = {embeddings.shape[0]}.")
    x = embeddings.astype(jnp.float32)
    return l2_normalize(x) if hidden_norm else x


def check_temperature(temperature: float | Array) -> None:
    # A jax array (a learnable or scheduled temperature) is not checked: it may be traced.
    if not isinstance(temperature, jax.Array) and not temperature > 0:
        raise ValueError(f"temperature={temperature!r} is invalid: allowed values are floats > 0.")


def own_columns(num_columns: int, num_samples: int, num_own_views: int, global_ids: Array) -> Array:
    """(B, C) bool: columns v*N + g(i) with v < num_own_views, i.e. the anchor image's own views."""
    col = jnp.arange(num_columns)
    return ((col // num_samples) < num_own_views)[None, :] & ((col % num_samples)[None, :] == global_ids[:, None])


def device_index_and_count(axis_name: str | None) -> tuple[Array | int, int]:
    if axis_name is None:
        return 0, 1
    return jax.lax.axis_index(axis_name), jax.lax.axis_size(axis_name)


def gather_samples(x: Array, axis_name: str | None, axis: int) -> Array:
    """All-gathers the sample axis (differentiable: the transpose is a reduce-scatter)."""
    if axis_name is None:
        return x
    return jax.lax.all_gather(x, axis_name, axis=axis, tiled=True)


def global_sum(x: Array, axis_name: str | None) -> Array:
    return x if axis_name is None else jax.lax.psum(x, axis_name)


def global_mean(x: Array, axis_name: str | None) -> Array:
    return x if axis_name is None else jax.lax.pmean(x, axis_name)
