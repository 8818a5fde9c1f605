"""The FNC loss: multi-view NT-Xent with false-negative attraction or elimination, in-batch and with a
memory queue of EMA features (method §3, §5-7).

Speed and memory: the denominator has a hand-written VJP over cache-sized tiles of the similarities
(objectives/denominator.py): by default (`low_memory=True`) the backward recomputes the tiles (4 matmul
passes, FN scores of the official defaults included; temporaries a few tiles and the (B, C) scores);
`low_memory=False` keeps them (3 passes; memory the V (B, C) blocks). In-batch on one device the
similarities are symmetric and each pair of tiles is computed once: about half of those passes.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from fnc_jax.objectives.denominator import denominator_lse
from fnc_jax.objectives.fn_config import FNConfig, FNSchedule
from fnc_jax.objectives.layout import (
    check_temperature,
    device_index_and_count,
    global_mean,
    in_batch_layout,
    own_columns,
    prepare_embeddings,
)
from fnc_jax.objectives.selection import Selection, false_negatives, fn_metrics, schedule_metrics

Array = jax.Array


def _own_similarities(anchors: Array, candidates: Array, num_samples: int, sample_offset: Array | int) -> Array:
    """(Va, B, Va) <anchor view a of sample i, its own view v>, from the gathered own rows v * N + g(i)."""
    num_views, batch, dim = anchors.shape
    own = jax.lax.dynamic_slice_in_dim(candidates.reshape(-1, num_samples, dim)[:num_views], sample_offset, batch, 1)
    return jnp.einsum("abd,vbd->abv", anchors, own)


def _target_sums(anchors: Array, candidates: Array, own: Array, selection: Selection | None) -> tuple[Array, Array]:
    """(Va, B) sums of the raw similarities over each anchor's targets, and the (B,) target counts.

    The targets are the anchor image's other views (`own`, v != a) and, with a selection (attraction),
    its false negatives, gathered rows: O(Va * B * (Va + k) * d), with a scatter for gradient (autodiff),
    never a (B, C) block.
    """
    num_views, batch, _ = anchors.shape
    sums = jnp.sum(jnp.where(jnp.eye(num_views, dtype=bool)[:, None, :], 0.0, own), axis=2)
    counts = jnp.full((batch,), num_views - 1, jnp.float32)
    if selection is None:
        return sums, counts
    if selection.top is not None:
        false_negatives = jnp.einsum("bk,bkd->bd", selection.keep.astype(jnp.float32), candidates[selection.top])
    else:
        false_negatives = selection.mask.astype(jnp.float32) @ candidates
    sums += jnp.einsum("abd,bd->ab", anchors, false_negatives)
    return sums, counts + selection.counts().astype(jnp.float32)


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
    schedule: FNSchedule | None,
    step: Array | int,
    scores_are_anchors: bool,
    in_batch: bool,
    unit_norm: bool,
) -> tuple[Array, dict[str, Array]]:
    """Shared core of the in-batch and memory losses, on already normalised float32 features.

    L_a(i) = LSE_{D(i)}(l) - mean_{T(i)}(l) (docs/method.md §3, §5): the denominator comes from
    `denominator` (hand-written VJP, block by block), the target mean from `_target_sums`.
    `scores_are_anchors`: the false-negative queries are the anchors themselves (and the score
    candidates the candidates), so with every view scoring, the scores are the loss's own similarities.
    `in_batch`: the candidates are the gathered anchors (they carry gradient; on one device they are
    the anchors' own rows), not a constant memory queue.
    `unit_norm`: anchors and candidates are l2-normalised (bounds the logits, see `denominator`).
    """
    num_views, batch = anchors.shape[:2]
    global_ids = sample_offset + jnp.arange(batch)
    own = own_columns(candidates.shape[0], num_samples, num_views, global_ids)
    # The official defaults score with the anchors' own cosines: take them from the loss's blocks (in
    # attraction only: elimination needs the mask before its denominator).
    reuse = (
        scores_are_anchors and fn.mode == "attraction" and fn.selection != "oracle" and fn.support_set == "all_views"
    )
    selection_args = dict(
        fn=fn,
        num_samples=num_samples,
        sample_offset=sample_offset,
        labels=labels,
        candidate_labels=candidate_labels,
        low_memory=low_memory,
        schedule=schedule,
        step=step,
    )
    selection = None
    if fn.mode != "none" and not reuse:
        selection = false_negatives(score_queries, score_candidates, **selection_args)
    own_s = _own_similarities(anchors, candidates, num_samples, sample_offset)
    # In-batch on one device the candidates are the anchors' own rows: the symmetric path.
    symmetric = in_batch and num_samples == batch
    lse, scores = denominator_lse(
        anchors,
        None if symmetric else candidates,
        temperature,
        own_s,
        num_samples=num_samples,
        global_ids=global_ids,
        drop=selection.mask if fn.mode == "elimination" else None,
        aggregation=fn.aggregation if reuse else None,
        grad_candidates=in_batch,
        store_blocks=not low_memory,
        unit_norm=unit_norm,
    )
    if reuse:
        selection = false_negatives(anchors, candidates, scores=scores, **selection_args)
    sums, counts = _target_sums(anchors, candidates, own_s, selection if fn.mode == "attraction" else None)
    losses = jnp.mean(lse - sums / (temperature * counts[None, :]), axis=1)
    # Sum of the per-view means, scaled by 2/V: SimCLR's two-direction sum at V = 2 (docs/method.md §3).
    loss = global_mean(jnp.sum(losses) * (2.0 / num_views), axis_name)
    fn_mask, num_fn = (jnp.zeros_like(own), None) if selection is None else (selection.mask, selection.counts())
    aux = fn_metrics(fn_mask, own, labels, candidate_labels, axis_name, num_fn) | schedule_metrics(schedule, step, fn)
    aux["fn_mask"] = fn_mask.reshape(batch, num_blocks, num_samples)
    return loss, aux


def fnc_loss(
    embeddings: Array,
    *,
    temperature: float = 0.1,
    hidden_norm: bool = True,
    fn: FNConfig = FNConfig(),
    axis_name: str | None = None,
    labels: Array | None = None,
    low_memory: bool = True,
    schedule: FNSchedule | None = None,
    step: Array | int = 0,
) -> tuple[Array, dict[str, Array]]:
    """In-batch multi-view contrastive loss with false negative cancellation (docs/method.md §3-6).

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
      low_memory: recompute the similarity tiles in the backward (4 matmul passes, temporaries a few
        tiles); False keeps the V (B, C) blocks instead (3 passes, V times the memory; module docstring).
      schedule: optional `FNSchedule`: no cancellation before its start, then its ramped k and threshold,
        evaluated at `step` (the training step, traced); None = the fixed selection of `fn`.
      step: the training step, for the schedule.

    Returns:
      `(loss, aux)`: the scalar loss (mean over devices of the per-device loss) and a dict with
      `fn_mask` `(B, V, N)` bool (candidate view, global sample; reshape to `(B, V*N)` for the
      official layout), `num_fn` `(B,)`, `mean_num_fn`, and with labels `fn_precision`,
      `fn_recall` and their integer counts `fn_true`, `fn_selected`, `fn_same_label`; with a schedule
      also `fn_topk` and `fn_threshold`, the selection in force.
    """
    check_temperature(temperature)
    layout = in_batch_layout(embeddings, hidden_norm, axis_name, labels, fn.support_as_positives)
    return _objective(
        layout.anchors,
        layout.candidates,
        layout.z,
        layout.candidates,
        num_samples=layout.num_samples,
        num_blocks=layout.anchors.shape[0],
        sample_offset=layout.sample_offset,
        temperature=temperature,
        fn=fn,
        labels=layout.labels,
        candidate_labels=layout.candidate_labels,
        axis_name=axis_name,
        low_memory=low_memory,
        schedule=schedule,
        step=step,
        scores_are_anchors=fn.support_as_positives,
        in_batch=True,
        unit_norm=hidden_norm,
    )


def update_memory(memory: Array, gathered: Array) -> Array:
    """Next memory queue (docs/method.md §7): the newest rows first, the oldest dropped.

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
    schedule: FNSchedule | None = None,
    step: Array | int = 0,
) -> tuple[Array, dict[str, Array]]:
    """Memory-bank + EMA-encoder variant of the FNC loss (docs/method.md §7, the official default path).

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
    check_temperature(temperature)
    z = prepare_embeddings(embeddings, hidden_norm)
    num_views, batch, _ = z.shape
    if ema_embeddings.shape != embeddings.shape:
        raise ValueError(f"ema_embeddings {ema_embeddings.shape} must have the shape of embeddings {embeddings.shape}.")
    device, num_devices = device_index_and_count(axis_name)
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
        schedule=schedule,
        step=step,
        scores_are_anchors=False,
        in_batch=False,
        unit_norm=False,
    )
