"""End-to-end tests of the evaluation modes (`fnc_jax.evaluate.run`) from a tiny pretraining checkpoint.

The module fixture writes a pretraining workdir in exactly the format `pretrain.run` leaves behind
(`config.json` + orbax saves of a `step.TrainState` through `checkpoints.Checkpoints`), for a 1/4-width
ResNet-18 at 28 px in memory mode, with perturbed parameters and BatchNorm statistics so that restored
values can never be mistaken for a fresh initialisation. Compiling the real pretraining step costs
~2 min on 2 CPU cores, so the real `pretrain.run` → `python -m fnc_jax.main` path has its own slow
test. The modes read a tiny TFDS dataset (real TFDS builder, split slicing) made of embedded digits.
"""

import dataclasses
import functools
import importlib.util
import json
import pathlib
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from fnc_jax import checkpoints, evaluate, optim, parallel, pretrain, step
from fnc_jax.data import sources
from fnc_jax.evaluation import classification, features, representation, restore, starting_variables
from fnc_jax.models import factory

REPO = pathlib.Path(__file__).resolve().parents[2]
TINY_NAME = "fnc_eval_tiny_digits"
NUM_TRAIN, NUM_TEST = 256, 128


def load_config(name: str, arg: str | None = None):
    spec = importlib.util.spec_from_file_location(f"config_{name}", REPO / "configs" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg) if arg else module.get_config()


def tiny_pretrain_config():
    c = load_config("default")
    c.batch_size = 32
    c.total_steps = 2
    c.checkpoint_every_steps = 1
    c.log_every_steps = 1
    c.memory.multiplier = 4  # memory mode, so the checkpoint also holds an EMA network and a queue
    c.eval.final_report = False
    return c


@dataclasses.dataclass
class Pretrained:
    workdir: pathlib.Path
    config: object
    state: dict  # host copy of the saved TrainState at the latest step


def _random_leaf(path, leaf, rng):
    """A random value for one leaf of the abstract TrainState: He-scaled kernels, BN-like statistics."""
    name = str(getattr(path[-1], "key", getattr(path[-1], "name", path[-1])))
    shape, dtype = leaf.shape, leaf.dtype
    if not jnp.issubdtype(dtype, jnp.floating):
        return np.zeros(shape, dtype)
    if name == "kernel":
        value = rng.standard_normal(shape) / np.sqrt(np.prod(shape[:-1]))
    elif name == "var":
        value = rng.uniform(0.5, 1.5, shape)
    elif name == "scale":
        value = 1.0 + 0.1 * rng.standard_normal(shape)
    else:  # BN bias and mean, optimiser slots, the queue
        value = 0.1 * rng.standard_normal(shape)
    return value.astype(dtype)


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory) -> Pretrained:
    """A pretraining workdir in the format `pretrain.run` writes, without compiling anything.

    The saved tree has the exact structure of `step.init_state` (shapes from `jax.eval_shape`), filled
    with random values whose moving statistics differ from a fresh initialisation, and a distinct EMA
    network; steps 1 and 2 are saved.
    """
    config = tiny_pretrain_config()
    workdir = tmp_path_factory.mktemp("pretrain")
    model, ema_model = factory.contrastive_model(config, 10), factory.contrastive_model(config, 0)
    abstract_params = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((2, 28, 28, 3)), train=False))
    tx = optim.create_optimizer(
        name="lars",
        schedule=0.1,
        weight_decay=1e-4,
        momentum=0.9,
        trust_coefficient=1e-3,
        params=abstract_params["params"],
    )
    abstract = jax.eval_shape(functools.partial(step.init_state, config, model, ema_model, tx))
    rng = np.random.default_rng(0)
    state = jax.tree_util.tree_map_with_path(lambda path, leaf: _random_leaf(path, leaf, rng), abstract)
    state = state.replace(memory_labels=np.full(abstract.memory_labels.shape, -1, np.int32))
    checkpoints.record_config(workdir, config.to_dict(), start_over=False)
    store = checkpoints.Checkpoints(workdir / "checkpoints", keep=3)
    store.save(1, state.replace(step=np.asarray(1, np.int32)))
    store.save(2, state.replace(step=np.asarray(2, np.int32)))
    store.wait()
    store.close()
    host = {k: getattr(state, k) for k in ("params", "batch_stats", "ema_params", "ema_batch_stats")}
    return Pretrained(workdir, config, host)


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory) -> str:
    """A prepared TFDS dataset of 256 train / 128 test embedded digits (28 x 28 x 3, 10 classes)."""
    data_dir = tmp_path_factory.mktemp("tfds")
    images, labels = sources._mnist_split("train")
    test_images, test_labels = sources._mnist_split("test")

    def split(x, y, n):
        return tf.data.Dataset.from_tensor_slices({"image": x[:n], "label": y[:n].astype(np.int64)})

    builder = tfds.dataset_builders.TfDataBuilder(
        name=TINY_NAME,
        version="1.0.0",
        split_datasets={"train": split(images, labels, NUM_TRAIN), "test": split(test_images, test_labels, NUM_TEST)},
        features=tfds.features.FeaturesDict(
            {"image": tfds.features.Image(shape=(28, 28, 3)), "label": tfds.features.ClassLabel(num_classes=10)}
        ),
        data_dir=str(data_dir),
    )
    builder.download_and_prepare()
    return str(data_dir)


