"""How well false negatives are identified by a given embedding, measured with labels.

The analysis mimics training: the N labelled samples are cut into consecutive global batches of
`batch_size` samples (an incomplete last batch is dropped, as training drops it), and each anchor looks
for false negatives among the V views of the samples of its own global batch (docs/method.md §4). A selected
column is a *true* false negative when its label equals the anchor's. Precision (the share of selected
columns that are true, the paper's "identification accuracy", ~40% on ImageNet) and recall (the share of
same-label columns that are selected) come from exact integer counts.

`embeddings` are `(V, N, d)` projection outputs of V views of N samples, view-major as in training;
they are l2-normalised here, so scores are cosines as with `hidden_norm`.
"""

import functools
import pathlib
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from matplotlib.figure import Figure

from fnc_jax.objectives import AGGREGATIONS, FNConfig, false_negative_mask, l2_normalize

DEFAULT_TOPKS = (1, 2, 5, 10, 20)
DEFAULT_THRESHOLDS = (0.5, 0.6, 0.7, 0.8, 0.9)
DEFAULT_AGGREGATIONS = ("max", "mean")

# count_fn(queries (V, A, d), candidates (V*bs, d), anchor labels (A,), candidate labels (V*bs,),
#          sample offset of the anchors in the global batch) -> pytree of integer counts.
CountFn = Callable[[jax.Array, jax.Array, jax.Array, jax.Array, jax.Array], dict[str, jax.Array]]


@functools.partial(jax.jit, static_argnames=("count_fn", "batch_size", "anchors"))
def _count_batch(embeddings, labels, start, offset, *, count_fn: CountFn, batch_size: int, anchors: int):
    num_views, _, dim = embeddings.shape
    views = jax.lax.dynamic_slice_in_dim(embeddings, start, batch_size, axis=1)
    views = l2_normalize(views.astype(jnp.float32))
    batch_labels = jax.lax.dynamic_slice_in_dim(labels, start, batch_size)
    candidates = views.reshape(num_views * batch_size, dim)  # column v * bs + i, as in training
    candidate_labels = jnp.tile(batch_labels, num_views)
    queries = jax.lax.dynamic_slice_in_dim(views, offset, anchors, axis=1)
    anchor_labels = jax.lax.dynamic_slice_in_dim(batch_labels, offset, anchors)
    return count_fn(queries, candidates, anchor_labels, candidate_labels, offset)


def _sum_over_batches(
    count_fn: CountFn,
    embeddings: jax.Array,
    labels: jax.Array,
    batch_size: int,
    anchor_batch_size: int | None,
) -> dict[str, np.ndarray]:
    """Runs `count_fn` on every anchor sub-batch of every global batch; totals as int64 on the host.

    One jitted step per sub-batch (`_count_batch`: the batch start and anchor offset are traced, and
    `count_fn` comes from a cached factory, so a repeated analysis compiles nothing new): each step's
    counts stay within int32 (at most A * V * batch_size) and the host sums them in int64.
    """
    num_views, num_samples, dim = embeddings.shape
    num_batches = num_samples // batch_size
    if num_batches == 0:
        raise ValueError(f"batch_size={batch_size} exceeds the {num_samples} samples to analyse.")
    anchors = batch_size if anchor_batch_size is None else anchor_batch_size
    if batch_size % anchors:
        raise ValueError(f"anchor_batch_size={anchors} must divide batch_size={batch_size}.")

    # Arguments, not closure constants: the data is placed on the device once, not baked into the HLO.
    embeddings, labels = jnp.asarray(embeddings), jnp.asarray(labels, jnp.int32)
    counts = [
        _count_batch(embeddings, labels, start, offset, count_fn=count_fn, batch_size=batch_size, anchors=anchors)
        for start in range(0, num_batches * batch_size, batch_size)
        for offset in range(0, batch_size, anchors)
    ]
    totals = {name: sum(np.asarray(c[name], np.int64) for c in counts) for name in counts[0]}
    return totals | {"num_anchors": np.int64(num_batches * batch_size)}


