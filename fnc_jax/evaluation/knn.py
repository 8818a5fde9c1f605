"""Weighted k-nearest-neighbour classification on frozen features (Wu et al. 2018; DINO protocol).

Each test feature votes with its k most cosine-similar train features, neighbour j weighing
exp(sim_j / T). The class score is the sum of the weights of the neighbours carrying that class and the
prediction is its argmax. Both the train pass and the device merge keep only a running top-k, so memory
is bounded by (test batch) x (train chunk) whatever the size of the train set (1.28M rows on ImageNet).

Ties follow `jax.lax.top_k`: on equal similarity the lower train row wins, so chunked, unchunked and
sharded runs pick exactly the same neighbours.
"""

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

DEFAULT_KS = (20, 200)
DEFAULT_TEMPERATURE = 0.07


def _l2_normalize(x: jnp.ndarray) -> jnp.ndarray:
    """Idempotent on normalised input, so callers may pass raw features too."""
    x = x.astype(jnp.float32)
    return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=-1, keepdims=True), 1e-12))


def _pad_rows(x: jnp.ndarray | np.ndarray, multiple: int) -> jnp.ndarray | np.ndarray:
    """Zero rows up to a multiple; host arrays stay on the host until they are placed on the mesh."""
    pad = -x.shape[0] % multiple
    if not pad:
        return x
    widths = [(0, pad)] + [(0, 0)] * (x.ndim - 1)
    return np.pad(x, widths) if isinstance(x, np.ndarray) else jnp.pad(x, widths)


