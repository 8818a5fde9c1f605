"""False-negative identification (method §4): support views, max/mean scores, top-k and/or threshold,
oracle; and the FN diagnostics (|F| per sample, global precision and recall)."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from fnc_jax.objectives.fn_config import FNConfig, FNLimits, FNSchedule
from fnc_jax.objectives.layout import global_mean, global_sum, own_columns

Array = jax.Array


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


class Selection(NamedTuple):
    """The selected false negatives: the dense `(B, C)` mask and, for a top-k selection, the same set as
    the `(B, k)` column indices `top` with their `(B, k)` flags `keep` (what sparse consumers gather)."""

    mask: Array
    top: Array | None
    keep: Array | None

    def counts(self) -> Array:
        """(B,) int32 number selected per row (from the k flags when there are some: no (B, C) pass)."""
        return jnp.sum(self.mask if self.keep is None else self.keep, axis=1, dtype=jnp.int32)


def select(
    scores: Array | None,
    own: Array,
    num_candidates: int,
    fn: FNConfig,
    same_label: Array | None,
    limits: FNLimits | None,
) -> Selection:
    """Selection of docs/method.md §4.5 on (B, C) aggregated scores; own columns never selected.

    `num_candidates` (static) is the number of non-own columns per row, the clamp for k. `limits` (a
    schedule's k and threshold at this step) replace `fn.topk` / `fn.threshold` and gate the selection.
    A top-k selection is decided on its k values (rank, threshold, schedule) and scattered once into the
    mask, so no (B, C) where-chain is built.
    """
    if fn.selection == "oracle":
        selected = same_label & ~own
        return Selection(selected if limits is None else selected & limits.active, None, None)
    masked = jnp.where(own, -jnp.inf, scores)
    threshold = fn.threshold if limits is None else limits.threshold
    if not fn.uses_topk:
        selected = masked > threshold  # strict >, on the raw cosine; own columns are -inf
        return Selection(selected if limits is None else selected & limits.active, None, None)
    k = min(fn.topk, num_candidates)
    values, top = jax.lax.top_k(masked, k)  # ties: the lower column index wins, as in the official code
    keep = values > -jnp.inf  # never an own column
    if fn.uses_threshold:
        keep &= values > threshold
    if limits is not None:
        # A scheduled k keeps the first limits.topk of the k_max best (top_k returns them in order).
        keep &= (jnp.arange(k) < limits.topk)[None, :] & limits.active
    rows = jnp.arange(scores.shape[0])[:, None]
    return Selection(jnp.zeros_like(own).at[rows, top].set(keep, unique_indices=True), top, keep)


def false_negatives(
    queries: Array,
    candidates: Array,
    *,
    fn: FNConfig,
    num_samples: int,
    sample_offset: Array | int,
    labels: Array | None,
    candidate_labels: Array | None,
    low_memory: bool,
    schedule: FNSchedule | None,
    step: Array | int,
    scores: Array | None = None,
) -> Selection:
    """`false_negative_mask` as a `Selection`; `scores` (B, C), when given, are the queries' already
    aggregated scores (taken from the loss's own similarity blocks), so none are computed here."""
    num_views, batch = queries.shape[:2]
    if fn.selection == "oracle" and (labels is None or candidate_labels is None):
        raise ValueError("fn.selection='oracle' needs labels: pass labels (and candidate labels).")
    candidates = jax.lax.stop_gradient(candidates.astype(jnp.float32))
    global_ids = sample_offset + jnp.arange(batch)
    num_columns = candidates.shape[0]
    own = own_columns(num_columns, num_samples, num_views, global_ids)
    num_candidates = num_columns - min(num_views, num_columns // num_samples)
    same_label = None
    if labels is not None and candidate_labels is not None:
        same_label = (labels[:, None] == candidate_labels[None, :]) & (candidate_labels[None, :] >= 0)
    if fn.selection != "oracle" and scores is None:
        queries = jax.lax.stop_gradient(queries.astype(jnp.float32))
        scores = _aggregate_scores(_support_views(queries, fn), candidates, fn.aggregation, low_memory)
    limits = None if schedule is None else schedule.limits(step, fn)
    return jax.tree.map(jax.lax.stop_gradient, select(scores, own, num_candidates, fn, same_label, limits))


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
    schedule: FNSchedule | None = None,
    step: Array | int = 0,
) -> Array:
    """Identifies the false negatives of B anchor images among candidate columns (docs/method.md §4).

    Args:
      queries: `(V, B, d)` features of the anchor images' V views (l2-normalised for cosine scores).
      candidates: `(C, d)` candidate features; column c = v * N + g is view v of global sample g.
      fn: selection settings (`mode` is ignored here).
      num_samples: N, the number of samples per view block of `candidates`.
      sample_offset: global id of local sample 0 (device index * B).
      labels: `(B,)` anchor labels, needed by `selection='oracle'`.
      candidate_labels: `(C,)` candidate labels (negative = unknown, never same-label).
      low_memory: score view by view (memory B*C) rather than all views at once (V*B*C).
      schedule: when given, the selection in force at `step` (traced or not): nothing before its start,
        then its ramped k and threshold (`FNSchedule`).
      step: the training step the schedule is evaluated at.

    Returns:
      `(B, C)` bool mask, stop-gradient: the anchor image's own columns v*N + g (v < V) are never
      selected; ties in top-k keep the lower column index; k is clamped to the candidate count.
    """
    return false_negatives(
        queries,
        candidates,
        fn=fn,
        num_samples=num_samples,
        sample_offset=sample_offset,
        labels=labels,
        candidate_labels=candidate_labels,
        low_memory=low_memory,
        schedule=schedule,
        step=step,
    ).mask


def fn_metrics(
    fn_mask: Array,
    own: Array,
    labels: Array | None,
    candidate_labels: Array | None,
    axis_name: str | None,
    num_fn: Array | None = None,
) -> dict[str, Array]:
    """|F| per sample (`num_fn` when already counted) and, with labels, the global precision / recall."""
    num_fn = jnp.sum(fn_mask, axis=1) if num_fn is None else num_fn
    metrics = {"num_fn": num_fn, "mean_num_fn": global_mean(jnp.mean(num_fn.astype(jnp.float32)), axis_name)}
    if labels is None or candidate_labels is None:
        return metrics
    same = (labels[:, None] == candidate_labels[None, :]) & (candidate_labels[None, :] >= 0) & ~own
    true_fn = global_sum(jnp.sum(fn_mask & same), axis_name)
    selected = global_sum(jnp.sum(fn_mask), axis_name)
    same_total = global_sum(jnp.sum(same), axis_name)
    metrics.update(
        fn_true=true_fn,
        fn_selected=selected,
        fn_same_label=same_total,
        fn_precision=true_fn / jnp.maximum(selected, 1),
        fn_recall=true_fn / jnp.maximum(same_total, 1),
    )
    return metrics


def schedule_metrics(schedule: FNSchedule | None, step: Array | int, fn: FNConfig) -> dict[str, Array]:
    """The k and threshold a schedule has in force at `step` (empty without a schedule or a selection)."""
    if schedule is None or fn.mode == "none":
        return {}
    limits = schedule.limits(step, fn)
    return {"fn_topk": limits.topk, "fn_threshold": limits.threshold}
