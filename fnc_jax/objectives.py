"""The FNC contrastive objective: multi-view NT-Xent with False Negative Cancellation, in pure JAX.

This module imports nothing from the rest of fnc_jax, so it can be copied or imported on its own.
The semantics follow the official implementation (google-research/fnc) exactly by default; the
paper's variants (elimination, mean aggregation, support-only scoring, top-k or threshold alone) and an
oracle selection are options of `FNConfig`. See `shared/spec/method.md` for the maths.

Layout conventions (method.md §1):
- `embeddings` are `(V, B, d)`: V views of the B samples held by this device. Views 0 and 1 are the
  main views, 2..V-1 the support views.
- Candidates are columns `c = v * N + g`: view v of global sample g, view-major over the global batch
  of N = R * B samples (R devices along `axis_name`). Local sample i on device r has g = r * B + i.
- With `axis_name` (inside `jax.shard_map` / `pmap`), candidates are all-gathered differentiably; the
  loss and every metric are global (averaged over devices), so the sharded loss and its gradients
  equal the single-device loss on the global batch.

Memory: by default (`low_memory=True`) the loss is computed view by view inside a rematerialised
`lax.scan`, so the largest temporaries are `(B, C)` blocks (C = number of candidate columns) instead
of the `(V, B, C)` stack of all views' similarities; the backward pass recomputes each view's block.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp

Array = jax.Array

MODES = ("attraction", "elimination", "none")
AGGREGATIONS = ("max", "mean")
SUPPORT_SETS = ("all_views", "support_only")
SELECTIONS = ("topk", "threshold", "topk_and_threshold", "oracle")


@dataclasses.dataclass(frozen=True)
class FNConfig:
    """False-negative identification and cancellation settings (defaults = official implementation).

    Attributes:
      mode: `attraction` (false negatives become extra positives, Eq. 3), `elimination` (they leave
        the denominator, Eq. 2) or `none` (plain multi-view NT-Xent / SimCLR baseline).
      aggregation: how the per-view scores of the anchor image are combined: `max` or `mean`.
      support_set: which anchor views score candidates: `all_views` (official) or `support_only`
        (views 2..V-1, the paper's wording).
      selection: `topk`, `threshold` (raw cosine, strict >), `topk_and_threshold` (their
        intersection, official) or `oracle` (every same-label candidate; needs labels).
      topk: k of the top-k selection, counted in (view, sample) columns; clamped to the number of
        candidates, 0 selects nothing.
      threshold: cosine threshold of the threshold selection (raw cosine, not divided by tau).
      support_as_positives: True (official): support views are anchors and positives like the main
        views. False: only views 0 and 1 enter the loss (2-view NT-Xent over the main views of all
        samples) and the support views only help identify false negatives (paper Table 1 ablation).
    """

    mode: str = "attraction"
    aggregation: str = "max"
    support_set: str = "all_views"
    selection: str = "topk_and_threshold"
    topk: int = 10
    threshold: float = 0.7
    support_as_positives: bool = True

    def __post_init__(self):
        _check_choice("fn.mode", self.mode, MODES)
        _check_choice("fn.aggregation", self.aggregation, AGGREGATIONS)
        _check_choice("fn.support_set", self.support_set, SUPPORT_SETS)
        _check_choice("fn.selection", self.selection, SELECTIONS)
        if isinstance(self.topk, bool) or not isinstance(self.topk, int) or self.topk < 0:
            raise ValueError(f"fn.topk={self.topk!r} is invalid: allowed values are integers >= 0.")
        # A jax array is accepted as is, so that the threshold can be traced (a schedule, a sweep).
        if isinstance(self.threshold, bool) or (
            not isinstance(self.threshold, jax.Array)
            and not (isinstance(self.threshold, (int, float)) and math.isfinite(self.threshold))
        ):
            raise ValueError(f"fn.threshold={self.threshold!r} is invalid: allowed values are finite floats.")
        if not isinstance(self.support_as_positives, bool):
            raise ValueError(
                f"fn.support_as_positives={self.support_as_positives!r} is invalid: allowed values are True, False."
            )

    @property
    def uses_topk(self) -> bool:
        return self.selection in ("topk", "topk_and_threshold")

    @property
    def uses_threshold(self) -> bool:
        return self.selection in ("threshold", "topk_and_threshold")


def _check_choice(field: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{field}={value!r} is invalid: allowed values are {', '.join(allowed)}.")


def l2_normalize(x: Array, eps: float = 1e-12) -> Array:
    """Row-wise x / sqrt(max(||x||^2, eps)), as `tf.math.l2_normalize` (finite gradient at 0)."""
    return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=-1, keepdims=True), eps))


# ----------------------------------------------------------------------------------------------
# Cross-device helpers.


def _device_index_and_count(axis_name: str | None) -> tuple[Array | int, int]:
    if axis_name is None:
        return 0, 1
    return jax.lax.axis_index(axis_name), jax.lax.axis_size(axis_name)


def _gather_samples(x: Array, axis_name: str | None, axis: int) -> Array:
    """All-gathers the sample axis (differentiable: the transpose is a reduce-scatter)."""
    if axis_name is None:
        return x
    return jax.lax.all_gather(x, axis_name, axis=axis, tiled=True)


def _global_sum(x: Array, axis_name: str | None) -> Array:
    return x if axis_name is None else jax.lax.psum(x, axis_name)


def _global_mean(x: Array, axis_name: str | None) -> Array:
    return x if axis_name is None else jax.lax.pmean(x, axis_name)


# ----------------------------------------------------------------------------------------------
# False-negative identification.


def _own_columns(num_columns: int, num_samples: int, num_own_views: int, global_ids: Array) -> Array:
    """(B, C) bool: columns v*N + g(i) with v < num_own_views, i.e. the anchor image's own views."""
    col = jnp.arange(num_columns)
    return ((col // num_samples) < num_own_views)[None, :] & ((col % num_samples)[None, :] == global_ids[:, None])


def _support_views(queries: Array, fn: FNConfig) -> Array:
    if fn.support_set == "all_views":
        return queries
    if queries.shape[0] < 3:
        raise ValueError(
            f"fn.support_set='support_only' needs support views, but the embeddings have "
            f"{queries.shape[0]} views (support_size = {queries.shape[0] - 2}): use support_size >= 1 or "
            "support_set='all_views'."
        )
    return queries[2:]


def _aggregate_scores(queries: Array, candidates: Array, aggregation: str, low_memory: bool) -> Array:
    """(B, C) max or mean over the U query views of the raw scores <q_u, K_c>."""
    if not low_memory:
        scores = jnp.einsum("ubd,cd->ubc", queries, candidates)
        return jnp.max(scores, axis=0) if aggregation == "max" else jnp.mean(scores, axis=0)

    def body(acc, q):
        s = q @ candidates.T
        return (jnp.maximum(acc, s) if aggregation == "max" else acc + s), None

    # Starting from view 0's scores (not a constant) keeps the carry's sharding type under shard_map.
    acc, _ = jax.lax.scan(body, queries[0] @ candidates.T, queries[1:])
    return acc if aggregation == "max" else acc / queries.shape[0]


def _select(scores: Array, own: Array, num_candidates: int, fn: FNConfig, same_label: Array | None) -> Array:
    """Selection of method.md §4.5 on (B, C) aggregated scores; own columns never selected.

    `num_candidates` (static) is the number of non-own columns per row, the clamp for k.
    """
    if fn.selection == "oracle":
        return same_label & ~own
    masked = jnp.where(own, -jnp.inf, scores)
    selected = ~own
    if fn.uses_threshold:
        selected &= masked > fn.threshold  # strict >, on the raw cosine
    if fn.uses_topk:
        k = min(fn.topk, num_candidates)
        if k == 0:
            return jnp.zeros_like(own)
        _, idx = jax.lax.top_k(masked, k)  # ties: the lower column index wins, as in the official code
        rows = jnp.arange(scores.shape[0])[:, None]
        selected &= jnp.zeros_like(own).at[rows, idx].set(True)
    return selected


def false_negative_mask(
    queries: Array,
    candidates: Array,
    *,
    fn: FNConfig = FNConfig(),
    num_samples: int,
    sample_offset: Array | int = 0,
    labels: Array | None = None,
    candidate_labels: Array | None = None,
    low_memory: bool = True,
) -> Array:
    """Identifies the false negatives of B anchor images among candidate columns (method.md §4).

    Args:
      queries: `(V, B, d)` features of the anchor images' V views (l2-normalised for cosine scores).
      candidates: `(C, d)` candidate features; column c = v * N + g is view v of global sample g.
      fn: selection settings (`mode` is ignored here).
      num_samples: N, the number of samples per view block of `candidates`.
      sample_offset: global id of local sample 0 (device index * B).
      labels: `(B,)` anchor labels, needed by `selection='oracle'`.
      candidate_labels: `(C,)` candidate labels (negative = unknown, never same-label).
      low_memory: score view by view (memory B*C) rather than all views at once (V*B*C).

    Returns:
      `(B, C)` bool mask, stop-gradient: the anchor image's own columns v*N + g (v < V) are never
      selected; ties in top-k keep the lower column index; k is clamped to the candidate count.
    """
    num_views, batch = queries.shape[:2]
    if fn.selection == "oracle" and (labels is None or candidate_labels is None):
        raise ValueError("fn.selection='oracle' needs labels: pass labels (and candidate labels).")
    queries = jax.lax.stop_gradient(queries.astype(jnp.float32))
    candidates = jax.lax.stop_gradient(candidates.astype(jnp.float32))
    global_ids = sample_offset + jnp.arange(batch)
    num_columns = candidates.shape[0]
    own = _own_columns(num_columns, num_samples, num_views, global_ids)
    num_candidates = num_columns - min(num_views, num_columns // num_samples)
    same_label = None
    if labels is not None and candidate_labels is not None:
        same_label = (labels[:, None] == candidate_labels[None, :]) & (candidate_labels[None, :] >= 0)
    scores = None
    if fn.selection != "oracle":
        scores = _aggregate_scores(_support_views(queries, fn), candidates, fn.aggregation, low_memory)
    return jax.lax.stop_gradient(_select(scores, own, num_candidates, fn, same_label))


# ----------------------------------------------------------------------------------------------
# The loss.


def _view_losses(
    anchors: Array,
    candidates: Array,
    fn_mask: Array,
    *,
    num_samples: int,
    global_ids: Array,
    temperature: float,
    mode: str,
    low_memory: bool,
) -> Array:
    """(Va,) per-anchor-view mean over samples of L_a(i) (method.md §3, §5)."""
    num_views, batch = anchors.shape[:2]
    num_columns = candidates.shape[0]
    col = jnp.arange(num_columns)
    own = _own_columns(num_columns, num_samples, num_views, global_ids)
    col_view = col // num_samples

    def view_loss(a: Array, z_a: Array) -> Array:
        logits = (z_a @ candidates.T) / temperature  # (B, C)
        is_self = own & (col_view == a)[None, :]
        positives = own & ~is_self
        in_denominator = ~is_self
        targets = positives
        if mode == "attraction":
            targets = positives | fn_mask
        elif mode == "elimination":
            in_denominator &= ~fn_mask
        lse = jax.nn.logsumexp(jnp.where(in_denominator, logits, -jnp.inf), axis=1)
        target_mean = jnp.sum(jnp.where(targets, logits, 0.0), axis=1) / jnp.sum(targets, axis=1)
        return jnp.mean(lse - target_mean)

    views = jnp.arange(num_views)
    if not low_memory:
        return jax.vmap(view_loss)(views, anchors)
    # Rematerialised scan: each view's (B, C) block is recomputed in the backward pass instead of
    # all V blocks being stored, so peak memory grows like B*C, not V*B*C.
    _, losses = jax.lax.scan(lambda carry, x: (carry, jax.checkpoint(view_loss)(*x)), None, (views, anchors))
    return losses


def _fn_metrics(
    fn_mask: Array,
    own: Array,
    labels: Array | None,
    candidate_labels: Array | None,
    axis_name: str | None,
) -> dict[str, Array]:
    """|F| per sample and, with labels, the global precision / recall of the selection."""
    num_fn = jnp.sum(fn_mask, axis=1)
    metrics = {"num_fn": num_fn, "mean_num_fn": _global_mean(jnp.mean(num_fn.astype(jnp.float32)), axis_name)}
    if labels is None or candidate_labels is None:
        return metrics
    same = (labels[:, None] == candidate_labels[None, :]) & (candidate_labels[None, :] >= 0) & ~own
    true_fn = _global_sum(jnp.sum(fn_mask & same), axis_name)
    selected = _global_sum(jnp.sum(fn_mask), axis_name)
    same_total = _global_sum(jnp.sum(same), axis_name)
    metrics.update(
        fn_true=true_fn,
        fn_selected=selected,
        fn_same_label=same_total,
        fn_precision=true_fn / jnp.maximum(selected, 1),
        fn_recall=true_fn / jnp.maximum(same_total, 1),
    )
    return metrics


def _objective(
    anchors: Array,
    candidates: Array,
    score_queries: Array,
    score_candidates: Array,
    *,
    num_samples: int,
    num_blocks: int,
    sample_offset: Array | int,
    temperature: float,
    fn: FNConfig,
    labels: Array | None,
    candidate_labels: Array | None,
    axis_name: str | None,
    low_memory: bool,
) -> tuple[Array, dict[str, Array]]:
    """Shared core of the in-batch and memory losses, on already normalised float32 features."""
    num_views, batch = anchors.shape[:2]
    global_ids = sample_offset + jnp.arange(batch)
    own = _own_columns(candidates.shape[0], num_samples, num_views, global_ids)
    if fn.mode == "none":
        fn_mask = jnp.zeros_like(own)
    else:
        fn_mask = false_negative_mask(
            score_queries,
            score_candidates,
            fn=fn,
            num_samples=num_samples,
            sample_offset=sample_offset,
            labels=labels,
            candidate_labels=candidate_labels,
            low_memory=low_memory,
        )
    losses = _view_losses(
        anchors,
        candidates,
        fn_mask,
        num_samples=num_samples,
        global_ids=global_ids,
        temperature=temperature,
        mode=fn.mode,
        low_memory=low_memory,
    )
    # Sum of the per-view means, scaled by 2/V: SimCLR's two-direction sum at V = 2 (method.md §3).
    loss = _global_mean(jnp.sum(losses) * (2.0 / num_views), axis_name)
    aux = _fn_metrics(fn_mask, own, labels, candidate_labels, axis_name)
    aux["fn_mask"] = fn_mask.reshape(batch, num_blocks, num_samples)
    return loss, aux


def _prepare(embeddings: Array, hidden_norm: bool) -> Array:
    if embeddings.ndim != 3:
        raise ValueError(f"embeddings must have shape (V, B, d); got shape {embeddings.shape}.")
    if embeddings.shape[0] < 2:
        raise ValueError(f"embeddings need at least 2 views (V >= 2); got V = {embeddings.shape[0]}.")
    x = embeddings.astype(jnp.float32)
    return l2_normalize(x) if hidden_norm else x


def _check_temperature(temperature: float | Array) -> None:
    # A jax array (a learnable or scheduled temperature) is not checked: it may be traced.
    if not isinstance(temperature, jax.Array) and not temperature > 0:
        raise ValueError(f"temperature={temperature!r} is invalid: allowed values are floats > 0.")


def fnc_loss(
    embeddings: Array,
    *,
    temperature: float = 0.1,
    hidden_norm: bool = True,
    fn: FNConfig = FNConfig(),
    axis_name: str | None = None,
    labels: Array | None = None,
    low_memory: bool = True,
) -> tuple[Array, dict[str, Array]]:
    """In-batch multi-view contrastive loss with false negative cancellation (method.md §3-6).

    Args:
      embeddings: `(V, B, d)` projections of V views of this device's B samples (any float dtype;
        the loss is computed in float32).
      temperature: tau of the softmax (a float, or a scalar array when traced).
      hidden_norm: l2-normalise the embeddings first (cosine similarities); off = raw dot products.
      fn: false-negative settings.
      axis_name: mapped axis over which the global batch is spread; candidates are all-gathered
        across it and the returned loss / metrics are global.
      labels: optional `(B,)` integer labels of the local samples, for FN precision / recall and
        the oracle selection.
      low_memory: view-by-view computation (see module docstring). False vectorises over views and
        stores all V blocks (about 8x the temporary memory); on CPU it is also slower
        (benchmarks/objective.py), so it is only worth trying on accelerators with small blocks.

    Returns:
      `(loss, aux)`: the scalar loss (mean over devices of the per-device loss) and a dict with
      `fn_mask` `(B, V, N)` bool (candidate view, global sample; reshape to `(B, V*N)` for the
      official layout), `num_fn` `(B,)`, `mean_num_fn`, and with labels `fn_precision`,
      `fn_recall` and their integer counts `fn_true`, `fn_selected`, `fn_same_label`.
    """
    _check_temperature(temperature)
    z = _prepare(embeddings, hidden_norm)
    num_views, batch, dim = z.shape
    device, num_devices = _device_index_and_count(axis_name)
    num_samples = batch * num_devices
    gathered = _gather_samples(z, axis_name, axis=1)  # (V, N, d), global view-major
    candidate_labels = None
    if labels is not None:
        labels = labels.astype(jnp.int32)
        candidate_labels = _gather_samples(labels, axis_name, axis=0)
    anchor_views = num_views if fn.support_as_positives else 2
    candidates = gathered[:anchor_views].reshape(anchor_views * num_samples, dim)
    return _objective(
        z[:anchor_views],
        candidates,
        z,
        candidates,
        num_samples=num_samples,
        num_blocks=anchor_views,
        sample_offset=device * batch,
        temperature=temperature,
        fn=fn,
        labels=labels,
        candidate_labels=None if labels is None else jnp.tile(candidate_labels, anchor_views),
        axis_name=axis_name,
        low_memory=low_memory,
    )


def update_memory(memory: Array, gathered: Array) -> Array:
    """Next memory queue (method.md §7): the newest rows first, the oldest dropped.

    Args:
      memory: `(M*N, ...)` current queue (features, or labels with -1 for empty rows).
      gathered: `(V*N, ...)` this step's rows in global view-major order (e.g. the all-gathered EMA
        features reshaped from `(V, N, d)`).

    Returns:
      `concat([gathered, memory[:M*N - V*N]])`, stop-gradient.
    """
    if gathered.shape[0] > memory.shape[0] or gathered.shape[1:] != memory.shape[1:]:
        raise ValueError(
            f"update_memory: gathered rows {gathered.shape} do not fit the memory {memory.shape} "
            "(need V*N <= M*N rows of the same feature shape)."
        )
    new = jnp.concatenate([gathered.astype(memory.dtype), memory[: memory.shape[0] - gathered.shape[0]]], axis=0)
    return jax.lax.stop_gradient(new)


def fnc_memory_loss(
    embeddings: Array,
    ema_embeddings: Array,
    memory: Array,
    *,
    temperature: float = 0.1,
    hidden_norm: bool = True,
    fn: FNConfig = FNConfig(),
    axis_name: str | None = None,
    labels: Array | None = None,
    memory_labels: Array | None = None,
    low_memory: bool = True,
) -> tuple[Array, dict[str, Array]]:
    """Memory-bank + EMA-encoder variant of the FNC loss (method.md §7, the official default path).

    The anchors are the online embeddings; positives, negatives and false-negative candidates are rows
    of `memory`, which must already hold this step's EMA features in its first V*N rows (pass
    `update_memory(queue, gathered_ema)`); the anchor's own view is its EMA row a*N + g. False
    negatives are scored with the anchor image's EMA features. Neither `ema_embeddings` nor `memory`
    is re-normalised (they arrive normalised) and neither carries gradient.

    Args:
      embeddings: `(V, B, d)` online projections of this device's samples.
      ema_embeddings: `(V, B, d)` l2-normalised EMA projections of the same views.
      memory: `(M*N, d)` queue in global view-major row order, M >= V.
      memory_labels: optional `(M*N,)` labels of the memory rows (-1 = empty), with `labels`.
      Other arguments as in `fnc_loss`.

    Returns:
      `(loss, aux)` as `fnc_loss`, with `fn_mask` of shape `(B, M, N)` over memory rows.
    """
    _check_temperature(temperature)
    z = _prepare(embeddings, hidden_norm)
    num_views, batch, _ = z.shape
    if ema_embeddings.shape != embeddings.shape:
        raise ValueError(f"ema_embeddings {ema_embeddings.shape} must have the shape of embeddings {embeddings.shape}.")
    device, num_devices = _device_index_and_count(axis_name)
    num_samples = batch * num_devices
    rows = memory.shape[0]
    if rows % num_samples or rows // num_samples < num_views:
        raise ValueError(
            f"memory has {rows} rows; it must hold M * N rows with N = {num_samples} (global batch) and "
            f"M >= V = {num_views}."
        )
    if not fn.support_as_positives:
        raise ValueError("fn.support_as_positives=False is only available for the in-batch loss (fnc_loss).")
    if labels is not None:
        labels = labels.astype(jnp.int32)
    memory = jax.lax.stop_gradient(memory.astype(jnp.float32))
    return _objective(
        z,
        memory,
        jax.lax.stop_gradient(ema_embeddings.astype(jnp.float32)),
        memory,
        num_samples=num_samples,
        num_blocks=rows // num_samples,
        sample_offset=device * batch,
        temperature=temperature,
        fn=fn,
        labels=labels,
        candidate_labels=memory_labels,
        axis_name=axis_name,
        low_memory=low_memory,
    )