def eval_config(name: str, pretrained: Pretrained, data_dir: str, arg: str | None = None):
    c = load_config(name, arg)
    c.pretrained.workdir = str(pretrained.workdir)
    c.data.source = "tfds"
    c.data.name = TINY_NAME
    c.data.data_dir = data_dir
    c.data.train_split = "train"
    c.data.eval_split = "test"
    c.batch_size = 32
    c.eval.batch_size = 64
    c.checkpoint_every_steps = 1000  # only the final save
    c.log_every_steps = 4
    return c


def saved_tree(step_dir: pathlib.Path) -> dict:
    """The raw saved tree of a checkpoint step, as numpy arrays."""
    tree = restore.read_tree_metadata(step_dir)
    args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
    return ocp.PyTreeCheckpointer().restore(step_dir / "default", args=ocp.args.PyTreeRestore(restore_args=args))


def same(a, b) -> bool:
    return jax.tree.structure(a) == jax.tree.structure(b) and all(
        np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))
    )


# ---------------------------------------------------------------------------------------------------
# Restore rules.


def test_find_checkpoint_latest_explicit_and_errors(pretrained, tiny_data):
    c = eval_config("default_linear_eval", pretrained, tiny_data)
    source = restore.find_checkpoint(c.pretrained)
    assert source.step == 2 and source.step_dir == pretrained.workdir / "checkpoints" / "2"
    assert source.run_config["model"]["width_multiplier"] == 0.25
    c.pretrained.step = 1
    assert restore.find_checkpoint(c.pretrained).step == 1
    c.pretrained.step = 5
    with pytest.raises(ValueError, match=r"config.pretrained.step=5 .* one of \[1, 2\]"):
        restore.find_checkpoint(c.pretrained)
    c.pretrained.step, c.pretrained.workdir = -1, ""
    c.pretrained.checkpoint = str(pretrained.workdir / "checkpoints" / "1")
    assert restore.find_checkpoint(c.pretrained).step == 1
    c.pretrained.checkpoint = str(pretrained.workdir)
    with pytest.raises(FileNotFoundError, match="config.pretrained.checkpoint="):
        restore.find_checkpoint(c.pretrained)
    c.pretrained.checkpoint, c.pretrained.workdir = "", str(pretrained.workdir / "nothing")
    with pytest.raises(FileNotFoundError, match="config.pretrained.workdir=.*no complete checkpoint"):
        restore.find_checkpoint(c.pretrained)


