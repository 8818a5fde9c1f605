"""False-negative identification analysis: exact counts against hand computation and NumPy."""

import itertools

import matplotlib.image
import numpy as np
import pytest

from fnc_jax.evaluation import fn_analysis
from fnc_jax.objectives import FNConfig


def hand_built():
    """Two global batches of 4 samples (V = 2, 2-D features at the given angles), plus 3 leftovers.

    Batch 1, labels [0, 0, 1, 2]: views at (0, 4), (10, 14), (90, 94), (100, 104) degrees. Each
    anchor's best column is its angular neighbour's nearest view (6 degrees away, cos 0.9945), the
    neighbour's other view comes next (10 degrees, cos 0.985), everything else is >= 76 degrees away.
    The pairs (0, 1) share a label, the pair (2, 3) does not. Batch 2 repeats the features with labels
    [5, 5, 6, 6], so both pairs share a label there; features identical across batches would be
    selected with cos 1 if candidates leaked between global batches. The 3 leftover samples (an
    incomplete batch, dropped) copy sample 0.
    """
    degrees = np.array([[0, 10, 90, 100], [4, 14, 94, 104]], np.float64)  # (V, 4)
    degrees = np.concatenate([degrees, degrees, degrees[:, :1].repeat(3, 1)], axis=1)  # (2, 11)
    radians = np.deg2rad(degrees)
    scale = np.array([1.0, 3.0])[:, None, None]  # unnormalised input
    embeddings = (scale * np.stack([np.cos(radians), np.sin(radians)], -1)).astype(np.float32)
    labels = np.array([0, 0, 1, 2, 5, 5, 6, 6, 0, 0, 0], np.int32)
    return embeddings, labels


HAND_CASES = [
    # (fn, selected, true false negatives); 12 same-label columns in the two batches.
    (FNConfig(selection="topk", topk=1), 8, 6),
    (FNConfig(selection="topk", topk=2, aggregation="mean"), 16, 12),
    (FNConfig(selection="threshold", threshold=0.9), 16, 12),
    (FNConfig(selection="topk_and_threshold", topk=10, threshold=0.99), 8, 6),
    (FNConfig(selection="oracle"), 12, 12),
]


@pytest.mark.parametrize("fn,selected,true", HAND_CASES)
def test_identification_metrics_hand_built(fn, selected, true):
    embeddings, labels = hand_built()
    got = fn_analysis.identification_metrics(embeddings, labels, fn=fn, batch_size=4)
    assert got == {
        "precision": true / selected,
        "recall": true / 12,
        "mean_num_fn": selected / 8,
        "num_selected": selected,
        "num_true_fn": true,
        "num_same_label": 12,
        "num_anchors": 8,
    }
    if fn.selection == "oracle":
        assert got["precision"] == got["recall"] == 1.0


def test_anchor_sub_batches_use_sample_offset():
    embeddings, labels = hand_built()
    fn = FNConfig(selection="topk", topk=2)
    whole = fn_analysis.identification_metrics(embeddings, labels, fn=fn, batch_size=4)
    for anchor_batch_size in (1, 2):
        split = fn_analysis.identification_metrics(
            embeddings, labels, fn=fn, batch_size=4, anchor_batch_size=anchor_batch_size
        )
        assert split == whole


def numpy_counts(embeddings, labels, batch_size, *, aggregation="max", support_only=False, topk=None, threshold=None):
    """Direct count over global batches: (selected, true false negatives, same-label columns)."""
    emb = embeddings.astype(np.float64)
    emb /= np.linalg.norm(emb, axis=-1, keepdims=True)
    num_views = emb.shape[0]
    selected = true = same_total = 0
    for start in range(0, emb.shape[1] - batch_size + 1, batch_size):
        views = emb[:, start : start + batch_size]
        batch_labels = labels[start : start + batch_size]
        candidates = views.reshape(num_views * batch_size, -1)
        candidate_labels = np.tile(batch_labels, num_views)
        for i in range(batch_size):
            queries = views[2:, i] if support_only else views[:, i]
            per_view = queries @ candidates.T
            scores = per_view.max(0) if aggregation == "max" else per_view.mean(0)
            others = np.flatnonzero(np.arange(len(candidates)) % batch_size != i)
            chosen = others
            if topk is not None:  # stable: on equal scores the lower column comes first
                chosen = others[np.argsort(-scores[others], kind="stable")[:topk]]
            if threshold is not None:
                chosen = chosen[scores[chosen] > threshold]
            same = candidate_labels == batch_labels[i]
            selected += len(chosen)
            true += int(same[chosen].sum())
            same_total += int(same[others].sum())
    return selected, true, same_total


@pytest.fixture(scope="module")
def random_data():
    rng = np.random.default_rng(0)
    num_views, num_samples = 4, 27  # 3 global batches of 8, 3 leftovers
    labels = rng.integers(0, 3, num_samples).astype(np.int32)
    centres = rng.normal(size=(3, 6))
    embeddings = centres[labels] + 0.8 * rng.normal(size=(num_views, num_samples, 6))
    return embeddings.astype(np.float32), labels