def _same_label_columns(
    anchor_labels: jax.Array, candidate_labels: jax.Array, offset: jax.Array, batch_size: int
) -> tuple[jax.Array, jax.Array]:
    """(own, same): the anchors' own columns, and the other columns sharing the anchor's label."""
    columns = jnp.arange(candidate_labels.shape[0])
    own = (columns % batch_size)[None, :] == (offset + jnp.arange(anchor_labels.shape[0]))[:, None]
    same = (anchor_labels[:, None] == candidate_labels[None, :]) & (candidate_labels[None, :] >= 0)
    return own, same & ~own


def _rates(num_true: int, num_selected: int, num_same: int, num_anchors: int) -> dict:
    return {
        "precision": float(num_true / num_selected) if num_selected else 0.0,
        "recall": float(num_true / num_same) if num_same else 0.0,
        "mean_num_fn": float(num_selected / num_anchors),
        "num_selected": int(num_selected),
        "num_true_fn": int(num_true),
        "num_same_label": int(num_same),
        "num_anchors": int(num_anchors),
    }


@functools.cache
def _selection_counter(fn: FNConfig, batch_size: int) -> CountFn:
    def count(queries, candidates, anchor_labels, candidate_labels, offset):
        mask = false_negative_mask(
            queries,
            candidates,
            fn=fn,
            num_samples=batch_size,
            sample_offset=offset,
            labels=anchor_labels,
            candidate_labels=candidate_labels,
        )
        _, same = _same_label_columns(anchor_labels, candidate_labels, offset, batch_size)
        return {"selected": jnp.sum(mask), "true": jnp.sum(mask & same), "same": jnp.sum(same)}

    return count


def identification_metrics(
    embeddings: jax.Array,
    labels: jax.Array,
    *,
    fn: FNConfig,
    batch_size: int,
    anchor_batch_size: int | None = None,
) -> dict:
    """Precision, recall and mean |F| of `false_negative_mask` with settings `fn`, over all batches.

    `anchor_batch_size` (a divisor of `batch_size`) scores that many anchors at a time against their
    global batch, bounding memory to (anchors, V * batch_size); the result does not depend on it.
    Returns floats `precision`, `recall`, `mean_num_fn` and the integer counts behind them.
    """
    c = _sum_over_batches(_selection_counter(fn, batch_size), embeddings, labels, batch_size, anchor_batch_size)
    return _rates(c["true"], c["selected"], c["same"], c["num_anchors"])


def sweep(
    embeddings: jax.Array,
    labels: jax.Array,
    *,
    batch_size: int,
    topks: Sequence[int] = DEFAULT_TOPKS,
    thresholds: Sequence[float] = DEFAULT_THRESHOLDS,
    aggregations: Sequence[str] = DEFAULT_AGGREGATIONS,
    support_sizes: Sequence[int] | None = None,
    anchor_batch_size: int | None = None,
) -> list[dict]:
    """Identification metrics over a grid of selection settings, one table row per setting.

    The grid is support size S x aggregation x (top-k in `topks`, or none) x (threshold in
    `thresholds`, or none): top-k and threshold give `topk_and_threshold`, either alone gives `topk` or
    `threshold`. Support size S uses the first 2 + S views (as a run with S support views would) and
    scores with all of them (`support_set='all_views'`); None = every even S up to V - 2, and V - 2.
    Each row names its settings and carries the fields of `identification_metrics`, with which it
    agrees exactly; one pass over the data per S serves every aggregation, k and threshold.
    """
    num_views = embeddings.shape[0]
    if support_sizes is None:
        support_sizes = sorted(set(range(0, num_views - 1, 2)) | {num_views - 2})
    if any(s < 0 or s > num_views - 2 for s in support_sizes):
        raise ValueError(f"support_sizes={support_sizes} must lie in [0, {num_views - 2}] for V={num_views} views.")
    topks, thresholds, aggregations = tuple(topks), tuple(thresholds), tuple(aggregations)
    for aggregation in aggregations:
        if aggregation not in AGGREGATIONS:
            raise ValueError(f"aggregation={aggregation!r} is invalid: allowed values are {AGGREGATIONS}.")
    rows = []
    for support_size in support_sizes:
        views = 2 + support_size
        counts = _sum_over_batches(
            _grid_counter(topks, thresholds, aggregations, views, batch_size),
            embeddings[:views],
            labels,
            batch_size,
            anchor_batch_size,
        )
        for ai, aggregation in enumerate(aggregations):
            for ki, topk in enumerate(topks + (None,)):
                for ti, threshold in enumerate(thresholds + (None,)):
                    if topk is None and threshold is None:
                        continue
                    selection = (
                        "topk_and_threshold"
                        if topk is not None and threshold is not None
                        else "topk"
                        if threshold is None
                        else "threshold"
                    )
                    rows.append(
                        {
                            "support_size": support_size,
                            "num_views": views,
                            "support_set": "all_views",
                            "aggregation": aggregation,
                            "selection": selection,
                            "topk": topk,
                            "threshold": threshold,
                            "batch_size": batch_size,
                            **_rates(
                                counts["true"][ai, ki, ti],
                                counts["selected"][ai, ki, ti],
                                counts["same"],
                                counts["num_anchors"],
                            ),
                        }
                    )
    return rows


