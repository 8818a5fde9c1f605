"""Input pipelines: shapes, exact resume (also across epochs), seeds, eval padding and lock-step."""

import itertools
import pathlib
import sys

import ml_collections
import numpy as np
import pytest

sys.path.insert(0, str(pathlib.Path(__file__).parent))

from fake_imagenet import write_fake_image_folder  # noqa: E402

from fnc_jax.data import augment, augment_jax, layout, pipeline, sources  # noqa: E402

IMAGE_SIZE = 16


def make_config(**data) -> ml_collections.ConfigDict:
    """Small config; RandAugment off because its graph takes seconds to build (the fake-ImageNet test
    covers it)."""
    return ml_collections.ConfigDict(
        dict(
            seed=0,
            batch_size=8,
            views=dict(support_size=1),
            data=dict(
                source="embedded",
                name="mnist_5k",
                data_dir=None,
                train_split="train",
                eval_split="test",
                image_size=IMAGE_SIZE,
                shuffle_buffer=None,
                **data,
            ),
            augment=dict(
                color_strength=1.0,
                use_randaugment=False,
                on_device=False,
                crop_on_device=False,
                canvas_size=0,
                area_range=(0.08, 1.0),
            ),
        )
    )


def take(iterator, num: int) -> list[dict[str, np.ndarray]]:
    return list(itertools.islice(iterator, num))


def assert_same_batches(a, b) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for key in x:
            np.testing.assert_array_equal(x[key], y[key])


@pytest.fixture(scope="module")
def folder_config(tmp_path_factory):
    """10 training images: with 4 per batch, batch 2 straddles the first epoch boundary."""
    root = tmp_path_factory.mktemp("folder")
    write_fake_image_folder(root, num_classes=2, per_class={"train": 5, "val": 4})
    config = make_config()
    config.batch_size = 4
    config.data.update(source="image_folder", name="folder", data_dir=str(root), eval_split="val")
    return config


@pytest.fixture(scope="module")
def mnist_stream():
    return take(pipeline.pretrain_iterator(make_config(), process_index=0, process_count=2), 5)


def test_pretrain_batch_shapes(mnist_stream):
    batch = mnist_stream[0]
    assert batch["images"].shape == (4, 3, IMAGE_SIZE, IMAGE_SIZE, 3)
    assert batch["images"].dtype == np.float32 and batch["labels"].dtype == np.int32
    assert batch["labels"].shape == (4,)
    assert 0.0 <= batch["images"].min() and batch["images"].max() <= 1.0


def test_on_device_stream_is_uint8_crops_of_the_same_draws(mnist_stream):
    """augment.on_device sends uint8 views (4x fewer bytes); crops and flips are the same draws, so with
    colour jitter off in both modes the views agree up to the rounding to uint8."""
    host, device = make_config(), make_config()
    host.augment.color_strength = 0.0  # jitter at strength 0 and grayscale of grey digits: identities
    device.augment.update(on_device=True)
    a = take(pipeline.pretrain_iterator(host, process_index=0, process_count=2), 2)
    b = take(pipeline.pretrain_iterator(device, process_index=0, process_count=2), 2)
    for x, y in zip(a, b):
        assert y["images"].dtype == np.uint8 and y["images"].shape == x["images"].shape
        np.testing.assert_array_equal(x["labels"], y["labels"])
        # Within one grey level: the rounding, plus float noise of the identity colour ops at .5 ties.
        np.testing.assert_allclose(y["images"] / 255.0, x["images"], atol=1 / 255)
        assert np.mean(np.abs(y["images"] / 255.0 - x["images"]) <= 0.5 / 255 + 1e-6) > 0.999


def test_crop_on_device_stream_is_canvases_and_the_same_crops(mnist_stream):
    """augment.crop_on_device sends each image once, on a canvas, with its views' crops and flips: cut on
    the device, they are the on_device views (same draws, same legacy bicubic), up to float rounding."""
    views, canvases = make_config(), make_config()
    views.augment.on_device = True
    canvases.augment.update(on_device=True, crop_on_device=True)  # canvas_size 0: MNIST's 28 px
    a = take(pipeline.pretrain_iterator(views, process_index=0, process_count=2), 2)
    b = take(pipeline.pretrain_iterator(canvases, process_index=0, process_count=2), 2)
    for x, y in zip(a, b):
        layout.check_batch(layout.data_path(views), x)  # each config's batches have its path's layout
        layout.check_batch(layout.data_path(canvases), y)
        assert y["images"].shape == (4, 28, 28, 3) and y["images"].dtype == np.uint8
        assert y["crops"].shape == (4, 3, 5) and y["crops"].dtype == np.int32
        np.testing.assert_array_equal(x["labels"], y["labels"])
        cut = np.asarray(augment_jax.crop_resize_views(y["images"], y["crops"], IMAGE_SIZE)) * 255.0
        np.testing.assert_allclose(cut, x["images"], atol=0.5 + 1e-3)  # the host rounds to uint8
        assert np.mean(np.round(cut) == x["images"]) > 0.999  # ... and only float ties may round apart
    assert set(np.concatenate([y["crops"][..., 4].ravel() for y in b])) == {0, 1}