@pytest.mark.parametrize(
    "fn",
    [
        FNConfig(),
        FNConfig(aggregation="mean", selection="topk", topk=3),
        FNConfig(support_set="support_only", selection="topk_and_threshold", topk=5, threshold=0.5),
        FNConfig(selection="threshold", threshold=0.6),
    ],
)
def test_identification_metrics_match_numpy(random_data, fn):
    embeddings, labels = random_data
    got = fn_analysis.identification_metrics(embeddings, labels, fn=fn, batch_size=8)
    selected, true, same = numpy_counts(
        embeddings,
        labels,
        8,
        aggregation=fn.aggregation,
        support_only=fn.support_set == "support_only",
        topk=fn.topk if fn.uses_topk else None,
        threshold=fn.threshold if fn.uses_threshold else None,
    )
    assert (got["num_selected"], got["num_true_fn"], got["num_same_label"]) == (selected, true, same)
    assert got["num_anchors"] == 24 and 0 < got["precision"] < 1 and 0 < got["recall"] < 1


SWEEP = dict(topks=(1, 3, 100), thresholds=(0.2, 0.6), aggregations=("max", "mean"), support_sizes=(0, 2))


@pytest.fixture(scope="module")
def sweep_rows(random_data):
    return fn_analysis.sweep(*random_data, batch_size=8, anchor_batch_size=4, **SWEEP)


def test_sweep_rows_name_settings_and_match_numpy(random_data, sweep_rows):
    embeddings, labels = random_data
    expected = {
        (s, a, k, t)
        for s, a, k, t in itertools.product((0, 2), ("max", "mean"), (1, 3, 100, None), (0.2, 0.6, None))
        if (k, t) != (None, None)
    }
    assert len(sweep_rows) == len(expected)
    assert {(r["support_size"], r["aggregation"], r["topk"], r["threshold"]) for r in sweep_rows} == expected
    for row in sweep_rows:
        assert row["num_views"] == 2 + row["support_size"] and row["batch_size"] == 8
        assert (
            row["selection"]
            == {(True, True): "topk_and_threshold", (True, False): "topk", (False, True): "threshold"}[
                (row["topk"] is not None, row["threshold"] is not None)
            ]
        )
        selected, true, same = numpy_counts(
            embeddings[: row["num_views"]],
            labels,
            8,
            aggregation=row["aggregation"],
            topk=row["topk"],
            threshold=row["threshold"],
        )
        assert (row["num_selected"], row["num_true_fn"], row["num_same_label"]) == (selected, true, same)


def test_sweep_row_equals_identification_metrics(random_data, sweep_rows):
    embeddings, labels = random_data
    row = next(
        r for r in sweep_rows if (r["support_size"], r["aggregation"], r["topk"], r["threshold"]) == (2, "mean", 3, 0.2)
    )
    metrics = fn_analysis.identification_metrics(
        embeddings,
        labels,
        batch_size=8,
        fn=FNConfig(aggregation="mean", selection="topk_and_threshold", topk=3, threshold=0.2),
    )
    assert {k: row[k] for k in metrics} == metrics


@pytest.fixture(scope="module")
def histograms(random_data):
    return fn_analysis.similarity_histograms(*random_data, batch_size=8, bins=20)


@pytest.mark.parametrize("bins", [20, (-1.0, 0.0, 0.5, 0.9, 1.0)])
def test_similarity_histograms_match_numpy(random_data, histograms, bins):
    embeddings, labels = random_data
    got = (
        histograms
        if bins == 20
        else fn_analysis.similarity_histograms(embeddings, labels, batch_size=8, bins=bins, anchor_batch_size=2)
    )
    emb = embeddings / np.linalg.norm(embeddings, axis=-1, keepdims=True)
    same_scores, other_scores = [], []
    for start in range(0, 24, 8):
        views, batch_labels = emb[:, start : start + 8], labels[start : start + 8]
        candidates, candidate_labels = views.reshape(-1, emb.shape[-1]), np.tile(batch_labels, 4)
        for i in range(8):
            scores = (views[:, i] @ candidates.T).max(0)
            not_own = np.arange(32) % 8 != i
            same = candidate_labels == batch_labels[i]
            same_scores += list(scores[not_own & same])
            other_scores += list(scores[not_own & ~same])
    edges = np.linspace(-1, 1, 21) if bins == 20 else np.asarray(bins)
    np.testing.assert_allclose(got["bin_edges"], edges)
    np.testing.assert_array_equal(got["same_label"], np.histogram(same_scores, edges)[0])
    np.testing.assert_array_equal(got["different_label"], np.histogram(other_scores, edges)[0])


def test_write_report_writes_valid_pngs(sweep_rows, histograms, tmp_path):
    paths = fn_analysis.write_report(sweep_rows, histograms, tmp_path / "report")
    assert [p.name for p in paths] == [
        "fn_identification_S0.png",
        "fn_identification_S2.png",
        "fn_similarity_histogram.png",
    ]
    for path in paths:
        data = path.read_bytes()
        assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 5000
        image = matplotlib.image.imread(path)
        assert image.ndim == 3 and min(image.shape[:2]) > 200 and image.std() > 0


def test_invalid_settings_are_rejected(random_data):
    embeddings, labels = random_data
    with pytest.raises(ValueError, match="support_sizes"):
        fn_analysis.sweep(embeddings, labels, batch_size=8, support_sizes=(3,))
    with pytest.raises(ValueError, match="batch_size"):
        fn_analysis.identification_metrics(embeddings, labels, fn=FNConfig(), batch_size=64)
    with pytest.raises(ValueError, match="anchor_batch_size"):
        fn_analysis.identification_metrics(embeddings, labels, fn=FNConfig(), batch_size=8, anchor_batch_size=3)