def test_a_relative_pretrained_path_restores_like_an_absolute_one(pretrained, tiny_data, monkeypatch):
    # orbax returns no tree metadata through a relative path; the network must still load.
    monkeypatch.chdir(pretrained.workdir.parent)
    c = eval_config("default_linear_eval", pretrained, tiny_data)
    for field, value in (
        ("workdir", pretrained.workdir.name),
        ("checkpoint", f"{pretrained.workdir.name}/checkpoints/2"),
    ):
        c.pretrained.workdir, c.pretrained.checkpoint = "", ""
        c.pretrained[field] = value
        source = restore.find_checkpoint(c.pretrained)
        assert source.step_dir == pretrained.workdir / "checkpoints" / "2", field
        assert "params" in restore.read_tree_metadata(source.step_dir), field


def test_model_mismatch_is_refused_before_compiling(pretrained, tiny_data):
    c = eval_config("default_linear_eval", pretrained, tiny_data)
    c.model.width_multiplier = 0.5
    with pytest.raises(ValueError, match=r"config.model.width_multiplier=0.5 does not match .* allowed is 0.25"):
        evaluate.run(c, str(pretrained.workdir.parent / "mismatch"))
    c.model.width_multiplier = 0.25
    c.model.stem = "cifar"
    with pytest.raises(
        ValueError,
        match=r"config.model.stem='cifar' .* selects the cifar ResNet stem .* allowed is model.stem='imagenet'",
    ):
        evaluate.run(c, str(pretrained.workdir.parent / "mismatch"))


def test_restore_rules_per_mode(pretrained, tiny_data):
    mesh = parallel.create_mesh()
    ckpt = pretrained.state

    # Linear evaluation: the encoder only (no projection head in the network), a zero head.
    c = eval_config("default_linear_eval", pretrained, tiny_data)
    source = restore.find_checkpoint(c.pretrained)
    model = factory.classifier_model(c, 10)
    variables, report = starting_variables.initial_variables(c, model, source, mesh)
    assert report["restored"] == ["params/encoder", "batch_stats/encoder"]
    assert report["initialised"] == ["params/head"]
    for name in (
        "params/probe",
        "params/projection_head",
        "batch_stats/projection_head",
        "step",
        "opt_state",
        "ema_params",
        "ema_batch_stats",
        "memory",
        "memory_labels",
        "rng",
    ):
        assert name in report["not_read"], name
    assert set(variables["params"]) == {"encoder", "head"}
    assert same(variables["params"]["encoder"], ckpt["params"]["encoder"])
    assert same(variables["batch_stats"]["encoder"], ckpt["batch_stats"]["encoder"])
    assert not np.any(np.asarray(variables["params"]["head"]["dense"]["kernel"]))
    assert not np.any(np.asarray(variables["params"]["head"]["dense"]["bias"]))
    assert variables["params"]["encoder"]["stem_conv"]["kernel"].sharding.is_fully_replicated

    # Fine-tuning: encoder and projection head (parameters and statistics), a zero head.
    c = eval_config("default_finetune", pretrained, tiny_data)
    variables, report = starting_variables.initial_variables(c, factory.classifier_model(c, 10), source, mesh)
    assert report["restored"] == [
        "params/encoder",
        "params/projection_head",
        "batch_stats/encoder",
        "batch_stats/projection_head",
    ]
    assert report["initialised"] == ["params/head"]
    assert "params/probe" in report["not_read"] and "params/projection_head" not in report["not_read"]
    assert same(variables["params"]["projection_head"], ckpt["params"]["projection_head"])
    assert same(variables["batch_stats"]["projection_head"], ckpt["batch_stats"]["projection_head"])

    # The EMA network of a memory-mode run, on request.
    c.pretrained.network = "ema"
    variables, report = starting_variables.initial_variables(c, factory.classifier_model(c, 10), source, mesh)
    assert same(variables["params"]["encoder"], ckpt["ema_params"]["encoder"])
    assert not same(variables["params"]["encoder"], ckpt["params"]["encoder"])
    assert "params" in report["not_read"] and "ema_params" not in report["not_read"]


def test_random_init_baseline_restores_nothing(pretrained, tiny_data):
    c = eval_config("default_finetune", pretrained, tiny_data)
    c.pretrained.workdir, c.pretrained.allow_random_init = "", True
    variables, report = starting_variables.initial_variables(
        c, factory.classifier_model(c, 10), restore.PretrainedSource(None, None, None), parallel.create_mesh()
    )
    assert report["restored"] == [] and "params/encoder" in report["initialised"] and report["checkpoint"] is None
    assert not same(variables["params"]["encoder"], pretrained.state["params"]["encoder"])
    assert not np.any(np.asarray(variables["params"]["head"]["dense"]["kernel"]))