@functools.cache
def _grid_counter(
    topks: tuple[int, ...],
    thresholds: tuple[float, ...],
    aggregations: tuple[str, ...],
    num_views: int,
    batch_size: int,
) -> CountFn:
    """Counts for every aggregation x (k or none) x (threshold or none) cell, one top-k per aggregation.

    Same rules as `false_negative_mask` (raw cosine, strict >, own columns excluded, k clamped to the
    non-own candidates, ties to the lower column via `jax.lax.top_k`): the top-k ∩ threshold set of
    k is the first k sorted columns that pass the threshold.
    """
    num_candidates = num_views * batch_size - num_views
    k_max = min(max(topks, default=0), num_candidates)

    def cells(masked: jax.Array, same: jax.Array) -> tuple[jax.Array, jax.Array]:
        top, idx = jax.lax.top_k(masked, k_max)
        top_same = jnp.take_along_axis(same, idx, axis=1)
        selected, true = [], []
        for topk in topks + (None,):
            scores = masked if topk is None else top[:, : min(topk, num_candidates)]
            is_same = same if topk is None else top_same[:, : min(topk, num_candidates)]
            for threshold in thresholds + (None,):
                if threshold is not None:
                    sel = scores > threshold
                else:  # top-k alone; the (none, none) cell is unused
                    sel = jnp.full(scores.shape, topk is not None)
                selected.append(jnp.sum(sel))
                true.append(jnp.sum(sel & is_same))
        shape = (len(topks) + 1, len(thresholds) + 1)
        return jnp.stack(selected).reshape(shape), jnp.stack(true).reshape(shape)

    def count(queries, candidates, anchor_labels, candidate_labels, offset):
        own, same = _same_label_columns(anchor_labels, candidate_labels, offset, batch_size)
        per_view = jnp.einsum("uad,cd->uac", queries, candidates)
        aggregated = {"max": per_view.max(0), "mean": per_view.mean(0)}
        selected, true = zip(*(cells(jnp.where(own, -jnp.inf, aggregated[a]), same) for a in aggregations))
        return {"selected": jnp.stack(selected), "true": jnp.stack(true), "same": jnp.sum(same)}

    return count


@functools.cache
def _histogram_counter(edges: tuple[float, ...], batch_size: int) -> CountFn:
    num_bins = len(edges) - 1

    def count(queries, candidates, anchor_labels, candidate_labels, offset):
        own, same = _same_label_columns(anchor_labels, candidate_labels, offset, batch_size)
        scores = jnp.einsum("uad,cd->uac", queries, candidates).max(0)
        bin_index = jnp.searchsorted(jnp.asarray(edges, jnp.float32), scores, side="right") - 1
        bin_index = jnp.clip(bin_index, 0, num_bins - 1)

        def histogram(columns: jax.Array) -> jax.Array:
            return jnp.zeros(num_bins, jnp.int32).at[bin_index].add(columns.astype(jnp.int32))

        return {"same_label": histogram(same), "different_label": histogram(~same & ~own)}

    return count


