"""Dataset sources: embedded MNIST split, per-process sharding, image folders, clear errors."""

import hashlib
import pathlib
import sys

import ml_collections
import numpy as np
import pytest

sys.path.insert(0, str(pathlib.Path(__file__).parent))

from fake_imagenet import write_fake_image_folder  # noqa: E402

from fnc_jax.data import sources  # noqa: E402


def data_config(**overrides) -> ml_collections.ConfigDict:
    fields = dict(source="embedded", name="mnist_5k", data_dir=None, train_split="train", eval_split="test")
    return ml_collections.ConfigDict({**fields, **overrides})


def read_all(config, split, process_index=0, process_count=1) -> tuple[list[np.ndarray], np.ndarray]:
    dataset = sources.load_split(config, split, process_index=process_index, process_count=process_count)
    examples = list(dataset.as_numpy_iterator())
    return [e["image"] for e in examples], np.array([e["label"] for e in examples])


def digest(image: np.ndarray) -> str:
    return hashlib.sha1(image.tobytes() + str(image.shape).encode()).hexdigest()


@pytest.fixture(scope="module")
def mnist():
    return {split: read_all(data_config(), split) for split in ("train", "test")}


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("folder")
    write_fake_image_folder(root, num_classes=3, per_class={"train": 3, "val": 2})
    return data_config(source="image_folder", name="folder", data_dir=str(root), eval_split="val")


def test_embedded_mnist_is_a_stratified_4000_1000_split(mnist):
    for split, size in (("train", 4000), ("test", 1000)):
        images, labels = mnist[split]
        assert len(images) == size and labels.dtype == np.int32
        assert all(i.shape == (28, 28, 3) and i.dtype == np.uint8 for i in images)
        np.testing.assert_array_equal(np.bincount(labels), [size // 10] * 10)
        grey = np.stack(images)
        assert np.array_equal(grey[..., 0], grey[..., 2]) and grey.max() == 255
    train = {digest(i) for i in mnist["train"][0]}
    test = {digest(i) for i in mnist["test"][0]}
    assert len(train) == 4000 and len(test) == 1000 and not train & test


def test_embedded_order_mixes_classes(mnist):
    # The file is sorted by digit; a small shuffle buffer needs classes already mixed.
    assert len(set(mnist["train"][1][:50])) == 10


def test_embedded_source_info():
    info = sources.get_source_info(data_config())
    assert info == sources.SourceInfo(10, {"train": 4000, "test": 1000}, (28, 28, 3))


@pytest.mark.parametrize("split", ["train", "test"])
def test_embedded_processes_partition_the_split(mnist, split):
    shards = [read_all(data_config(), split, index, 2) for index in range(2)]
    hashes = [[digest(i) for i in images] for images, _ in shards]
    assert [len(h) for h in hashes] == sources.shard_sizes(data_config(), split, 2)
    assert not set(hashes[0]) & set(hashes[1])
    assert sorted(hashes[0] + hashes[1]) == sorted(digest(i) for i in mnist[split][0])


def test_image_folder_reads_sorted_classes_as_rgb(image_folder):
    images, labels = read_all(image_folder, "train")
    assert sorted(labels.tolist()) == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert all(i.ndim == 3 and i.shape[2] == 3 and i.dtype == np.uint8 for i in images)
    assert len({i.shape for i in images}) > 1  # Variable sizes survive.
    info = sources.get_source_info(image_folder)
    assert info == sources.SourceInfo(3, {"train": 9, "val": 6}, None)


def test_image_folder_processes_partition_the_split(image_folder):
    everything = sorted(digest(i) for i in read_all(image_folder, "val")[0])
    shards = [sorted(digest(i) for i in read_all(image_folder, "val", k, 2)[0]) for k in range(2)]
    assert [len(s) for s in shards] == sources.shard_sizes(image_folder, "val", 2) == [3, 3]
    assert not set(shards[0]) & set(shards[1])
    assert sorted(shards[0] + shards[1]) == everything


def test_shards_follow_even_splits_sizes(image_folder):
    assert sources.shard_sizes(image_folder, "train", 4) == [3, 2, 2, 2]


def test_unknown_source_and_name_name_the_field():
    with pytest.raises(ValueError, match=r"data\.source='hdf5'.*embedded"):
        sources.get_source_info(data_config(source="hdf5"))
    with pytest.raises(ValueError, match=r"data\.name='mnist'.*mnist_5k"):
        sources.get_source_info(data_config(name="mnist"))
    with pytest.raises(ValueError, match=r"data\.name='no_such_dataset'.*tfds\.list_builders"):
        sources.get_source_info(data_config(source="tfds", name="no_such_dataset"))


def test_unknown_split_is_named():
    with pytest.raises(ValueError, match="'validation'.*'train', 'test'"):
        sources.load_split(data_config(), "validation", process_index=0, process_count=1)


def test_image_folder_errors_name_the_field(tmp_path, image_folder):
    with pytest.raises(ValueError, match=r"data\.data_dir="):
        sources.get_source_info(data_config(source="image_folder", data_dir=str(tmp_path / "nope")))
    with pytest.raises(ValueError, match=r"'test' \(data\.train_split / data\.eval_split\)"):
        sources.load_split(image_folder, "test", process_index=0, process_count=1)


def test_missing_tfds_dataset_says_how_to_build_it(tmp_path):
    config = data_config(source="tfds", name="imagenet2012", data_dir=str(tmp_path))
    with pytest.raises(FileNotFoundError) as error:
        sources.load_split(config, "train", process_index=0, process_count=1)
    message = str(error.value)
    for needle in (
        "data.name='imagenet2012'",
        "data.data_dir=",
        "tfds build imagenet2012",
        f"--data_dir={tmp_path}",
        "--manual_dir=",
        "ILSVRC2012_img_train.tar",
    ):
        assert needle in message