def test_merge_names_the_mismatching_variable():
    abstract = {
        "params": {
            "encoder": {"conv": {"kernel": jax.ShapeDtypeStruct((3, 3, 3, 8), jnp.float32)}},
            "head": {"dense": {"kernel": jax.ShapeDtypeStruct((8, 2), jnp.float32)}},
        }
    }
    fresh = {"params": {"head": {"dense": {"kernel": jnp.zeros((8, 2))}}}}
    saved = {"params": {"encoder": {"conv": {"kernel": jnp.ones((7, 7, 3, 8))}}}}
    with pytest.raises(
        ValueError,
        match=r"params/encoder/conv/kernel: the network has shape \(3, 3, 3, 8\), the checkpoint shape \(7, 7, 3, 8\)",
    ):
        restore.merge_pretrained(abstract, fresh, saved, restored_modules=("encoder",))
    with pytest.raises(ValueError, match="The checkpoint has no params/encoder"):
        restore.merge_pretrained(abstract, fresh, {"params": {}}, restored_modules=("encoder",))


def test_trainable_prefixes_and_schedule():
    assert classification.trainable_prefixes(
        "linear_eval", ft_proj_selector=0, proj_layers=3, train_projection=False
    ) == (("head",),)
    assert classification.trainable_prefixes("finetune", ft_proj_selector=1, proj_layers=3, train_projection=False) == (
        ("encoder",),
        ("head",),
    )
    assert classification.trainable_prefixes("finetune", ft_proj_selector=1, proj_layers=3, train_projection=True) == (
        ("encoder",),
        ("head",),
        ("projection_head", "dense_0"),
        ("projection_head", "bn_0"),
    )
    assert (
        len(classification.trainable_prefixes("finetune", ft_proj_selector=-1, proj_layers=3, train_projection=True))
        == 8
    )
    reference = optim.learning_rate_schedule(base_lr=0.3, batch_size=1, scaling="none", warmup_steps=3, total_steps=11)
    hparams = classification.make_hparams(learning_rate=0.3, weight_decay=0.0, warmup_steps=3, total_steps=11)
    steps = jnp.arange(14)
    np.testing.assert_allclose(classification.learning_rate_at(steps, hparams), reference(steps), rtol=1e-6, atol=1e-7)


# ---------------------------------------------------------------------------------------------------
# Modes, end to end.


def test_linear_eval_end_to_end(pretrained, tiny_data, tmp_path):
    c = eval_config("default_linear_eval", pretrained, tiny_data)
    c.total_steps = 24
    c.optim.base_lr = 0.05  # 10x the recipe: a handful of steps on random features
    workdir = tmp_path / "linear"
    results = evaluate.run(c, str(workdir))
    on_disk = json.loads((workdir / "results.json").read_text())
    assert on_disk["eval"] == results["eval"] and (workdir / "config.json").exists()
    assert results["protocol"]["trained"] == ["head"] and "inference" in results["protocol"]["batchnorm"]
    assert results["steps"] == 24 and not results["preempted"]
    assert results["hparams"]["learning_rate"] == pytest.approx(0.05 * np.sqrt(32))
    assert results["eval"]["num_examples"] == NUM_TEST
    assert results["eval"]["top1"] > 0.2, results["eval"]  # chance: 0.1
    assert results["eval"]["top5"] >= results["eval"]["top1"]
    assert any(workdir.glob("events.out.tfevents*"))

    # The frozen network is bit-identical after training (parameters and moving statistics); the head learned.
    final = saved_tree(workdir / "checkpoints" / "24")
    assert same(final["params"]["encoder"], pretrained.state["params"]["encoder"])
    assert same(final["batch_stats"]["encoder"], pretrained.state["batch_stats"]["encoder"])
    assert np.any(final["params"]["head"]["dense"]["kernel"])

    history = json.loads((workdir / "train_history.json").read_text())["history"]
    assert [h["step"] for h in history] == [4, 8, 12, 16, 20, 24]

    # A second run in the same workdir resumes the finished run: nothing retrained, same numbers.
    again = evaluate.run(c, str(workdir))
    assert again["eval"] == results["eval"] and again["final_train_metrics"] == results["final_train_metrics"]
    assert again["pretrained"] == results["pretrained"]
    assert json.loads((workdir / "train_history.json").read_text())["history"] == history


