"""Tiny offline ImageNet stand-ins: a manual dir for the real TFDS `imagenet2012` builder, and an
image folder with the `<split>/<class>/<file>` layout of an extracted ImageNet.

The manual dir copies what image-net.org ships and what TFDS's builder reads:
`ILSVRC2012_img_train.tar` holds one tar per synset (`n01751748.tar`) of `<synset>_<k>.JPEG` files, and
`ILSVRC2012_img_val.tar` holds flat `ILSVRC2012_val_<8 digits>.JPEG` files. The builder labels
validation images by pairing their *sorted* names with the lines of its bundled
`validation_labels.txt`, so validation image j (1-based) gets line j whatever we call it.

The pixels are real photographs that ship inside scikit-image, cropped and resized small, so the
pipeline sees natural-image statistics, variable aspect ratios and greyscale files (as ImageNet has)
without any download. Writing either takes well under a second.
"""

import io
import os
import pathlib
import tarfile

import tensorflow_datasets as tfds
from PIL import Image
from skimage import data as skdata

_VALIDATION_LABELS = "datasets/imagenet2012/validation_labels.txt"

# Photos bundled with scikit-image (no network): colour ones, and greyscale ones that the builder
# stores as 1-channel JPEGs, which the input pipeline must decode to RGB.
_PHOTOS = (
    skdata.astronaut,
    skdata.chelsea,
    skdata.coffee,
    skdata.rocket,
    skdata.camera,
    skdata.hubble_deep_field,
    skdata.immunohistochemistry,
    skdata.coins,
    skdata.retina,
    skdata.moon,
)


def _validation_synsets() -> list[str]:
    return pathlib.Path(tfds.core.tfds_path(_VALIDATION_LABELS)).read_text().split()


def fake_imagenet_synsets(num_classes: int) -> list[str]:
    """The training synsets: the first distinct ones of the validation label file.

    Validation image j gets line j of that file, and its first lines are distinct synsets, so with
    `num_val <= num_classes` every validation label is also a training class.
    """
    return list(dict.fromkeys(_validation_synsets()))[:num_classes]


def _photo(index: int, image_size: int, image_format: str = "JPEG") -> bytes:
    """A distinct small encoded image per index: photo `index % 10`, a crop that moves with the index."""
    photo = _PHOTOS[index % len(_PHOTOS)]()
    h, w = photo.shape[:2]
    crop = int(0.7 * min(h, w))
    step = index // len(_PHOTOS) + 1
    y, x = (step * 37) % (h - crop), (step * 53) % (w - crop)
    aspect = 1.0 + 0.25 * (index % 3)  # Non-square outputs, like real ImageNet images.
    image = Image.fromarray(photo[y : y + crop, x : x + int(crop / aspect)])
    image = image.resize((image_size, int(image_size * aspect)), Image.BILINEAR)
    buffer = io.BytesIO()
    image.save(buffer, format=image_format)
    return buffer.getvalue()


def _add_bytes(tar: tarfile.TarFile, name: str, payload: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(payload)
    tar.addfile(info, io.BytesIO(payload))


def write_fake_imagenet_manual_dir(
    path: str | os.PathLike,
    *,
    num_classes: int = 2,
    train_per_class: int = 4,
    num_val: int = 4,
    image_size: int = 48,
) -> pathlib.Path:
    """Writes `ILSVRC2012_img_{train,val}.tar` under `path` and returns `path`.

    Build it with `tfds.builder('imagenet2012', data_dir=...).download_and_prepare(
    download_config=tfds.download.DownloadConfig(manual_dir=path, try_download_gcs=False))`.
    `image_size` is the shorter side of every image.
    """
    path = pathlib.Path(path)
    path.mkdir(parents=True, exist_ok=True)
    index = 0
    with tarfile.open(path / "ILSVRC2012_img_train.tar", "w") as train_tar:
        for synset in fake_imagenet_synsets(num_classes):
            inner = io.BytesIO()
            with tarfile.open(fileobj=inner, mode="w") as class_tar:
                for k in range(train_per_class):
                    _add_bytes(class_tar, f"{synset}_{k + 1}.JPEG", _photo(index, image_size))
                    index += 1
            _add_bytes(train_tar, f"{synset}.tar", inner.getvalue())
    with tarfile.open(path / "ILSVRC2012_img_val.tar", "w") as val_tar:
        for j in range(num_val):
            _add_bytes(val_tar, f"ILSVRC2012_val_{j + 1:08d}.JPEG", _photo(index, image_size))
            index += 1
    return path


def fake_validation_labels(num_val: int) -> list[str]:
    """The synsets TFDS assigns to the fake validation images, in file-name order."""
    return _validation_synsets()[:num_val]


def write_fake_image_folder(
    root: str | os.PathLike,
    *,
    num_classes: int = 3,
    per_class: dict[str, int] | None = None,
    image_size: int = 24,
) -> pathlib.Path:
    """Writes `<root>/<split>/<class>/<k>.{jpg,png,JPEG}` (formats alternate) and returns `root`.

    `per_class` maps split to images per class (default `{'train': 4, 'val': 2}`); classes are
    named `class_<c>`.
    """
    root = pathlib.Path(root)
    formats = (("jpg", "JPEG"), ("png", "PNG"), ("JPEG", "JPEG"))
    index = 0
    for split, count in (per_class or {"train": 4, "val": 2}).items():
        for c in range(num_classes):
            class_dir = root / split / f"class_{c}"
            class_dir.mkdir(parents=True, exist_ok=True)
            for k in range(count):
                extension, image_format = formats[index % len(formats)]
                (class_dir / f"{k}.{extension}").write_bytes(_photo(index, image_size, image_format))
                index += 1
    return root
