"""Frozen-network outputs over a whole split: pooled features / projections (kNN), and the projections of
V pretraining-style views per image (false-negative analysis).

The jitted forward passes take the Flax module as a static argument, so every call with the same
network and batch shape reuses one compiled program (train and test splits, sweep points, tests).
BatchNorm runs in inference mode (moving statistics) throughout.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Iterator

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.experimental import multihost_utils

from fnc_jax import console, errors, parallel
from fnc_jax.data import augment_jax, pipeline

OUTPUTS = ("features", "projection")


@functools.partial(jax.jit, static_argnames=("model", "output"))
def _forward(model, variables, images, output: str):
    return model.apply(variables, images, train=False)[output].astype(jnp.float32)


@functools.partial(jax.jit, static_argnames=("model", "augment"))
def _view_projections(model, variables, batch, key, augment: augment_jax.ViewAugment):
    """Host batch of V views per image → device augmentation per view tensor → (B, V, d) projections."""
    images = augment_jax.augment_views(batch, key, augment)
    b, v = images.shape[:2]
    out = model.apply(variables, images.reshape(b * v, *images.shape[2:]), train=False)
    return out["projection"].astype(jnp.float32).reshape(b, v, -1)


def _gather(tree) -> dict[str, np.ndarray]:
    """Global (sharded) arrays → full numpy arrays on every process."""
    if jax.process_count() > 1:
        return jax.tree.map(np.asarray, multihost_utils.process_allgather(tree, tiled=True))
    return jax.tree.map(np.asarray, tree)


class _Meter:
    """A progress line every `every` batches: images/s and ETA of a pass."""

    def __init__(self, what: str, total: int | None, batch_size: int, every: int = 50):
        self.what, self.total, self.batch_size, self.every = what, total, batch_size, every
        self.start = time.time()

    def tick(self, done: int, *, final: bool = False) -> None:
        if done % self.every and done != self.total and not final:
            return
        elapsed = max(time.time() - self.start, 1e-9)
        rate = done * self.batch_size / elapsed
        eta = (
            ""
            if self.total is None
            else f" | ETA {time.strftime('%H:%M:%S', time.gmtime((self.total - done) * elapsed / done))}"
        )
        line = f"{self.what}: batch {done}{'' if self.total is None else f'/{self.total}'} | {rate:.1f} img/s{eta}"
        console.say(line)


def extract(
    model,
    variables: dict,
    config: ml_collections.ConfigDict,
    split: str,
    mesh: jax.sharding.Mesh,
    *,
    batch_size: int,
    output: str = "features",
) -> tuple[np.ndarray, np.ndarray]:
    """(outputs float32 (N, F), labels int32 (N,)) for every real example of `split`, in split order.

    `model` is a `ContrastiveModel`; `output` its 'features' (pooled encoder) or 'projection'. Images
    get the evaluation preprocessing (§7); `batch_size` is global. Every process returns everything.
    """
    if output not in OUTPUTS:
        raise ValueError(f"output={output!r} is invalid: allowed values are {', '.join(OUTPUTS)}.")
    batches = pipeline.eval_iterator(
        config, split=split, process_index=jax.process_index(), process_count=jax.process_count(), batch_size=batch_size
    )
    meter = _Meter(f"{output} of {split!r}", None, batch_size)
    outs, labels, masks = [], [], []
    i = 0
    for i, host in enumerate(batches, 1):
        batch = parallel.global_batch(host, mesh)
        got = _gather(
            {"x": _forward(model, variables, batch["images"], output), "y": batch["labels"], "m": batch["mask"]}
        )
        outs.append(got["x"])
        labels.append(got["y"])
        masks.append(got["m"])
        meter.tick(i)
    if i % meter.every:
        meter.tick(i, final=True)
    if not outs:
        raise errors.ConfigError(f"split {split!r} of config.data ({config.data.name}) has no examples.")
    keep = np.concatenate(masks) > 0
    return np.concatenate(outs)[keep], np.concatenate(labels)[keep].astype(np.int32)


def extract_train_and_eval(
    model, variables: dict, config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh, *, output: str = "features"
) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """`extract` of `config.data.train_split` and of `config.data.eval_split` (batches of `eval.batch_size`):
    what every frozen-feature evaluation (kNN, the linear probe) compares."""
    bs = config.eval.batch_size
    return tuple(  # type: ignore[return-value]
        extract(model, variables, config, split, mesh, batch_size=bs, output=output)
        for split in (config.data.train_split, config.data.eval_split)
    )


def view_batches(
    config: ml_collections.ConfigDict, *, split: str, num_views: int, batch_size: int
) -> Iterator[dict[str, np.ndarray]]:
    """This process's endless stream of V pretraining views per image of `split` (host part).

    The pretraining input pipeline itself (`pipeline.pretrain_iterator`: shuffled with `config.seed`,
    `augment.pretrain_view` with `config.augment`), pointed at `split`, V = `num_views`.
    """
    view_config = config.copy_and_resolve_references()
    with view_config.unlocked():
        view_config.batch_size = batch_size
        view_config.data.train_split = split
        view_config.views = ml_collections.ConfigDict({"support_size": num_views - 2})
    return pipeline.pretrain_iterator(view_config, process_index=jax.process_index(), process_count=jax.process_count())


def view_projections(
    model,
    variables: dict,
    config: ml_collections.ConfigDict,
    mesh: jax.sharding.Mesh,
    *,
    split: str,
    num_views: int,
    num_examples: int,
    batch_size: int,
) -> tuple[np.ndarray, np.ndarray]:
    """(projections float32 (V, N, d) view-major, labels (N,)) of the first `num_examples` shuffled images.

    Views are the pretraining views: the host pipeline (`view_batches`) then the device blur (and
    colour with `augment.on_device`) exactly as in the train step, keyed by `config.seed` and the batch
    index. `num_examples` must be a multiple of the global `batch_size` and at most the process count
    times the smallest shard, so that every image appears once.
    """
    if num_examples % batch_size:
        raise ValueError(f"num_examples={num_examples} must be a multiple of batch_size={batch_size}.")
    augment = augment_jax.ViewAugment.from_config(config, mesh.size)
    key = jax.random.PRNGKey(config.seed)
    num_batches = num_examples // batch_size
    stream = view_batches(config, split=split, num_views=num_views, batch_size=batch_size)
    meter = _Meter(f"{num_views} views of {split!r}", num_batches, batch_size, every=20)
    outs, labels = [], []
    for i in range(num_batches):
        batch = parallel.global_batch(next(stream), mesh)
        z = _view_projections(model, variables, batch, jax.random.fold_in(key, i), augment)
        got = _gather({"z": z, "y": batch["labels"]})
        outs.append(got["z"])
        labels.append(got["y"])
        meter.tick(i + 1)
    return np.swapaxes(np.concatenate(outs), 0, 1), np.concatenate(labels).astype(np.int32)