def _head_input(model, variables, images):
    """The input of the classifier `head` (captured with a Flax method interceptor)."""

    @jax.jit
    def run(variables, images):
        captured = {}

        def interceptor(next_fun, args, kwargs, context):
            if context.module.name == "head" and context.method_name == "__call__":
                captured["x"] = args[0]
            return next_fun(*args, **kwargs)

        with nn.intercept_methods(interceptor):
            model.apply(variables, images, train=False)
        return captured["x"]

    return np.asarray(run(variables, images))


def test_finetune_starts_from_projection_layer0(pretrained, tiny_data):
    """The classifier reads projection layer 0's post-ReLU output, computed with the restored weights."""
    c = eval_config("default_finetune", pretrained, tiny_data)
    mesh = parallel.create_mesh()
    source = restore.find_checkpoint(c.pretrained)
    model = factory.classifier_model(c, 10)
    variables, _ = starting_variables.initial_variables(c, model, source, mesh)
    images = sources._mnist_split("test")[0][:4].astype(np.float32) / 255.0
    head_input = _head_input(model, variables, images)
    ckpt = pretrained.state
    feats = jax.jit(factory.contrastive_model(c, 0).apply, static_argnames="train")(
        {
            "params": {k: ckpt["params"][k] for k in ("encoder", "projection_head")},
            "batch_stats": {k: ckpt["batch_stats"][k] for k in ("encoder", "projection_head")},
        },
        images,
        train=False,
    )["features"]
    p, s = ckpt["params"]["projection_head"], ckpt["batch_stats"]["projection_head"]
    h = np.asarray(feats) @ p["dense_0"]["kernel"]
    h = (h - s["bn_0"]["mean"]) / np.sqrt(s["bn_0"]["var"] + 1e-5) * p["bn_0"]["scale"] + p["bn_0"]["bias"]
    np.testing.assert_allclose(head_input, np.maximum(h, 0.0), rtol=1e-4, atol=1e-5)
    assert head_input.shape == (4, p["dense_0"]["kernel"].shape[1])


@pytest.mark.slow
def test_finetune_end_to_end(pretrained, tiny_data, tmp_path):
    """Compiling the fine-tuning step (a ResNet backward pass) takes 30-50 s on 2 CPU cores."""
    c = eval_config("default_finetune", pretrained, tiny_data)
    c.total_steps = 6
    c.log_every_steps = 1
    c.optim.base_lr = 0.05
    ckpt = pretrained.state
    workdir = tmp_path / "finetune"
    results = evaluate.run(c, str(workdir))
    assert results["protocol"]["trained"] == ["encoder", "head"] and "training" in results["protocol"]["batchnorm"]
    assert results["protocol"]["optimizer"] == "lars"
    losses = [h["loss"] for h in json.loads((workdir / "train_history.json").read_text())["history"]]
    assert len(losses) == 6 and losses[0] == pytest.approx(np.log(10), abs=1e-4)  # zero-initialised head
    assert losses[-1] < losses[0], losses
    assert 0.0 <= results["eval"]["top1"] <= 1.0 and results["eval"]["num_examples"] == NUM_TEST

    final = saved_tree(workdir / "checkpoints" / "6")
    assert not same(final["params"]["encoder"], ckpt["params"]["encoder"])
    assert not same(final["batch_stats"]["encoder"], ckpt["batch_stats"]["encoder"])
    assert np.any(final["params"]["head"]["dense"]["kernel"])
    # Official quirk: projection layer 0 is not trained, but its BatchNorm ran in training mode.
    assert same(final["params"]["projection_head"], ckpt["params"]["projection_head"])
    assert not same(final["batch_stats"]["projection_head"]["bn_0"], ckpt["batch_stats"]["projection_head"]["bn_0"])