def test_crop_on_device_needs_a_canvas_size_when_image_sizes_vary(folder_config):
    config = folder_config.copy_and_resolve_references()
    config.augment.update(on_device=True, crop_on_device=True)
    with pytest.raises(ValueError, match=r"augment\.canvas_size.*allowed.*512"):
        pipeline.pretrain_iterator(config, process_index=0, process_count=1)
    config.augment.canvas_size = 40
    batch = next(pipeline.pretrain_iterator(config, process_index=0, process_count=1))
    assert batch["images"].shape == (4, 40, 40, 3)
    crops = batch["crops"]
    top, left, height, width = (crops[..., i] for i in range(4))
    assert (top >= 0).all() and (left >= 0).all() and (top + height <= 40).all() and (left + width <= 40).all()


def test_resume_replays_the_uninterrupted_stream(mnist_stream):
    config = make_config()
    resumed = take(pipeline.pretrain_iterator(config, process_index=0, process_count=2, start_step=3), 2)
    assert_same_batches(resumed, mnist_stream[3:5])


def test_resume_across_epoch_boundaries(folder_config):
    stream = take(pipeline.pretrain_iterator(folder_config, process_index=0, process_count=1), 8)
    for start in (2, 5):  # Mid-epoch (batch 2 straddles the boundary), and exactly at epoch 2.
        resumed = pipeline.pretrain_iterator(folder_config, process_index=0, process_count=1, start_step=start)
        assert_same_batches(take(resumed, 8 - start), stream[start:])
    labels = np.concatenate([b["labels"] for b in stream])
    # Each epoch of 10 is a permutation of the split, and consecutive epochs are shuffled differently.
    assert all(np.bincount(labels[e * 10 : (e + 1) * 10]).tolist() == [5, 5] for e in range(3))
    assert not np.array_equal(labels[:10], labels[10:20])


def test_seeds_and_views_change_the_augmentations(mnist_stream):
    config = make_config()
    config.seed = 1
    other = take(pipeline.pretrain_iterator(config, process_index=0, process_count=2), 1)[0]
    assert not np.array_equal(other["images"], mnist_stream[0]["images"])
    views = mnist_stream[0]["images"]
    for image in views:
        assert not np.array_equal(image[0], image[1]) and not np.array_equal(image[1], image[2])


def test_processes_read_different_data(mnist_stream):
    other = take(pipeline.pretrain_iterator(make_config(), process_index=1, process_count=2), 1)[0]
    assert not np.array_equal(other["images"], mnist_stream[0]["images"])


def test_supervised_iterator_shapes_and_resume(folder_config):
    stream = take(pipeline.supervised_iterator(folder_config, split="train", process_index=0, process_count=1), 4)
    assert stream[0]["images"].shape == (4, IMAGE_SIZE, IMAGE_SIZE, 3)
    assert stream[0]["labels"].dtype == np.int32
    resumed = pipeline.supervised_iterator(folder_config, split="train", process_index=0, process_count=1, start_step=3)
    assert_same_batches(take(resumed, 1), stream[3:])


@pytest.mark.parametrize("process_count", [1, 2, 4])
def test_eval_padding_keeps_processes_in_lock_step(folder_config, process_count):
    per_process = [
        list(
            pipeline.eval_iterator(
                folder_config, split="val", process_index=k, process_count=process_count, batch_size=4
            )
        )
        for k in range(process_count)
    ]
    assert len({len(batches) for batches in per_process}) == 1
    total = sum(b["mask"].sum() for batches in per_process for b in batches)
    assert total == 8
    for batches in per_process:
        masks = np.concatenate([b["mask"] for b in batches])
        assert masks.dtype == np.float32 and set(masks.tolist()) <= {0.0, 1.0}
        assert np.all(np.diff(masks) <= 0)  # Real examples first, then padding.
        padded = np.concatenate([b["images"] for b in batches])[masks == 0]
        assert not padded.any()


def test_eval_matches_eval_preprocess_of_the_split(folder_config):
    batches = list(pipeline.eval_iterator(folder_config, split="val", process_index=0, process_count=1, batch_size=4))
    examples = sources.load_split(folder_config.data, "val", process_index=0, process_count=1)
    expected = [
        (augment.eval_preprocess(e["image"], image_size=IMAGE_SIZE).numpy(), e["label"].numpy()) for e in examples
    ]
    np.testing.assert_array_equal(
        np.concatenate([b["images"] for b in batches]), np.stack([image for image, _ in expected])
    )
    np.testing.assert_array_equal(np.concatenate([b["labels"] for b in batches]), [label for _, label in expected])


def test_eval_mnist_test_split_counts():
    config = make_config()
    batches = list(pipeline.eval_iterator(config, split="test", process_index=1, process_count=2, batch_size=96))
    # 1,000 test images: 500 per process, 48 per host batch -> 11 batches, the last one padded.
    assert len(batches) == 11 and sum(b["mask"].sum() for b in batches) == 500
    assert batches[0]["images"].shape == (48, IMAGE_SIZE, IMAGE_SIZE, 3)


def test_global_batch_must_split_over_processes():
    with pytest.raises(ValueError, match="divisible"):
        pipeline.pretrain_iterator(make_config(), process_index=0, process_count=3)
