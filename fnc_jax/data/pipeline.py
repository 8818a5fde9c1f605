"""Input pipelines: host-local numpy batches, a pure function of (seed, step).

Exact resume is the design goal: a run restarted at step s must see exactly the batches, and the
augmentations, of a run that was never interrupted. So nothing here depends on iterator state:

* Epoch e of this process's shard is shuffled with a seed derived from (config.seed, process_index,
  e); epochs are concatenated and each element gets its global position p in this process's stream.
* Resuming at step s starts directly at epoch `s·B_host // n` (n = shard size) and skips the rest of
  the way to element `s·B_host` *before* decoding, so at most one epoch of encoded records is read
  and thrown away.
* Element p's augmentation seed is derived statelessly from (config.seed, process_index, p); view v
  folds v into it. Batch k holds elements [k·B_host, (k+1)·B_host) and may span two epochs.

The stream depends on the process count (each process shuffles its own shard), so an exact resume
needs the same number of processes; the device count does not matter.

`tf.data` runs with `deterministic=True`, so parallelism (AUTOTUNE maps, prefetch) never reorders.
The only global state that could change the stream is TensorFlow's global seed, which the
buffer shuffle combines with its op seed: never call `tf.random.set_seed` in a training process.
"""

from collections.abc import Callable, Iterator

import ml_collections
import numpy as np
import tensorflow as tf

from fnc_jax import errors
from fnc_jax import field_checks as check
from fnc_jax.data import augment, layout, sources

Batch = dict[str, np.ndarray]

# Purposes folded into the per-process key, so that shuffling and augmentation draw independent streams.
_SHUFFLE, _AUGMENT = 0, 1


def canvas_size(config: ml_collections.ConfigDict, image_shape: tuple[int, ...] | None) -> int:
    """Side of the host canvas with `augment.crop_on_device`: `augment.canvas_size`, or for 0 the
    source's fixed image side (`image_shape` from `sources.get_source_info`, None when sizes vary)."""
    size = check.integer(config, "augment.canvas_size", 0)
    if size:
        return size
    if image_shape is None:
        raise check.invalid(
            "augment.canvas_size",
            0,
            "a positive side for sources whose image sizes vary, e.g. 512 (ImageNet; "
            "larger images are shrunk to fit); 0 only for fixed-size sources",
        )
    return max(image_shape[:2])