def _brute_force_knn(train_x, train_y, test_x, test_y, k, temperature, num_classes=10):
    train_x = train_x / np.linalg.norm(train_x, axis=1, keepdims=True)
    test_x = test_x / np.linalg.norm(test_x, axis=1, keepdims=True)
    sims = test_x.astype(np.float64) @ train_x.T.astype(np.float64)
    top1 = top5 = 0
    for i in range(len(test_y)):
        nbrs = np.argsort(-sims[i], kind="stable")[:k]
        scores = np.zeros(num_classes)
        np.add.at(scores, train_y[nbrs], np.exp(sims[i, nbrs] / temperature))
        top1 += np.argmax(scores) == test_y[i]
        top5 += test_y[i] in np.argsort(-scores, kind="stable")[:5]
    return top1 / len(test_y), top5 / len(test_y)


def test_knn_matches_brute_force(pretrained, tiny_data, tmp_path):
    c = eval_config("default_knn", pretrained, tiny_data)
    results = evaluate.run(c, str(tmp_path / "knn"))
    assert results["num_train"] == NUM_TRAIN and results["num_test"] == NUM_TEST
    assert results["pretrained"]["restored"][:2] == ["params/encoder", "params/projection_head"]

    mesh = parallel.create_mesh()
    model = factory.contrastive_model(c)
    variables, _ = starting_variables.initial_variables(c, model, restore.find_checkpoint(c.pretrained), mesh)
    train_x, train_y = features.extract(model, variables, c, "train", mesh, batch_size=64)
    test_x, test_y = features.extract(model, variables, c, "test", mesh, batch_size=64)
    # The extracted features are the checkpoint network's pooled features of the eval-preprocessed digits.
    first = next(iter(sources.load_split(c.data, "test", process_index=0, process_count=1).batch(4)))
    direct = jax.jit(model.apply, static_argnames="train")(
        {
            "params": {k: pretrained.state["params"][k] for k in ("encoder", "projection_head")},
            "batch_stats": {k: pretrained.state["batch_stats"][k] for k in ("encoder", "projection_head")},
        },
        first["image"].numpy().astype(np.float32) / 255.0,
        train=False,
    )["features"]
    np.testing.assert_allclose(test_x[:4], direct, rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(test_y[:4], first["label"].numpy())
    for k in c.knn.ks:
        top1, top5 = _brute_force_knn(train_x, train_y, test_x, test_y, k, c.knn.temperature)
        assert results[f"knn_top1_k{k}"] == pytest.approx(top1, abs=1.01 / NUM_TEST)
        assert results[f"knn_top5_k{k}"] == pytest.approx(top5, abs=1.01 / NUM_TEST)


def _direct_fn_counts(embeddings, labels, batch_size, num_views, topk, threshold, aggregation):
    """(selected, true) false-negative counts by a plain loop over anchors (docs/method.md §4)."""
    z = embeddings[:num_views] / np.linalg.norm(embeddings[:num_views], axis=-1, keepdims=True)
    selected = true = 0
    for start in range(0, z.shape[1] // batch_size * batch_size, batch_size):
        views = z[:, start : start + batch_size]  # (V, bs, d)
        y = labels[start : start + batch_size]
        candidates = views.reshape(-1, views.shape[-1])  # column v * bs + j
        candidate_labels = np.tile(y, num_views)
        for i in range(batch_size):
            per_view = views[:, i] @ candidates.T  # (V, V * bs)
            score = per_view.max(0) if aggregation == "max" else per_view.mean(0)
            score[np.arange(num_views) * batch_size + i] = -np.inf  # the anchor's own views
            order = np.argsort(-score, kind="stable")[:topk]
            chosen = order[score[order] > threshold]
            selected += len(chosen)
            true += int(np.sum(candidate_labels[chosen] == y[i]))
    return selected, true


def test_fn_analysis_precision_matches_direct_count(pretrained, tiny_data, tmp_path):
    c = eval_config("default_fn_analysis", pretrained, tiny_data)
    c.batch_size = 64  # candidate pool
    c.eval.batch_size = 32
    c.fn_analysis.topks = (1, 5)
    c.fn_analysis.thresholds = (0.5, 0.9)
    c.fn_analysis.save_embeddings = True
    workdir = tmp_path / "fn"
    results = evaluate.run(c, str(workdir))
    assert results["num_examples"] == NUM_TEST and results["num_views"] == 4
    assert {p for p in results["plots"]} == {
        "fn_identification_S0.png",
        "fn_identification_S2.png",
        "fn_similarity_histogram.png",
    }
    assert all((workdir / p).stat().st_size > 0 for p in results["plots"])
    # S in {0, 2} x {max, mean} x (k in {1, 5, none}) x (θ in {0.5, 0.9, none}) minus (none, none).
    assert len(results["sweep"]) == 2 * 2 * 8
    saved = np.load(workdir / "embeddings.npz")
    embeddings, labels = saved["embeddings"], saved["labels"]
    assert embeddings.shape == (4, NUM_TEST, 64)
    assert sorted(labels.tolist()) == sorted(sources._mnist_split("test")[1][:NUM_TEST].tolist())
    for support, aggregation, topk, threshold in ((2, "max", 5, 0.5), (0, "mean", 1, 0.5)):
        row = next(
            r
            for r in results["sweep"]
            if r["support_size"] == support
            and r["aggregation"] == aggregation
            and r["topk"] == topk
            and r["threshold"] == threshold
        )
        num_selected, num_true = _direct_fn_counts(embeddings, labels, 64, support + 2, topk, threshold, aggregation)
        assert (row["num_selected"], row["num_true_fn"]) == (num_selected, num_true)
        assert row["precision"] == pytest.approx(num_true / num_selected)
    histogram = results["histograms"]
    assert sum(histogram["same_label"]) + sum(histogram["different_label"]) == NUM_TEST * (4 * 64 - 4)


def test_fn_analysis_views_cut_on_the_device_match_the_host_cut(pretrained, tiny_data, tmp_path):
    """augment.crop_on_device in the FN analysis: views cut on the device from the canvases embed as the
    host-cut views do (those are rounded to uint8, hence the tolerance), with the same colour draws."""
    embeddings = []
    for crop in (False, True):
        c = eval_config("default_fn_analysis", pretrained, tiny_data)
        c.batch_size = c.eval.batch_size = 64
        c.fn_analysis.max_examples, c.fn_analysis.topks, c.fn_analysis.thresholds = 64, (1,), (0.5,)
        c.fn_analysis.save_embeddings = True
        c.augment.update(on_device=True, crop_on_device=crop)
        evaluate.run(c, str(tmp_path / f"crop_{crop}"))
        embeddings.append(np.load(tmp_path / f"crop_{crop}" / "embeddings.npz")["embeddings"])
    assert embeddings[0].shape == (4, 64, 64)
    np.testing.assert_allclose(embeddings[1], embeddings[0], atol=5e-3)
    assert np.abs(embeddings[0][0] - embeddings[0][1]).max() > 0.05  # the views themselves differ


def test_transfer_sweep_then_retrain(pretrained, tiny_data, tmp_path):
    c = eval_config("default_transfer", pretrained, tiny_data, arg=TINY_NAME)
    c.total_steps = 8
    c.transfer.sweep_train_split = "train[:75%]"
    c.transfer.sweep_val_split = "train[75%:]"
    c.transfer.learning_rates = (0.05, 0.001)
    c.transfer.weight_decays = (0.0,)
    workdir = tmp_path / "transfer"
    results = evaluate.run(c, str(workdir))
    sweep = results["sweep"]
    assert [(p["base_lr"], p["weight_decay"]) for p in sweep] == [(0.05, 0.0), (0.001, 0.0)]
    assert results["split_sizes"] == {"train[:75%]": 192, "train[75%:]": 64, "train": NUM_TRAIN}
    best = max(sweep, key=lambda p: p["val_top1"])
    assert results["best"] == best
    assert results["final"]["base_lr"] == best["base_lr"] and results["final"]["train_split"] == "train"
    assert results["test"]["num_examples"] == NUM_TEST and results["test"]["split"] == "test"
    for i, p in enumerate(sweep):
        run = json.loads((workdir / "sweep" / f"{i:02d}_lr{p['base_lr']:g}_wd0" / "results.json").read_text())
        assert run["eval"]["split"] == "train[75%:]" and run["eval"]["num_examples"] == 64
        assert run["eval"]["top1"] == p["val_top1"]
    on_disk = json.loads((workdir / "results.json").read_text())
    assert len(on_disk["sweep"]) == 2 and on_disk["test"] == results["test"]


@pytest.mark.slow
def test_real_pretraining_then_cli_linear_eval(tmp_path):
    """`pretrain.run` → `python -m fnc_jax.main --config=configs/default_linear_eval.py` (~4 min on 2 cores)."""
    config = tiny_pretrain_config()
    pretrain_dir = tmp_path / "pretrain"
    pretrain.run(config, str(pretrain_dir))
    eval_dir = tmp_path / "linear"
    command = [
        sys.executable,
        "-m",
        "fnc_jax.main",
        "--config=configs/default_linear_eval.py",
        f"--workdir={eval_dir}",
        f"--config.pretrained.workdir={pretrain_dir}",
        "--config.batch_size=32",
        "--config.total_steps=3",
        "--config.eval.batch_size=200",
    ]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads((eval_dir / "results.json").read_text())
    assert results["pretrained"]["step"] == 2 and results["pretrained"]["restored"] == [
        "params/encoder",
        "batch_stats/encoder",
    ]
    assert results["eval"]["num_examples"] == 1000 and results["steps"] == 3
    assert '"top1"' in done.stdout  # main prints the results


# ---------------------------------------------------------------------------------------------------
# The quick quality report that ends a pretraining run (the quickstart).


def test_linear_probe_accuracy_separates_blobs_and_not_noise():
    rng = np.random.default_rng(0)
    centres = 4.0 * rng.standard_normal((5, 16))
    y = rng.integers(0, 5, 600)
    x = (centres[y] + rng.standard_normal((600, 16))).astype(np.float32)
    fit = functools.partial(representation.linear_probe_accuracy, num_classes=5, steps=200)
    assert fit(x[:400], y[:400], x[400:], y[400:]) > 0.95
    assert fit(x[:400], rng.permutation(y[:400]), x[400:], y[400:]) < 0.5  # labels unrelated to the inputs


def test_quality_report_of_a_checkpoint_and_of_a_random_encoder(pretrained, tiny_data):
    c = tiny_pretrain_config()
    c.data.update(source="tfds", name=TINY_NAME, data_dir=tiny_data, train_split="train", eval_split="test")
    c.eval.update(batch_size=64, knn_ks=(20,), probe_epochs=50)
    mesh = parallel.create_mesh()
    model = factory.contrastive_model(c, 0)
    # quality_report gets the online network of the state (what `pretrain.run` passes), not the probe.
    variables = {
        "params": {k: v for k, v in pretrained.state["params"].items() if k != "probe"},
        "batch_stats": pretrained.state["batch_stats"],
    }
    report = representation.quality_report(c, model, variables, mesh, sources.get_source_info(c.data))
    assert report["split"] == "test"
    for name in ("pretrained", "random_init"):
        scores = report[name]
        assert scores["num_train"] == NUM_TRAIN and scores["num_test"] == NUM_TEST
        assert all(0.0 <= scores[k] <= 1.0 for k in ("knn_top1_k20", "knn_top5_k20", "linear_probe_top1"))
    # The pretrained entry is the checkpoint's network: its kNN score is recomputed from its features.
    train_x, train_y = features.extract(model, variables, c, "train", mesh, batch_size=64)
    test_x, test_y = features.extract(model, variables, c, "test", mesh, batch_size=64)
    top1, _ = _brute_force_knn(train_x, train_y, test_x, test_y, 20, c.eval.knn_temperature)
    assert report["pretrained"]["knn_top1_k20"] == pytest.approx(top1, abs=1.01 / NUM_TEST)
    assert report["pretrained"] != report["random_init"]
