"""Benchmark of the host input pipeline: views/s per host CPU core, and where the host time goes.

Usage (from the repository root):

    python -m benchmarks.input_pipeline [--quick] [--cores 1] [--repeats 2] [--output FILE]

Prints ONE JSON object to stdout (progress goes to stderr).

Data: real photographs from `skimage.data` (astronaut, chelsea, coffee, rocket, ...), resized to
ImageNet-like sizes (longer side 500 px) and JPEG-encoded at quality 90, plus random crops of them, written
as an `image_folder` dataset to a RAM-backed temporary directory (/dev/shm when it exists), so file reads
cost a memory copy. The 32 px set is 32x32 PNGs (TFDS stores CIFAR-10 as PNG) of random crops of the same
photos. Everything runs through the project's real pipelines (`pipeline.pretrain_iterator`,
`pipeline.eval_iterator`): file read, decode, V views per image, batching, and the numpy batch.

Per core: every measurement runs in a worker process pinned to `--cores` CPUs (`os.sched_setaffinity`,
before TensorFlow starts, so its thread pools and tf.data's autotuning see only those cores) with
`tf.config.threading` intra/inter-op threads = `--cores`. Views/s is divided by the cores used. Workers
run round-robin over the variants for `--repeats` rounds (median reported), so a busy machine slows all
variants alike; ratios between variants are the robust numbers.

Variants, at 224 px (V = 10 views per image, the official recipe) and at 32 px (V = 4, CIFAR-like):
  - `pretrain_host_randaugment`: the official host augmentation (crop, flip, colour jitter, RandAugment,
    grayscale; blur is always on the device).
  - `pretrain_host`: the same without RandAugment (SimCLR's pipeline).
  - `pretrain_on_device_colour`: `augment.on_device=True`: the host only decodes, crops, resizes and flips;
    colour jitter / grayscale (and solarize) run in the jitted step (`augment_jax`).
  - `pretrain_on_device_crop`: `augment.crop_on_device=True` as well: the host decodes, pads each image
    onto a canvas (512 px at 224, 32 px at 32) and draws the V crop boxes and flips; the device cuts the
    views (`device/crop_resize` prices that part on this CPU).
  - `pretrain_on_device_colour_randaugment`, `pretrain_on_device_crop_randaugment`: the official recipe
    (RandAugment on) on those two paths, RandAugment on the device (`device/randaugment` prices it on
    this CPU, next to `device/colour_jitter_grayscale`). `official_recipe` puts their host CPU-ms per
    view side by side with the host recipe's, measured in the same run.
  - `eval`: evaluation preprocessing (centre crop 87.5 %, resize; 32 px: none), 1 view per image.

`stages` (224 px, same pinning): cumulative host work per image with V views, using the functions of
`fnc_jax.data.augment` directly on in-memory JPEG bytes — decode; + V crop boxes sampled and sliced
(converted to float32); + the legacy bicubic resize to 224 px; + flip/clip; + colour jitter and
grayscale (= pretrain_host); + RandAugment (= official) — and each stage's marginal cost per view, to
show what limits the on_device speed-up (the issue targets >= 3x views/s per core with on_device vs host
colour work). `host_part_on_device_mode` is the on_device host work itself (uint8 crop, resize, round
to uint8, flip). One alternative stage (not the recipe) prices a bilinear resize in place of the legacy
bicubic one; two more emit the whole views batched into numpy (uint8 in on_device mode, float32 with
host colour, as the pipeline does) instead of per-view means, pricing the output path.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

from benchmarks import common

COLOUR_PHOTOS = (
    "astronaut",
    "chelsea",
    "coffee",
    "rocket",
    "hubble_deep_field",
    "immunohistochemistry",
    "retina",
    "colorwheel",
)
VARIANTS_224 = (
    "pretrain_host_randaugment",
    "pretrain_host",
    "pretrain_on_device_colour",
    "pretrain_on_device_crop",
    "pretrain_on_device_colour_randaugment",
    "pretrain_on_device_crop_randaugment",
    "eval",
)
# The official recipe's host cost per view must stay at or under this with crop_on_device (issue 17).
TARGET_CROP_ON_DEVICE_HOST_MS_PER_VIEW = 0.15
VARIANTS_32 = VARIANTS_224
CANVAS = {224: 512, 32: 32}  # crop_on_device canvas side: the 224 px set's photos are at most 500 px
STAGES = (
    "decode",
    "decode_crop",
    "decode_crop_resize",
    "decode_crop_resize_flip_clip",
    "host_part_on_device_mode",
    "host_colour_no_randaugment",
    "host_colour_randaugment",
    "alternative_decode_crop_resize_bilinear",
    "host_part_on_device_mode_batched",
    "host_colour_no_randaugment_batched",
)
# Stages that output the whole views (batched into numpy, as the pipeline does) instead of per-view means.
FULL_OUTPUT = {"host_part_on_device_mode_batched": "uint8", "host_colour_no_randaugment_batched": "float32"}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="few images and batches (for the tests)")
    p.add_argument("--cores", type=int, default=1, help="CPUs each worker is pinned to")
    p.add_argument("--repeats", type=int, default=2, help="round-robin rounds over the variants")
    p.add_argument("--batches", type=int, default=6, help="timed batches per measurement")
    p.add_argument("--images-per-batch", type=int, default=8)
    p.add_argument("--views-224", type=int, default=10)
    p.add_argument("--views-32", type=int, default=4)
    p.add_argument("--no-stages", action="store_true")
    p.add_argument("--data-dir", help="reuse / keep the generated image folder here")
    p.add_argument("--output", help="also write the JSON here")
    p.add_argument("--worker", help=argparse.SUPPRESS)  # internal: JSON job spec
    args = p.parse_args(argv)
    if args.quick:
        args.repeats, args.batches, args.images_per_batch = 1, 2, 4
    return args


# ----------------------------------------------------------------------------------------------
# The dataset.


def make_dataset(root: str, *, quick: bool, min_eval_images: int) -> dict[str, Any]:
    """Writes <root>/{224,32}/{train,validation}/<class>/*.{jpg,png}; returns a description."""
    import warnings

    import numpy as np
    from PIL import Image

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import skimage.data

    rng = np.random.default_rng(0)
    photos = COLOUR_PHOTOS[:4] if quick else COLOUR_PHOTOS
    crops_per_photo = 1 if quick else 3
    sizes, jpeg_bytes = [], []
    for index, name in enumerate(photos):
        image = getattr(skimage.data, name)()[..., :3]
        pil = Image.fromarray(image)
        variants = [pil]
        h, w = image.shape[:2]
        for _ in range(crops_per_photo):
            ch, cw = int(h * rng.uniform(0.5, 0.9)), int(w * rng.uniform(0.5, 0.9))
            y, x = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
            variants.append(pil.crop((x, y, x + cw, y + ch)))
        for j, im in enumerate(variants):
            scale = 500.0 / max(im.size)  # ImageNet-like: longer side 500 px
            big = im.resize((max(1, round(im.size[0] * scale)), max(1, round(im.size[1] * scale))), Image.BICUBIC)
            small = im.resize((32, 32), Image.BICUBIC)
            for px, im_px, ext in (("224", big, "jpg"), ("32", small, "png")):
                folder = os.path.join(root, px, "train", f"class_{index % 4}")
                os.makedirs(folder, exist_ok=True)
                path = os.path.join(folder, f"{name}_{j}.{ext}")
                if ext == "jpg":
                    im_px.save(path, quality=90)
                else:
                    im_px.save(path)
                if ext == "jpg":
                    sizes.append(big.size)
                    jpeg_bytes.append(os.path.getsize(path))
    # The evaluation split repeats the training files so that one pass covers every timed batch.
    train_files = sorted(
        os.path.join(dp, f)
        for px in ("224", "32")
        for dp, _, fs in os.walk(os.path.join(root, px, "train"))
        for f in fs
    )
    per_size = len(train_files) // 2
    copies = -(-min_eval_images // per_size)
    for path in train_files:
        target_dir = os.path.dirname(path).replace(os.sep + "train" + os.sep, os.sep + "validation" + os.sep)
        os.makedirs(target_dir, exist_ok=True)
        stem, ext = os.path.splitext(os.path.basename(path))
        for c in range(copies):
            shutil.copyfile(path, os.path.join(target_dir, f"{stem}_copy{c}{ext}"))
    return {
        "images": len(sizes),
        "source": "skimage.data colour photos " + ", ".join(photos) + f" + {crops_per_photo} random crops each",
        "jpeg_quality": 90,
        "mean_jpeg_kb": round(sum(jpeg_bytes) / len(jpeg_bytes) / 1024, 1),
        "mean_size_wh": [round(statistics.mean(s[0] for s in sizes)), round(statistics.mean(s[1] for s in sizes))],
        "eval_images": per_size * copies,
        "root": root,
        "small_format": "32x32 PNG",
    }


# ----------------------------------------------------------------------------------------------
# Workers (one pinned process per measurement).


def _pin(cores: int) -> list[int]:
    available = sorted(os.sched_getaffinity(0))
    chosen = available[-cores:] if cores <= len(available) else available
    os.sched_setaffinity(0, set(chosen))
    return chosen


def worker(specs: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Runs the measurements one after the other in this (fresh) process, pinned first: the pinning
    must precede TensorFlow's start so that its thread pools are sized for the pinned cores."""
    import gc

    cores = {spec["cores"] for spec in specs.values()}
    assert len(cores) == 1, cores
    cpus = _pin(cores.pop())
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(len(cpus))
    tf.config.threading.set_inter_op_parallelism_threads(len(cpus))
    tf.config.set_visible_devices([], "GPU")
    results = {}
    for name, spec in specs.items():
        print(f"  worker: {name}", file=sys.stderr, flush=True)
        run = {"stage": _run_stage, "device": _run_device, "pipeline": _run_pipeline}[spec["kind"]]
        out = run(spec, tf)
        out["cpus"] = cpus
        results[name] = out
        gc.collect()  # drops the finished iterator (and its tf.data threads) before the next measurement
    return results


def _config(spec: dict[str, Any]):
    from fnc_jax.config_base import pretrain_config

    c = pretrain_config()
    c.batch_size = spec["images_per_batch"]
    c.data.source = "image_folder"
    c.data.data_dir = spec["data_dir"]
    c.data.train_split, c.data.eval_split = "train", "validation"
    c.data.image_size = spec["image_size"]
    c.data.shuffle_buffer = 16
    c.views.support_size = spec["views"] - 2
    variant = spec["variant"]
    c.augment.use_randaugment = variant.endswith("_randaugment")
    c.augment.on_device = variant.startswith("pretrain_on_device_")
    c.augment.crop_on_device = variant.startswith("pretrain_on_device_crop")
    c.augment.canvas_size = CANVAS[spec["image_size"]]
    return c


def _time_iterator(make_iter, warmup: int, batches: int) -> dict[str, float]:
    """Build time, and wall and CPU seconds per batch after `warmup` batches.

    CPU seconds are this process's (all threads) `time.process_time()`: on a pinned worker they are the
    core-seconds the pipeline really used, unaffected by other processes queueing on the same core.
    """
    t = time.perf_counter()
    it = make_iter()
    build = time.perf_counter() - t
    for _ in range(warmup):
        next(it)
    t, c = time.perf_counter(), time.process_time()
    for _ in range(batches):
        next(it)
    wall, cpu = (time.perf_counter() - t) / batches, (time.process_time() - c) / batches
    del it
    return {"build_s": build, "wall_s_per_batch": wall, "cpu_s_per_batch": cpu, "cpu_utilisation": cpu / wall}


def _run_device(spec: dict[str, Any], tf) -> dict[str, Any]:
    """The device half of `augment.on_device` (augment_jax.pretrain_device_augment), jitted by XLA on this
    pinned CPU core: what the colour work costs once it is moved off the tf.data host path. On a photo
    (RandAugment's lookup tables and fills depend on the pixels), one view per image."""
    del tf
    import jax

    from fnc_jax.data import augment_jax, layout, randaugment_jax

    n, size = spec["images_per_batch"], spec["image_size"]
    key = jax.random.PRNGKey(0)
    if spec.get("canvas"):  # cut one view per canvas
        images, crops = jax.device_put(layout.random_canvases(n, 1, spec["canvas"]))
        cut = jax.jit(lambda x, c: augment_jax.crop_resize_views(x, c, size))
        fn = lambda x, k: cut(x, crops)  # noqa: E731
        cost = cut.lower(images, crops).compile().cost_analysis()
    else:
        images = jax.device_put(_photo_views(n, size))
        if spec.get("randaugment_only"):
            fn = jax.jit(randaugment_jax.batch_rand_augment)
        else:
            fn = jax.jit(
                lambda x, k: augment_jax.pretrain_device_augment(
                    x, k, color_on_device=spec["color_on_device"], randaugment=spec["randaugment"], blur=spec["blur"]
                )
            )
        cost = fn.lower(images, key).compile().cost_analysis()
    fn(images, key).block_until_ready()

    def batches():
        i = 0
        while True:
            i += 1
            yield fn(images, jax.random.fold_in(key, i)).block_until_ready()

    out = _time_iterator(batches, spec["warmup"], spec["batches"])
    out["images_per_cpu_s"] = n / out["cpu_s_per_batch"]
    out["images_per_wall_s"] = n / out["wall_s_per_batch"]
    out["flops_per_view"] = float(cost.get("flops", 0.0)) / n
    out["bytes_accessed_per_view"] = float(cost.get("bytes accessed", 0.0)) / n
    return out


def _photo_views(n: int, size: int):
    """n float32 [0, 1] views (n, size, size, 3): random crops of skimage's astronaut photo."""
    import warnings

    import numpy as np
    from PIL import Image

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import skimage.data

    photo, rng = skimage.data.astronaut(), np.random.default_rng(0)
    views = []
    for _ in range(n):
        side = int(rng.integers(size // 2, photo.shape[0] + 1))
        y, x = rng.integers(0, photo.shape[0] - side + 1, 2)
        crop = Image.fromarray(photo[y : y + side, x : x + side]).resize((size, size), Image.BICUBIC)
        views.append(np.asarray(crop, np.float32) / 255.0)
    return np.stack(views)


def _run_pipeline(spec: dict[str, Any], tf=None) -> dict[str, Any]:
    from fnc_jax.data import pipeline

    config = _config(spec)
    if spec["variant"] == "eval":  # one pass; the validation split holds enough images for the timed batches

        def make():
            return pipeline.eval_iterator(config, split="validation", process_index=0, process_count=1)
    else:

        def make():
            return pipeline.pretrain_iterator(config, process_index=0, process_count=1)

    out = _time_iterator(make, spec["warmup"], spec["batches"])
    out["images_per_cpu_s"] = spec["images_per_batch"] / out["cpu_s_per_batch"]
    out["images_per_wall_s"] = spec["images_per_batch"] / out["wall_s_per_batch"]
    return out


def _run_stage(spec: dict[str, Any], tf) -> dict[str, Any]:
    """Cumulative host work per image (V views) on in-memory JPEG bytes, with augment's own functions."""
    import glob

    from fnc_jax.data import augment

    files = sorted(glob.glob(os.path.join(spec["data_dir"], "train", "*", "*.jpg")))
    encoded = [tf.io.read_file(f).numpy() for f in files]
    size, views, stage = spec["image_size"], spec["views"], spec["stage"]

    def views_of(image, seed):
        def one(view_seed):
            if stage == "decode_crop":  # box sampling + slice + float conversion, no resize
                begin, crop_size = augment.sample_crop_box(tf.shape(image), augment.view_seeds(view_seed).crop)
                crop = tf.image.convert_image_dtype(tf.slice(image, begin, crop_size), tf.float32)
                return tf.reduce_mean(crop, axis=[0, 1])
            if stage == "alternative_decode_crop_resize_bilinear":  # what a cheaper resize kernel would cost
                begin, crop_size = augment.sample_crop_box(tf.shape(image), augment.view_seeds(view_seed).crop)
                crop = tf.image.convert_image_dtype(tf.slice(image, begin, crop_size), tf.float32)
                view = tf.image.resize(crop, (size, size), method="bilinear", antialias=False)
                return tf.reduce_mean(view, axis=[0, 1])
            if stage.startswith("decode_crop_resize"):
                seeds = augment.view_seeds(view_seed)
                view = augment.random_resized_crop(image, seeds.crop, size=size)
                if stage == "decode_crop_resize_flip_clip":  # the float host path before any colour work
                    view = tf.clip_by_value(augment.random_flip(view, seeds.flip), 0.0, 1.0)
            else:
                view = augment.pretrain_view(
                    image,
                    view_seed,
                    image_size=size,
                    use_randaugment=stage == "host_colour_randaugment",
                    color_on_device=stage.startswith("host_part_on_device_mode"),
                )
            view = tf.ensure_shape(view, (size, size, 3))
            if stage in FULL_OUTPUT:  # the whole view leaves the map, as in the pipeline
                return view
            return tf.reduce_mean(tf.cast(view, tf.float32), axis=[0, 1])  # computed, not copied

        out_spec = tf.TensorSpec((3,), tf.float32)
        if stage in FULL_OUTPUT:
            out_spec = tf.TensorSpec((size, size, 3), tf.dtypes.as_dtype(FULL_OUTPUT[stage]))
        seeds = tf.map_fn(
            lambda v: tf.random.experimental.stateless_fold_in(seed, v),
            tf.range(views, dtype=tf.int64),
            fn_output_signature=tf.TensorSpec((2,), tf.int64),
        )
        return tf.map_fn(one, seeds, fn_output_signature=out_spec)

    @tf.autograph.experimental.do_not_convert
    def work(position, data):
        image = tf.io.decode_image(data, channels=3, expand_animations=False)
        image.set_shape([None, None, 3])
        if stage == "decode":
            return tf.cast(image[0, 0], tf.float32)  # forces the decode, outputs almost nothing
        seed = tf.stack([position, tf.constant(7, tf.int64)])
        return views_of(image, seed)  # (V, 3) per-view means (every view is computed), or the views

    dataset = (
        tf.data.Dataset.from_tensor_slices(encoded)
        .repeat()
        .enumerate()
        .map(work, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
        .batch(spec["images_per_batch"])
        .prefetch(tf.data.AUTOTUNE)
    )
    options = tf.data.Options()
    options.threading.private_threadpool_size = spec["cores"]
    options.threading.max_intra_op_parallelism = 1
    dataset = dataset.with_options(options)
    out = _time_iterator(lambda: dataset.as_numpy_iterator(), spec["warmup"], spec["batches"])
    out["images_per_cpu_s"] = spec["images_per_batch"] / out["cpu_s_per_batch"]
    out["images_per_wall_s"] = spec["images_per_batch"] / out["wall_s_per_batch"]
    return out


def run_worker(spec: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    env = dict(os.environ)
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    env["CUDA_VISIBLE_DEVICES"] = ""
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.input_pipeline", "--worker", json.dumps(spec)],
        cwd=common.REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"worker {spec} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------------------------


def main(argv=None) -> dict[str, Any]:
    args = parse_args(argv)
    t_start = time.time()
    calibration = common.matmul_rate()
    shm = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None
    root = args.data_dir or tempfile.mkdtemp(prefix="fnc_input_bench_", dir=shm)
    try:
        if not os.path.isdir(os.path.join(root, "224")):
            common.log(f"writing the JPEG/PNG dataset to {root}")
            warm = 1 if args.quick else 2
            need = max(
                (warm + args.batches) * args.images_per_batch, (warm + 2 * args.batches) * 4 * args.images_per_batch
            )
            data = make_dataset(root, quick=args.quick, min_eval_images=need)
        else:
            data = {"root": root, "reused": True}
        base = {
            "cores": args.cores,
            "images_per_batch": args.images_per_batch,
            "batches": args.batches,
            "warmup": 1 if args.quick else 2,
        }
        specs: dict[str, dict[str, Any]] = {}
        for v in VARIANTS_224:
            specs[f"224px/{v}"] = {
                **base,
                "kind": "pipeline",
                "variant": v,
                "image_size": 224,
                "views": args.views_224,
                "data_dir": os.path.join(root, "224"),
            }
        for v in VARIANTS_32:
            specs[f"32px/{v}"] = {
                **base,
                "kind": "pipeline",
                "variant": v,
                "image_size": 32,
                "views": args.views_32,
                "data_dir": os.path.join(root, "32"),
                "images_per_batch": args.images_per_batch * 4,
                "batches": args.batches * 2,
            }
        device_parts = (
            ("colour_jitter_grayscale", True, False, False),
            ("colour_jitter_randaugment_grayscale", True, True, False),
            ("blur", False, False, True),
        )
        for name, colour, randaugment, blur in device_parts:
            specs[f"device/{name}"] = {
                **base,
                "kind": "device",
                "image_size": 224,
                "color_on_device": colour,
                "randaugment": randaugment,
                "blur": blur,
                "images_per_batch": 16,
            }
        specs["device/randaugment"] = {
            **base,
            "kind": "device",
            "image_size": 224,
            "randaugment_only": True,
            "images_per_batch": 16,
        }
        specs["device/crop_resize"] = {
            **base,
            "kind": "device",
            "image_size": 224,
            "canvas": CANVAS[224],
            "images_per_batch": 16,
        }
        if not args.no_stages:
            for s in STAGES:
                specs[f"stages/{s}"] = {
                    **base,
                    "kind": "stage",
                    "stage": s,
                    "image_size": 224,
                    "views": args.views_224,
                    "data_dir": os.path.join(root, "224"),
                }
        runs: dict[str, list[dict[str, Any]]] = {k: [] for k in specs}
        for r in range(args.repeats):
            common.log(f"round {r + 1}/{args.repeats}: {len(specs)} measurements in one pinned worker")
            for name, out in run_worker(specs).items():
                runs[name].append(out)
    finally:
        if not args.data_dir:
            shutil.rmtree(root, ignore_errors=True)

    def summary(name: str) -> dict[str, Any]:
        rs = runs[name]
        spec = specs[name]
        cores = len(rs[0]["cpus"])
        views = 1 if spec.get("variant") == "eval" or spec["kind"] == "device" else spec["views"]
        per_cpu = statistics.median(x["images_per_cpu_s"] for x in rs)
        wall = statistics.median(x["images_per_wall_s"] for x in rs)
        out = {
            "image_size": spec["image_size"],
            "views_per_image": views,  # device kind: one "image" = one view
            "images_per_batch": spec["images_per_batch"],
            "timed_batches": spec["batches"],
            "cpus": rs[0]["cpus"],
            # Per core = per CPU-second of the pinned worker (see units).
            "images_per_s_per_core": per_cpu,
            "images_per_s_wall": wall,
            "cpu_utilisation_of_pinned_cores": statistics.median(x["cpu_utilisation"] for x in rs) / cores,
            "images_per_s_per_core_runs": [round(x["images_per_cpu_s"], 3) for x in rs],
            "pipeline_build_s": round(statistics.median(x["build_s"] for x in rs), 2),
        }
        if spec["kind"] in ("pipeline", "device"):
            out["views_per_s_per_core"] = per_cpu * views
            out["views_per_s_wall"] = wall * views
        else:
            out["ms_per_image_per_core"] = 1000 / per_cpu
        return out

    pipelines = {k: summary(k) for k in specs if specs[k]["kind"] == "pipeline"}
    device = {}
    for k in specs:
        if specs[k]["kind"] == "device":
            d = summary(k)
            d["ms_per_view_per_core"] = 1000 / d["images_per_s_per_core"]
            d["flops_per_view"] = runs[k][0]["flops_per_view"]
            d["bytes_accessed_per_view"] = runs[k][0]["bytes_accessed_per_view"]
            device[k.split("/", 1)[1]] = d
    ratios = {}
    for px in ("224px", "32px"):

        def vps(v, px=px):
            return pipelines[f"{px}/{v}"]["views_per_s_per_core"]

        on = vps("pretrain_on_device_colour")
        ratios[f"{px}/on_device_over_host"] = on / vps("pretrain_host")
        ratios[f"{px}/on_device_over_host_randaugment"] = on / vps("pretrain_host_randaugment")
        ratios[f"{px}/host_over_host_randaugment"] = vps("pretrain_host") / vps("pretrain_host_randaugment")
        ratios[f"{px}/crop_on_device_over_host"] = vps("pretrain_on_device_crop") / vps("pretrain_host")
        ratios[f"{px}/crop_on_device_over_on_device"] = vps("pretrain_on_device_crop") / on
        official = vps("pretrain_host_randaugment")
        ratios[f"{px}/official_recipe_on_device_over_host"] = vps("pretrain_on_device_colour_randaugment") / official
        ratios[f"{px}/official_recipe_crop_on_device_over_host"] = vps("pretrain_on_device_crop_randaugment") / official

    def host_ms_per_view(variant: str) -> float:
        return 1000 / pipelines[f"224px/{variant}"]["views_per_s_per_core"]

    crop_ms = host_ms_per_view("pretrain_on_device_crop_randaugment")
    official_recipe = {
        "host_cpu_ms_per_view_224px": {
            "host (RandAugment on the host)": host_ms_per_view("pretrain_host_randaugment"),
            "augment.on_device": host_ms_per_view("pretrain_on_device_colour_randaugment"),
            "augment.crop_on_device": crop_ms,
            "host, no RandAugment (not the recipe)": host_ms_per_view("pretrain_host"),
        },
        "target_crop_on_device_host_ms_per_view": TARGET_CROP_ON_DEVICE_HOST_MS_PER_VIEW,
        "crop_on_device_meets_target": crop_ms <= TARGET_CROP_ON_DEVICE_HOST_MS_PER_VIEW,
        "device_ms_per_view_on_this_cpu": {
            name: device[name]["ms_per_view_per_core"]
            for name in ("colour_jitter_grayscale", "randaugment", "colour_jitter_randaugment_grayscale", "crop_resize")
        },
        "note": "host CPU-ms per view = CPU time of the pinned worker per view, one run for all rows; the device "
        "rows are the jitted device parts on one pinned core of this CPU (not the accelerator's cost)",
    }
    result: dict[str, Any] = {
        "benchmark": "input_pipeline",
        "quick": args.quick,
        "machine": common.machine(),
        "command": "python -m benchmarks.input_pipeline " + " ".join(sys.argv[1:] if argv is None else argv),
        "units": {
            "throughput": "views/s and images/s per core = per CPU-second used by the worker pinned to the "
            "cores (process_time over the timed batches), so other processes sharing the core do not count; "
            "*_wall = per wall-clock second on the pinned cores as the machine was loaded",
            "time": "seconds; stages in ms of CPU time per image (V views)",
        },
        "dataset": data,
        "settings": {
            "cores_per_worker": args.cores,
            "repeats": args.repeats,
            "views": {"224px": args.views_224, "32px": args.views_32},
            "tf_threading": "intra/inter-op = cores; process pinned with sched_setaffinity",
        },
        "pipelines": pipelines,
        "ratios": ratios,
        "official_recipe": official_recipe,
        "device_side_on_this_cpu": {
            **device,
            "note": "augment_jax.pretrain_device_augment (crop_resize: augment_jax.crop_resize_views from a 512 px "
            "canvas) jitted by XLA on one pinned CPU core, 224 px, per view: the work augment.on_device "
            "(crop_on_device) adds to the train step; on an accelerator these are a few memory-bound passes "
            "(flops and bytes from XLA's cost analysis). Blur runs on the device in every mode.",
        },
        "target": {"on_device_over_host_views_per_core": 3.0},
    }
    if not args.no_stages:
        stages = {s: summary(f"stages/{s}") for s in STAGES}
        v = args.views_224
        ms = {s: stages[s]["ms_per_image_per_core"] for s in STAGES}
        marginal = {
            "decode_per_image": ms["decode"],
            "crop_sample_slice_per_view": (ms["decode_crop"] - ms["decode"]) / v,
            "bicubic_resize_per_view": (ms["decode_crop_resize"] - ms["decode_crop"]) / v,
            "flip_clip_per_view": (ms["decode_crop_resize_flip_clip"] - ms["decode_crop_resize"]) / v,
            "colour_jitter_grayscale_per_view": (ms["host_colour_no_randaugment"] - ms["decode_crop_resize_flip_clip"])
            / v,
            "randaugment_per_view": (ms["host_colour_randaugment"] - ms["host_colour_no_randaugment"]) / v,
        }
        marginal["alternative_bilinear_resize_per_view"] = (
            ms["alternative_decode_crop_resize_bilinear"] - ms["decode_crop"]
        ) / v
        marginal["uint8_views_out_batched_per_view_on_device_mode"] = (
            ms["host_part_on_device_mode_batched"] - ms["host_part_on_device_mode"]
        ) / v
        marginal["float32_views_out_batched_per_view_host_colour"] = (
            ms["host_colour_no_randaugment_batched"] - ms["host_colour_no_randaugment"]
        ) / v
        per_view_on_device = ms["host_part_on_device_mode"] / v
        per_view_host = ms["host_colour_no_randaugment"] / v
        result["stages_224px"] = {
            "views_per_image": v,
            "cumulative": stages,
            "marginal_ms_per_core": marginal,
            "host_ms_per_view_on_device_mode": per_view_on_device,
            "host_ms_per_view_host_colour": per_view_host,
            "stage_speedup_on_device_over_host": per_view_host / per_view_on_device,
            "stage_speedup_on_device_over_host_batched_output": ms["host_colour_no_randaugment_batched"]
            / ms["host_part_on_device_mode_batched"],
            "method": "tf.data over in-memory JPEG bytes, map(decode + V views via tf.map_fn as in the pipeline), "
            "outputs reduced to per-view means so no batch copy is timed; marginal = difference of cumulative "
            "stages, per view (decode per image: it is shared by the V views).",
        }
    result["speed_calibration"] = common.speed_calibration(calibration)
    result["wall_s"] = round(time.time() - t_start, 1)
    return result


if __name__ == "__main__":
    if "--worker" in sys.argv:
        specs = json.loads(sys.argv[sys.argv.index("--worker") + 1])
        print(json.dumps(worker(specs)), flush=True)
    else:
        res = main()
        out = sys.argv[sys.argv.index("--output") + 1] if "--output" in sys.argv else None
        common.emit(res, out)
