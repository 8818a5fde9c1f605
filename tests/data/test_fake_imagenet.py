"""The real TFDS `imagenet2012` builder on a tiny offline manual dir, read through our pipelines."""

import hashlib
import itertools
import pathlib
import sys

import ml_collections
import numpy as np
import pytest
import tensorflow_datasets as tfds

sys.path.insert(0, str(pathlib.Path(__file__).parent))

from fake_imagenet import (  # noqa: E402
    fake_imagenet_synsets,
    fake_validation_labels,
    write_fake_imagenet_manual_dir,
)

from fnc_jax.data import pipeline, sources  # noqa: E402

IMAGE_SIZE = 40  # > 32, so evaluation takes the centre-crop path.


@pytest.fixture(scope="module")
def config(tmp_path_factory):
    root = tmp_path_factory.mktemp("imagenet")
    manual_dir = write_fake_imagenet_manual_dir(root / "manual", num_classes=2, train_per_class=4)
    builder = tfds.builder("imagenet2012", data_dir=str(root / "tfds"))
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=str(manual_dir), try_download_gcs=False)
    )
    return ml_collections.ConfigDict(
        dict(
            seed=0,
            batch_size=6,
            views=dict(support_size=2),
            data=dict(
                source="tfds",
                name="imagenet2012",
                data_dir=str(root / "tfds"),
                train_split="train",
                eval_split="validation",
                image_size=IMAGE_SIZE,
                shuffle_buffer=None,
            ),
            augment=dict(
                color_strength=1.0,
                use_randaugment=True,
                on_device=False,
                crop_on_device=False,
                area_range=(0.08, 1.0),
            ),
        )
    )


def class_index(synsets: list[str]) -> list[int]:
    names = tfds.core.tfds_path("datasets/imagenet2012/labels.txt").read_text().split()
    return [names.index(s) for s in synsets]


def test_source_info(config):
    info = sources.get_source_info(config.data)
    assert info == sources.SourceInfo(1000, {"train": 8, "validation": 4}, None)


def test_load_split_decodes_and_shards(config):
    shards = [
        list(sources.load_split(config.data, "train", process_index=k, process_count=2).as_numpy_iterator())
        for k in range(2)
    ]
    assert [len(s) for s in shards] == [4, 4]
    examples = shards[0] + shards[1]
    # Greyscale JPEGs (skimage's camera, coins) come out as RGB like the others.
    assert all(e["image"].ndim == 3 and e["image"].shape[2] == 3 for e in examples)
    assert all(min(e["image"].shape[:2]) == 48 and e["image"].dtype == np.uint8 for e in examples)
    assert len({hashlib.sha1(e["image"].tobytes()).hexdigest() for e in examples}) == 8
    labels = sorted(int(e["label"]) for e in examples)
    assert labels == sorted(class_index(fake_imagenet_synsets(2)) * 4)


def test_pretrain_batches_and_resume(config):
    stream = list(itertools.islice(pipeline.pretrain_iterator(config, process_index=0, process_count=1), 3))
    batch = stream[0]
    assert batch["images"].shape == (6, 4, IMAGE_SIZE, IMAGE_SIZE, 3)
    assert batch["images"].dtype == np.float32 and 0 <= batch["images"].min() <= batch["images"].max() <= 1
    assert set(np.concatenate([b["labels"] for b in stream])) <= set(class_index(fake_imagenet_synsets(2)))
    # Step 2 starts in epoch 1 (elements 12..17 of 8-image epochs): resume skips into it.
    resumed = next(pipeline.pretrain_iterator(config, process_index=0, process_count=1, start_step=2))
    np.testing.assert_array_equal(resumed["images"], stream[2]["images"])
    np.testing.assert_array_equal(resumed["labels"], stream[2]["labels"])


def test_eval_validation_labels_and_padding(config):
    per_process = [
        list(pipeline.eval_iterator(config, split="validation", process_index=k, process_count=2, batch_size=6))
        for k in range(2)
    ]
    assert [len(batches) for batches in per_process] == [1, 1]
    batches = [b for batches in per_process for b in batches]
    assert batches[0]["images"].shape == (3, IMAGE_SIZE, IMAGE_SIZE, 3)
    mask = np.concatenate([b["mask"] for b in batches])
    labels = np.concatenate([b["labels"] for b in batches])[mask == 1]
    assert mask.sum() == 4
    assert sorted(labels) == sorted(class_index(fake_validation_labels(4)))