def pretrain_iterator(
    config: ml_collections.ConfigDict, *, process_index: int, process_count: int, start_step: int = 0
) -> Iterator[Batch]:
    """Endless pretraining batches from `config.data.train_split`, starting at `start_step`.

    Yields `{'images': float32 (B_host, V, S, S, 3), 'labels': int32 (B_host,)}` with
    B_host = config.batch_size // process_count, V = 2 + config.views.support_size and
    S = config.data.image_size; with `augment.on_device` the images are uint8 (crop and flip only; the
    train step rescales them and does the rest). Every view is an independent `augment.pretrain_view`
    draw. With `augment.crop_on_device` the views are cut on the device instead: `images` are uint8
    canvases (B_host, C, C, 3) and `crops` int32 (B_host, V, 5), the views' crop boxes and flips. The
    data path (`layout.data_path`) decides which, and `layout.BATCH_LAYOUTS` says what each holds.
    """
    aug = config.augment
    num_views = 2 + config.views.support_size
    size = config.data.image_size
    path = layout.data_path(config)  # what the batches hold: `layout.BATCH_LAYOUTS[path]`
    if path == layout.DEVICE_CROP:
        side = canvas_size(config, sources.get_source_info(config.data).image_shape)

        def canvas_example(image: tf.Tensor, label: tf.Tensor, seed: tf.Tensor) -> dict[str, tf.Tensor]:
            canvas, shape = augment.fit_canvas(image, side)
            crops = [
                augment.crop_and_flip(shape, _view_seed(seed, v), area_range=tuple(aug.area_range))
                for v in range(num_views)
            ]
            return {"images": canvas, "crops": tf.stack(crops), "labels": label}

        return _train_batches(config, config.data.train_split, process_index, process_count, start_step, canvas_example)

    def view(image: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
        return augment.pretrain_view(
            image,
            seed,
            image_size=size,
            color_strength=aug.color_strength,
            use_randaugment=aug.use_randaugment,
            color_on_device=path == layout.DEVICE_COLOUR,
            area_range=tuple(aug.area_range),
        )

    def make_example(image: tf.Tensor, label: tf.Tensor, seed: tf.Tensor) -> dict[str, tf.Tensor]:
        # `map_fn` traces the (large) augmentation graph once instead of once per view: building the
        # pipeline takes seconds instead of ~a minute at V = 10.
        view_seeds = tf.map_fn(
            lambda v: _view_seed(seed, v),
            tf.range(num_views, dtype=tf.int64),
            fn_output_signature=tf.TensorSpec((2,), tf.int64),
        )
        views = tf.map_fn(
            lambda view_seed: view(image, view_seed),
            view_seeds,
            fn_output_signature=tf.TensorSpec((size, size, 3), layout.BATCH_LAYOUTS[path]["images"][0]),
        )
        return {"images": views, "labels": label}

    return _train_batches(config, config.data.train_split, process_index, process_count, start_step, make_example)


def supervised_iterator(
    config: ml_collections.ConfigDict,
    *,
    split: str,
    process_index: int,
    process_count: int,
    start_step: int = 0,
) -> Iterator[Batch]:
    """Endless linear-eval / fine-tuning batches: `{'images': (B_host, S, S, 3), 'labels'}`.

    Views come from `augment.finetune_view` (crop area (0.2, 1) + flip); same resume guarantee as
    `pretrain_iterator`.
    """

    def make_example(image: tf.Tensor, label: tf.Tensor, seed: tf.Tensor) -> dict[str, tf.Tensor]:
        view = augment.finetune_view(image, seed, image_size=config.data.image_size)
        return {"images": view, "labels": label}

    return _train_batches(config, split, process_index, process_count, start_step, make_example)


def eval_iterator(
    config: ml_collections.ConfigDict,
    *,
    split: str,
    process_index: int,
    process_count: int,
    batch_size: int | None = None,
) -> Iterator[Batch]:
    """One pass over this process's shard of `split`, `augment.eval_preprocess`ed, in fixed order.

    `batch_size` is global (default `config.batch_size`). Yields `{'images': float32
    (B_host, S, S, 3), 'labels': int32, 'mask': float32}` where mask is 1 for real examples and 0
    for padding. Every process yields the same number of batches (that of the largest shard, padded),
    so processes running collective steps stay in lock-step; the masks sum to the split size.
    """
    per_host = _per_host_batch(batch_size or config.batch_size, process_count)
    largest_shard = max(sources.shard_sizes(config.data, split, process_count))
    num_batches = -(-largest_shard // per_host)
    encoded = sources.load_encoded_split(config.data, split, process_index=process_index, process_count=process_count)
    size = config.data.image_size

    def preprocess(example: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
        image = augment.eval_preprocess(encoded.decode_image(example["image"]), image_size=size)
        return {"images": image, "labels": example["label"], "mask": tf.constant(1.0)}

    padding = tf.data.Dataset.from_tensors(
        {
            "images": tf.zeros((size, size, 3), tf.float32),
            "labels": tf.constant(0, tf.int32),
            "mask": tf.constant(0.0),
        }
    ).repeat()
    dataset = (
        encoded.dataset.map(preprocess, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
        .concatenate(padding)
        .take(num_batches * per_host)
        .batch(per_host, drop_remainder=True)
    )
    return _finalize(dataset)


def _view_seed(seed: tf.Tensor, view: int | tf.Tensor) -> tf.Tensor:
    """Seed of view `view` of the example with augmentation seed `seed`."""
    return tf.random.experimental.stateless_fold_in(seed, tf.cast(view, tf.int64))


def _per_host_batch(global_batch: int, process_count: int) -> int:
    if global_batch % process_count:
        raise errors.ConfigError(f"batch_size={global_batch} must be divisible by the process count ({process_count}).")
    return global_batch // process_count


def _process_keys(seed: int, process_index: int) -> tuple[tf.Tensor, tf.Tensor]:
    """(shuffle key, augmentation key) of this process: shape-(2,) int64 stateless seeds."""
    key = tf.constant([seed, process_index], tf.int64)
    fold_in = tf.random.experimental.stateless_fold_in
    return fold_in(key, _SHUFFLE), fold_in(key, _AUGMENT)


def _train_batches(
    config: ml_collections.ConfigDict,
    split: str,
    process_index: int,
    process_count: int,
    start_step: int,
    make_example: Callable[[tf.Tensor, tf.Tensor, tf.Tensor], dict[str, tf.Tensor]],
) -> Iterator[Batch]:
    """Shuffled, repeated, augmented, batched stream; `make_example(image, label, seed)` augments."""
    per_host = _per_host_batch(config.batch_size, process_count)
    encoded = sources.load_encoded_split(config.data, split, process_index=process_index, process_count=process_count)
    if encoded.num_examples == 0:
        raise errors.ConfigError(f"split {split!r} has no examples for process {process_index}.")
    buffer_size = config.data.get("shuffle_buffer") or 10 * per_host
    shuffle_key, augment_key = _process_keys(config.seed, process_index)

    def epoch(index: tf.Tensor) -> tf.data.Dataset:
        seed_key = tf.random.experimental.stateless_fold_in(shuffle_key, index)
        seed = tf.random.stateless_uniform([], seed_key, minval=1, maxval=2**62, dtype=tf.int64)
        return encoded.dataset.shuffle(buffer_size, seed=seed)

    first = start_step * per_host
    start_epoch = first // encoded.num_examples
    epoch_start = start_epoch * encoded.num_examples

    @tf.autograph.experimental.do_not_convert  # `augment` uses explicit tf.cond; autograph only slows tracing.
    def augment_one(position: tf.Tensor, example: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
        seed = tf.random.experimental.stateless_fold_in(augment_key, position)
        return make_example(encoded.decode_image(example["image"]), example["label"], seed)

    dataset = (
        tf.data.Dataset.counter(start_epoch)
        .flat_map(epoch)
        .enumerate(start=epoch_start)
        .skip(first - epoch_start)
        .map(augment_one, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
        .batch(per_host, drop_remainder=True)
    )
    return _finalize(dataset)


def _finalize(dataset: tf.data.Dataset) -> Iterator[Batch]:
    options = tf.data.Options()
    options.deterministic = True
    # Parallelism comes from the element-wise maps; intra-op threads would only contend with them.
    options.threading.max_intra_op_parallelism = 1
    return dataset.prefetch(tf.data.AUTOTUNE).with_options(options).as_numpy_iterator()