def _top_neighbours(
    test_features: jnp.ndarray,
    train_features: jnp.ndarray,
    train_labels: jnp.ndarray,
    train_mask: jnp.ndarray,
    k: int,
    chunk_size: int | None,
) -> tuple[jnp.ndarray, jnp.ndarray]:
    """The k most similar train rows of each test row: (sims, labels), each (B, k), sorted descending.

    `k` must not exceed the number of train rows. Masked rows get similarity -inf, so they never
    outrank a real row and carry zero weight if k exceeds the number of real rows.
    """
    queries = _l2_normalize(test_features)
    num_train = train_features.shape[0]
    chunk = num_train if chunk_size is None else min(chunk_size, num_train)
    num_chunks = -(-num_train // chunk)

    def chunk_top(start):
        # Slicing (not padding) the train set avoids a copy of it. The last slice is shifted back to
        # stay in bounds; its rows below `start` were already seen and are masked out.
        begin = jnp.minimum(start, num_train - chunk)
        rows = begin + jnp.arange(chunk)
        valid = jax.lax.dynamic_slice_in_dim(train_mask, begin, chunk).astype(bool) & (rows >= start)
        keys = _l2_normalize(jax.lax.dynamic_slice_in_dim(train_features, begin, chunk))
        sims = jnp.where(valid[None, :], queries @ keys.T, -jnp.inf)
        top_sims, idx = jax.lax.top_k(sims, min(k, chunk))
        labels = jnp.where(valid, jax.lax.dynamic_slice_in_dim(train_labels, begin, chunk), 0)
        return top_sims, labels[idx]

    # Start from the first chunk (padded to k columns of -inf), so that the carry has the same
    # device-varying type as the scan's outputs when this runs under shard_map.
    top_sims, top_labels = chunk_top(0)
    pad = [(0, 0), (0, k - top_sims.shape[1])]
    top_sims = jnp.pad(top_sims, pad, constant_values=-jnp.inf)
    top_labels = jnp.pad(top_labels, pad)

    def merge(carry, start):
        # The running top-k holds lower train rows than the new chunk and comes first in the
        # concatenation, so top_k's lower-position tie-break keeps the global lower-row rule.
        run_sims, run_labels = carry
        new_sims, new_labels = chunk_top(start)
        sims, idx = jax.lax.top_k(jnp.concatenate([run_sims, new_sims], axis=1), k)
        labels = jnp.take_along_axis(jnp.concatenate([run_labels, new_labels], 1), idx, 1)
        return (sims, labels), None

    if num_chunks > 1:
        starts = chunk * jnp.arange(1, num_chunks)
        (top_sims, top_labels), _ = jax.lax.scan(merge, (top_sims, top_labels), starts)
    return top_sims, top_labels


def _vote(sims: jnp.ndarray, labels: jnp.ndarray, *, num_classes: int, temperature: float) -> jnp.ndarray:
    """Class scores (B, num_classes): per class, the sum of exp(sim / T) over the given neighbours."""
    weights = jnp.exp(sims / temperature)  # exp(-inf) = 0 for masked neighbours
    rows = jnp.arange(sims.shape[0])[:, None]
    return jnp.zeros((sims.shape[0], num_classes), jnp.float32).at[rows, labels].add(weights)


@functools.partial(jax.jit, static_argnames=("num_classes", "k", "temperature", "train_chunk_size"))
def knn_predict_scores(
    test_features: jnp.ndarray,
    train_features: jnp.ndarray,
    train_labels: jnp.ndarray,
    *,
    num_classes: int,
    k: int,
    temperature: float = DEFAULT_TEMPERATURE,
    train_chunk_size: int | None = None,
    train_mask: jnp.ndarray | None = None,
) -> jnp.ndarray:
    """Weighted-kNN class scores (B_test, num_classes); the prediction is their argmax.

    `train_chunk_size` bounds the similarity block to (B_test, chunk); `k` is clamped to the number of
    train rows; rows with `train_mask` False are never neighbours.
    """
    if train_mask is None:
        train_mask = jnp.ones(train_features.shape[0], bool)
    k = min(k, train_features.shape[0])
    sims, labels = _top_neighbours(test_features, train_features, train_labels, train_mask, k, train_chunk_size)
    return _vote(sims, labels, num_classes=num_classes, temperature=temperature)


def _correct_counts(
    sims: jnp.ndarray,
    labels: jnp.ndarray,
    test_labels: jnp.ndarray,
    test_mask: jnp.ndarray,
    *,
    ks: Sequence[int],
    num_classes: int,
    temperature: float,
) -> jnp.ndarray:
    """(len(ks), 2) counts of correct top-1 and top-5 predictions among unmasked test rows.

    `sims` / `labels` hold the max(ks) nearest neighbours sorted descending, so the top-k of any
    smaller k is their first k columns: one train pass serves every k.
    """
    counts = []
    for k in ks:
        scores = _vote(sims[:, :k], labels[:, :k], num_classes=num_classes, temperature=temperature)
        top1 = jnp.argmax(scores, axis=1) == test_labels
        _, top5_idx = jax.lax.top_k(scores, min(5, num_classes))
        top5 = jnp.any(top5_idx == test_labels[:, None], axis=1)
        counts.append(jnp.stack([jnp.sum(top1 & test_mask), jnp.sum(top5 & test_mask)]))
    return jnp.stack(counts)


@functools.cache
def _correct_counter(
    num_classes: int,
    ks: tuple[int, ...],
    k_local: int,
    k_max: int,
    temperature: float,
    train_chunk_size: int | None,
    mesh: Mesh | None,
    axis_name: str,
):
    """The jitted count of correct top-1 / top-5 votes per k over all test batches (cached per setting,
    so the splits and encoders of one report share a compiled program)."""

    def count_all(test_f, test_l, test_m, train_f, train_l, train_m):
        def one_batch(batch):
            feats, labels, mask = batch
            mask = mask.astype(bool)
            sims, nbr_labels = _top_neighbours(feats, train_f, train_l, train_m, k_local, train_chunk_size)
            if mesh is not None:
                # (R, B, k_local) -> (B, R * k_local): device-major, so ties keep the lower row.
                sims, nbr_labels = (
                    jnp.moveaxis(jax.lax.all_gather(x, axis_name, to="invarying"), 0, 1).reshape(x.shape[0], -1)
                    for x in (sims, nbr_labels)
                )
                sims, idx = jax.lax.top_k(sims, k_max)
                nbr_labels = jnp.take_along_axis(nbr_labels, idx, axis=1)
            counts = _correct_counts(
                sims,
                nbr_labels,
                labels,
                mask,
                ks=[min(k, k_max) for k in ks],
                num_classes=num_classes,
                temperature=temperature,
            )
            return counts, jnp.sum(mask)

        counts, num_valid = jax.lax.map(one_batch, (test_f, test_l, test_m))
        return jnp.sum(counts, axis=0), jnp.sum(num_valid)

    if mesh is not None:
        count_all = jax.shard_map(count_all, mesh=mesh, in_specs=(P(),) * 3 + (P(axis_name),) * 3, out_specs=(P(), P()))
    return jax.jit(count_all)


def knn_evaluate(
    test_features: jnp.ndarray,
    test_labels: jnp.ndarray,
    train_features: jnp.ndarray,
    train_labels: jnp.ndarray,
    *,
    test_mask: jnp.ndarray | None = None,
    train_mask: jnp.ndarray | None = None,
    num_classes: int,
    ks: Sequence[int] = DEFAULT_KS,
    temperature: float = DEFAULT_TEMPERATURE,
    mesh: Mesh | None = None,
    axis_name: str = "data",
    batch_size: int = 256,
    train_chunk_size: int | None = 65536,
) -> dict[str, float]:
    """Weighted-kNN accuracy as fractions in [0, 1]: {'knn_top1_k20': ..., 'knn_top5_k20': ..., ...}.

    Test rows are processed `batch_size` at a time (replicated). With a `mesh`, the train rows are
    sharded over `axis_name`: each device takes the top-k of its own rows, in chunks of
    `train_chunk_size`, and the per-device top-k are all-gathered and merged into the top-k of the
    union. Device r holds the r-th block of rows, so the merge keeps the lower-row tie-break and the
    result equals the single-device one. Masks (None = all valid) mark padding: masked train rows are
    never neighbours and masked test rows are not counted. Inputs are host arrays (on a multi-host mesh,
    every process passes the full arrays) or global `jax.Array`s (placed here unless already placed).
    """
    if test_mask is None:
        test_mask = np.ones(test_features.shape[0], bool)
    if train_mask is None:
        train_mask = np.ones(train_features.shape[0], bool)
    ks = tuple(ks)
    num_shards = 1 if mesh is None else mesh.shape[axis_name]
    train_features, train_labels, train_mask = (
        _pad_rows(x, num_shards) for x in (train_features, train_labels, train_mask)
    )
    local_rows = train_features.shape[0] // num_shards
    k_local = min(max(ks), local_rows)
    k_max = min(max(ks), num_shards * k_local)
    num_test = test_features.shape[0]
    test_batch = min(batch_size, num_test)
    test = [_pad_rows(x, test_batch) for x in (test_features, test_labels, test_mask)]
    test = [x.reshape((-1, test_batch) + x.shape[1:]) for x in test]

    if mesh is not None:
        replicated, rows = NamedSharding(mesh, P()), NamedSharding(mesh, P(axis_name))
        test = [jax.device_put(x, replicated) for x in test]
        train = [jax.device_put(x, rows) for x in (train_features, train_labels, train_mask)]
    else:
        train = [train_features, train_labels, train_mask]
    count_all = _correct_counter(num_classes, ks, k_local, k_max, temperature, train_chunk_size, mesh, axis_name)
    counts, num_valid = count_all(*test, *train)
    counts, num_valid = np.asarray(counts), max(int(num_valid), 1)
    metrics = {}
    for k, (top1, top5) in zip(ks, counts):
        metrics[f"knn_top1_k{k}"] = float(top1) / num_valid
        metrics[f"knn_top5_k{k}"] = float(top5) / num_valid
    return metrics
