"""Weighted kNN: exact agreement with a brute-force NumPy reference, chunked, sharded and padded."""

import jax
import numpy as np
import pytest
from jax.sharding import Mesh

from fnc_jax.evaluation import knn

NUM_CLASSES = 8
T = 0.07


def clustered(rng: np.random.Generator, n: int, centres: np.ndarray, noise: float = 0.9):
    labels = rng.integers(0, len(centres), n)
    feats = centres[labels] + noise * rng.normal(size=(n, centres.shape[1]))
    return feats.astype(np.float32), labels.astype(np.int32)


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(NUM_CLASSES, 16))
    train_x, train_y = clustered(rng, 301, centres)
    test_x, test_y = clustered(rng, 37, centres)
    return train_x, train_y, test_x, test_y


def numpy_scores(test_x, train_x, train_y, k, train_mask=None):
    """Brute force in float64: stable sort, so equal similarities keep the lower train row."""
    test_x = test_x / np.linalg.norm(test_x, axis=1, keepdims=True)
    train_x = train_x / np.linalg.norm(train_x, axis=1, keepdims=True)
    sims = test_x.astype(np.float64) @ train_x.T.astype(np.float64)
    if train_mask is not None:
        sims, train_y = sims[:, train_mask], train_y[train_mask]
    order = np.argsort(-sims, axis=1, kind="stable")[:, :k]
    scores = np.zeros((len(test_x), NUM_CLASSES))
    for i, row in enumerate(order):
        np.add.at(scores[i], train_y[row], np.exp(sims[i, row] / T))
    return scores


def numpy_accuracy(test_x, test_y, train_x, train_y, k):
    scores = numpy_scores(test_x, train_x, train_y, k)
    top5 = np.argsort(-scores, axis=1, kind="stable")[:, :5]
    return np.mean(scores.argmax(1) == test_y), np.mean(np.any(top5 == test_y[:, None], axis=1))


@pytest.mark.parametrize("k", [1, 20])
def test_scores_match_bruteforce(data, k):
    train_x, train_y, test_x, _ = data
    got = np.asarray(knn.knn_predict_scores(test_x, train_x, train_y, num_classes=NUM_CLASSES, k=k))
    want = numpy_scores(test_x, train_x, train_y, k)
    np.testing.assert_array_equal(got.argmax(1), want.argmax(1))
    np.testing.assert_allclose(got, want, rtol=1e-4)


def test_chunked_equals_unchunked(data):
    train_x, train_y, test_x, _ = data
    kwargs = dict(num_classes=NUM_CLASSES, k=20)
    full = np.asarray(knn.knn_predict_scores(test_x, train_x, train_y, **kwargs))
    for chunk in (7, 64):  # 64 does not divide 301: the last chunk overlaps and masks seen rows
        chunked = knn.knn_predict_scores(test_x, train_x, train_y, train_chunk_size=chunk, **kwargs)
        np.testing.assert_array_equal(np.asarray(chunked).argmax(1), full.argmax(1))
        np.testing.assert_allclose(np.asarray(chunked), full, rtol=1e-5)  # matmul blocking differs


def test_ties_keep_lower_row_across_chunks():
    # Row 5 + j duplicates row j with another label: with k = 1 the lower row must win, whether or
    # not the duplicate lies in another chunk.
    rng = np.random.default_rng(1)
    base = rng.normal(size=(5, 4)).astype(np.float32)
    train_x = np.concatenate([base, base])
    train_y = np.array([0, 1, 2, 3, 4, 5, 6, 7, 5, 6], np.int32)
    for chunk in (None, 3):
        scores = knn.knn_predict_scores(base, train_x, train_y, num_classes=NUM_CLASSES, k=1, train_chunk_size=chunk)
        np.testing.assert_array_equal(np.asarray(scores).argmax(1), np.arange(5))


def test_k_larger_than_train_is_clamped(data):
    train_x, train_y, test_x, test_y = data
    small_x, small_y = train_x[:30], train_y[:30]
    big = knn.knn_predict_scores(test_x, small_x, small_y, num_classes=NUM_CLASSES, k=1000)
    np.testing.assert_allclose(np.asarray(big), numpy_scores(test_x, small_x, small_y, 30), rtol=1e-4)
    mesh = Mesh(np.array(jax.devices()), ("data",))
    metrics = knn.knn_evaluate(
        test_x,
        test_y,
        small_x,
        small_y,
        num_classes=NUM_CLASSES,
        ks=(200,),
        mesh=mesh,
        batch_size=16,
    )
    top1, top5 = numpy_accuracy(test_x, test_y, small_x, small_y, 30)
    assert metrics == pytest.approx({"knn_top1_k200": top1, "knn_top5_k200": top5})


def test_evaluate_sharded_equals_single_device_and_bruteforce(data):
    train_x, train_y, test_x, test_y = data
    assert len(jax.devices()) == 8 and len(train_x) % 8 and len(test_x) % 16  # padding exercised
    kwargs = dict(num_classes=NUM_CLASSES, ks=(1, 5, 20), batch_size=16, train_chunk_size=16)
    single = knn.knn_evaluate(test_x, test_y, train_x, train_y, **kwargs)
    mesh = Mesh(np.array(jax.devices()).reshape(8), ("data",))
    sharded = knn.knn_evaluate(test_x, test_y, train_x, train_y, mesh=mesh, **kwargs)
    assert sharded == single
    want = {}
    for k in (1, 5, 20):
        want[f"knn_top1_k{k}"], want[f"knn_top5_k{k}"] = numpy_accuracy(test_x, test_y, train_x, train_y, k)
    assert single == pytest.approx(want)
    assert 0.3 < single["knn_top1_k20"] < 1.0  # the clusters overlap: a non-trivial task


def test_masked_rows_are_ignored(data):
    train_x, train_y, test_x, test_y = data
    # Decoy train rows identical to the test points with wrong labels would win every vote if they
    # were neighbours; extra test rows carrying wrong labels would lower the accuracy if counted.
    decoy_y = ((test_y + 1) % NUM_CLASSES).astype(np.int32)
    padded_train_x = np.concatenate([train_x, test_x])
    padded_train_y = np.concatenate([train_y, decoy_y])
    train_mask = np.arange(len(padded_train_x)) < len(train_x)
    padded_test_x = np.concatenate([test_x, train_x[:11]])
    padded_test_y = np.concatenate([test_y, (train_y[:11] + 1) % NUM_CLASSES])
    test_mask = np.arange(len(padded_test_x)) < len(test_x)

    scores = knn.knn_predict_scores(
        test_x,
        padded_train_x,
        padded_train_y,
        num_classes=NUM_CLASSES,
        k=10,
        train_chunk_size=64,
        train_mask=train_mask,
    )
    np.testing.assert_allclose(np.asarray(scores), numpy_scores(test_x, train_x, train_y, 10), rtol=1e-4)
    mesh = Mesh(np.array(jax.devices()), ("data",))
    padded = knn.knn_evaluate(
        padded_test_x,
        padded_test_y,
        padded_train_x,
        padded_train_y,
        test_mask=test_mask,
        train_mask=train_mask,
        num_classes=NUM_CLASSES,
        ks=(10,),
        mesh=mesh,
        batch_size=16,
    )
    top1, top5 = numpy_accuracy(test_x, test_y, train_x, train_y, 10)
    assert padded == pytest.approx({"knn_top1_k10": top1, "knn_top5_k10": top5})
