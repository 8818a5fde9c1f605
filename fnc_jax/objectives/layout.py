"""The `(V, B, d)` layout shared by every objective: normalisation, own columns, cross-device candidates.

Candidates are columns `c = v * N + g` (view v of global sample g, view-major over the global batch of
N = R * B samples on R devices along `axis_name`); local sample i on device r has g = r * B + i. The
gather is differentiable (its transpose is a reduce-scatter), so sharded gradients are exact.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

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


class InBatch(NamedTuple):
    """The in-batch layout of one device: anchors, the candidate columns and their labels."""

    z: Array  # (V, B, d) prepared embeddings (all views: they score false negatives)
    anchors: Array  # (Va, B, d): all views, or views 0 and 1 only (support_as_positives=False)
    candidates: Array  # (Va * N, d): the anchor views of the global batch, view-major
    labels: Array | None  # (B,) int32
    candidate_labels: Array | None  # (Va * N,) int32, the global labels tiled over the anchor views
    num_samples: int  # N = R * B
    sample_offset: Array | int  # global id of local sample 0


def in_batch_layout(
    embeddings: Array, hidden_norm: bool, axis_name: str | None, labels: Array | None, support_as_positives: bool
) -> InBatch:
    """Anchors and all-gathered candidates of the in-batch objectives (FNC, DCL, HCL)."""
    z = prepare_embeddings(embeddings, hidden_norm)
    num_views, batch, dim = z.shape
    device, num_devices = device_index_and_count(axis_name)
    num_samples = batch * num_devices
    anchor_views = num_views if support_as_positives else 2
    candidates = gather_samples(z, axis_name, axis=1)[:anchor_views].reshape(anchor_views * num_samples, dim)
    candidate_labels = None
    if labels is not None:
        labels = labels.astype(jnp.int32)
        candidate_labels = jnp.tile(gather_samples(labels, axis_name, axis=0), anchor_views)
    return InBatch(z, z[:anchor_views], candidates, labels, candidate_labels, num_samples, device * batch)


def per_view(view_fn: Callable[[Array, Array], Array], anchors: Array, low_memory: bool) -> Array:
    """(Va,) `view_fn(a, anchors[a])` for every anchor view a.

    low_memory=False vectorises over the views (all V (B, C) blocks live at once); True runs a
    rematerialised `lax.scan`, so the backward pass recomputes each view's block instead of storing
    all V of them and peak memory grows like B*C, not V*B*C.
    """
    views = jnp.arange(anchors.shape[0])
    if not low_memory:
        return jax.vmap(view_fn)(views, anchors)
    _, out = jax.lax.scan(lambda carry, x: (carry, jax.checkpoint(view_fn)(*x)), None, (views, anchors))
    return out