def similarity_histograms(
    embeddings: jax.Array,
    labels: jax.Array,
    *,
    batch_size: int,
    bins: int | Sequence[float] = 50,
    anchor_batch_size: int | None = None,
) -> dict[str, np.ndarray]:
    """Histograms of the max-over-views cosine score of same-label vs different-label candidates.

    The score is the official identification score (max over all V anchor views, own columns
    excluded), per candidate column of the anchor's global batch. Same-label columns are the true false
    negatives: the further their histogram sits above the different-label one, the better a threshold
    or top-k separates them. `bins`: a count of equal bins over [-1, 1], or increasing edges; scores
    outside the edges go to the end bins. Returns `bin_edges`, `same_label` and `different_label` counts.
    """
    edges = np.linspace(-1.0, 1.0, bins + 1) if isinstance(bins, int) else np.asarray(bins, np.float64)
    count = _histogram_counter(tuple(float(e) for e in edges), batch_size)
    counts = _sum_over_batches(count, embeddings, labels, batch_size, anchor_batch_size)
    return {
        "bin_edges": edges,
        "same_label": counts["same_label"],
        "different_label": counts["different_label"],
    }


def write_report(
    rows: Sequence[dict], histograms: dict[str, np.ndarray], out_dir: str | pathlib.Path
) -> list[pathlib.Path]:
    """PNG plots of a `sweep` table and of `similarity_histograms`; returns the written paths.

    One figure per support size: precision and recall vs k, one line per aggregation (line style) and
    threshold (colour; "none" = top-k only); precision is left out where nothing is selected. One
    figure overlays the two score distributions, each normalised to unit area since different-label
    columns outnumber same-label ones by far.
    """
    out_dir = pathlib.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    topk_rows = [r for r in rows if r["topk"] is not None]
    thresholds = sorted({r["threshold"] for r in topk_rows}, key=lambda t: (t is not None, t or 0.0))
    colours = {t: f"C{i}" for i, t in enumerate(thresholds)}
    aggregations = dict.fromkeys(r["aggregation"] for r in topk_rows)
    styles = dict(zip(aggregations, ("-", "--")))
    for support_size in sorted({r["support_size"] for r in topk_rows}):
        fig = Figure(figsize=(11, 4.2), layout="constrained")
        axes = fig.subplots(1, 2)
        for aggregation in styles:
            for threshold in thresholds:
                line = sorted(
                    (
                        r
                        for r in topk_rows
                        if r["support_size"] == support_size
                        and r["aggregation"] == aggregation
                        and r["threshold"] == threshold
                    ),
                    key=lambda r: r["topk"],
                )
                for ax, metric in zip(axes, ("precision", "recall")):
                    # Precision is undefined (0 in the table) where nothing is selected: not drawn.
                    points = [r for r in line if metric == "recall" or r["num_selected"]]
                    ax.plot(
                        [r["topk"] for r in points],
                        [r[metric] for r in points],
                        marker="o",
                        linestyle=styles[aggregation],
                        color=colours[threshold],
                        label=f"{aggregation}, θ={'none' if threshold is None else threshold}",
                    )
        ks = sorted({r["topk"] for r in topk_rows})
        for ax, metric in zip(axes, ("precision", "recall")):
            ax.set(
                xlabel="k (top-k columns)",
                ylabel=metric,
                xscale="symlog",
                ylim=(0, 1.02),
                title=f"FN identification {metric}, S={support_size} (V={support_size + 2})",
            )
            ax.set_xticks(ks, [str(k) for k in ks], minor=False)
            ax.minorticks_off()
            ax.grid(alpha=0.3)
        axes[1].legend(fontsize="small", ncol=2)
        paths.append(out_dir / f"fn_identification_S{support_size}.png")
        fig.savefig(paths[-1], dpi=100)

    edges = np.asarray(histograms["bin_edges"])
    fig = Figure(figsize=(6.5, 4.2), layout="constrained")
    ax = fig.subplots()
    for name, colour in (("different_label", "C0"), ("same_label", "C3")):
        counts = np.asarray(histograms[name], np.float64)
        density = counts / max(counts.sum(), 1) / np.diff(edges)
        ax.stairs(
            density,
            edges,
            fill=True,
            alpha=0.45,
            color=colour,
            label=f"{name.replace('_', ' ')} ({int(counts.sum())} columns)",
        )
    ax.set(
        xlabel="max-over-views cosine score",
        ylabel="density",
        title="Candidate scores: same label (true FN) vs different label",
    )
    ax.legend()
    paths.append(out_dir / "fn_similarity_histogram.png")
    fig.savefig(paths[-1], dpi=100)
    return paths
