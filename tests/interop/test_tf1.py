"""Importing official TF1 checkpoints: every stage of the official outputs, architecture inference, the
SimCLR v1/v2 layouts and selective kernels, and refusals that name what does not map.

The two golden checkpoints were written by the official FNC code (tests/golden/official_checkpoints/).
Layouts the official code did not write for us (SimCLR heads, SK, CIFAR stem) come from the official
network re-written in plain TF ops (`official_resnet.py`), which the golden checkpoints check first.
Deviations are measured relative to each array's largest |value| (float32 error grows through
BatchNorms with small moving variances, so near-zero entries cannot be compared relatively); run with
`-s` to see the table.
"""

import pathlib
import sys

import flax.linen as nn
import jax
import numpy as np
import pytest
import tensorflow as tf

from fnc_jax.interop import tf1, tf1_names
from fnc_jax.interop.tf1_names import Architecture, UnmappableCheckpoint

sys.path.insert(0, str(pathlib.Path(__file__).parent))
import official_resnet  # noqa: E402

GOLDEN = pathlib.Path(__file__).resolve().parents[1] / "golden" / "official_checkpoints"
CHECKPOINTS = {
    "resnet18_w0.125": dict(depth=18, slots=71, per_network=105 + 14),
    "resnet50_w0.125": dict(depth=50, slots=167, per_network=265 + 14),
}
METADATA = ("images", "config_name", "tf_version", "official_commit", "global_step")
TOLERANCE = 2e-4  # of the array's max |value|; a float64 port of the official code reaches 5.5e-5
IMAGES = np.random.RandomState(1234).uniform(0, 1, (6, 32, 32, 3)).astype(np.float32)


def prefix_of(name: str) -> str:
    return str(GOLDEN / name / "model.ckpt-3")


@pytest.fixture(scope="module")
def golden():
    return {name: (tf1.read(prefix_of(name)), dict(np.load(GOLDEN / name / "expected.npz"))) for name in CHECKPOINTS}


def official_stages(expected: dict, network: str) -> dict[str, np.ndarray]:
    """expected.npz's stage outputs of one network, under the official tensor names (without `ema_`)."""
    ema = network == "ema"
    return {k.removeprefix("ema_"): v for k, v in expected.items() if k not in METADATA and k.startswith("ema_") == ema}


def all_tensors(path: str) -> dict[str, np.ndarray]:
    reader = tf.train.load_checkpoint(path)
    return {name: reader.get_tensor(name) for name in reader.get_variable_to_shape_map()}


def stage_outputs(model, variables, images, arch: Architecture) -> dict[str, np.ndarray]:
    """The fnc_jax network's outputs under the official tensor names (a Flax method interceptor)."""
    _, layout = tf1_names.resnet_layout(arch.depth)
    stem = "stem_conv2" if arch.sk_ratio and not arch.cifar_stem else "stem_conv"
    outputs = {("encoder", stem): "initial_conv", ("encoder",): "final_avg_pool"}
    outputs |= {("encoder", f"group{g + 1}_block{n - 1}"): f"block_group{g + 1}" for g, n in enumerate(layout)}
    outputs |= {("projection_head", f"bn_{j}"): f"proj_nl_{j}_out" for j in range(arch.proj_layers)}

    @jax.jit
    def run(variables, images):
        captured = {}

        def interceptor(next_fun, args, kwargs, context):
            out = next_fun(*args, **kwargs)
            path = tuple(context.module.path)
            if context.method_name == "__call__":
                if path in outputs:
                    captured[outputs[path]] = out
                elif path == ("encoder", "group1_block0"):
                    captured["initial_max_pool"] = args[0]
                elif path == ("projection_head",):
                    captured["proj_out"] = out[0]
                    captured.update({f"proj_hidden_{j}": h for j, h in enumerate(out[1])})
            return out

        with nn.intercept_methods(interceptor), jax.default_matmul_precision("highest"):
            final = model.apply(variables, images, train=False)
        return captured, final

    captured, final = run(variables, images)
    if not isinstance(final, dict):  # a ClassifierModel: the logits
        captured["logits_sup"] = final
    return jax.tree.map(np.asarray, captured)


def deviation(ours: np.ndarray, official: np.ndarray) -> tuple[float, float]:
    error = float(np.max(np.abs(ours.astype(np.float64) - official)))
    return error, error / float(np.max(np.abs(official)))


def assert_stages_match(ours: dict, official: dict, label: str) -> None:
    assert set(ours) == set(official), (label, sorted(set(ours) ^ set(official)))
    print(f"\n{label}: stage, max |error|, relative to max |official|")
    worst = {}
    for key in sorted(official):
        error, relative = deviation(ours[key], official[key])
        assert ours[key].shape == official[key].shape, key
        print(f"  {key:18s} {error:.2e} {relative:.2e}")
        worst[key] = relative
    bad = {k: v for k, v in worst.items() if v > TOLERANCE}
    assert not bad, f"{label}: stages off by more than {TOLERANCE} of their scale: {bad}"


@pytest.mark.parametrize("network", ["online", "ema"])
@pytest.mark.parametrize("name", list(CHECKPOINTS))
def test_every_stage_matches_the_official_outputs(golden, name, network):
    ckpt, expected = golden[name]
    official = official_stages(expected, network)
    model, variables = tf1.load(ckpt, network)
    assert_stages_match(
        stage_outputs(model, variables, expected["images"], ckpt.architecture), official, f"{name} {network}"
    )

    out = tf1.features(ckpt, expected["images"], network=network)
    assert set(out) == {"encoder", "projection"}  # a pretraining checkpoint has no supervised head
    assert deviation(out["encoder"], official["final_avg_pool"])[1] <= TOLERANCE
    assert deviation(out["projection"], official["proj_out"])[1] <= TOLERANCE


@pytest.mark.parametrize("name", list(CHECKPOINTS))
def test_architecture_and_inventory_are_inferred_exactly(golden, name):
    ckpt, _ = golden[name]
    facts = CHECKPOINTS[name]
    assert ckpt.architecture == Architecture(
        depth=facts["depth"],
        width_multiplier=0.125,
        cifar_stem=False,
        sk_ratio=0.0,
        proj_layers=3,
        proj_out_dim=128,
        proj_hidden_dim=0,
        projection_scope="head_contrastive_instance",
        num_classes=0,
        classifier_input_dim=0,
    )
    assert ckpt.architecture.model_config()["stem"] == "imagenet"
    assert ckpt.global_step == 3 and ckpt.plan.networks == ("online", "ema")
    assert {n: len(t) for n, t in ckpt.plan.targets.items()} == {
        "online": facts["per_network"],
        "ema": facts["per_network"],
    }
    assert len(ckpt.plan.ignored["optimizer slots"]) == facts["slots"]
    assert ckpt.plan.ignored["training state"] == ["global_step", "memory/memory"]
    summary = "\n".join(ckpt.summary())
    assert (
        f"ResNet-{facts['depth']}, width 0.125, ImageNet stem" in summary
        and f"{facts['slots']} (*/Momentum)" in summary
    )
    # A directory with a `checkpoint` file is passed to TF as it is (as a gs:// path would be).
    assert tf1.read(str(GOLDEN / name)).plan == ckpt.plan


@pytest.mark.parametrize("name", list(CHECKPOINTS))
def test_the_tf_reference_reproduces_the_official_outputs(golden, name):
    """`official_resnet` (used for the layouts below) against outputs the official code computed."""
    _, expected = golden[name]
    store = official_resnet.Store(all_tensors(prefix_of(name)))
    for network, scope in (("online", ""), ("ema", "ema_model/")):
        ours = official_resnet.run(
            store,
            expected["images"],
            head="head_contrastive_instance",
            prefix=scope,
            depth=CHECKPOINTS[name]["depth"],
            width_multiplier=0.125,
        )
        assert_stages_match(ours, official_stages(expected, network), f"TF reference, {name} {network}")
    assert not store.created  # every variable came from the checkpoint


def write(values: dict, tmp_path: pathlib.Path, label: str) -> str:
    return official_resnet.save(values, str(tmp_path / label / "model.ckpt-7"))


def test_selective_kernel_resnet50_with_simclr_v2_heads(tmp_path):
    """SimCLR v2's R50+SK layout: ResNet-D stem and shortcuts, SK units (conv and BN counters drift)."""
    store = official_resnet.Store(seed=1)
    arch = dict(depth=50, width_multiplier=0.125, sk_ratio=0.0625)
    online = official_resnet.run(store, IMAGES, head="head_contrastive", num_classes=10, ft_proj_selector=1, **arch)
    ema = official_resnet.run(store, IMAGES, head="head_contrastive", prefix="ema_model/", **arch)
    values = {**store.created, "global_step": np.int64(7)}
    values |= {f"{n}/Momentum": v for n, v in store.created.items() if not n.startswith("ema_model/")}
    ckpt = tf1.read(write(values, tmp_path, "sk"))
    a = ckpt.architecture
    assert (a.depth, a.width_multiplier, a.sk_ratio, a.cifar_stem, a.projection_scope) == (
        50,
        0.125,
        0.0625,
        False,
        "head_contrastive",
    )
    assert (a.num_classes, a.classifier_input_dim, a.classifier_selectors()) == (10, 256, [0, 1, 2])
    assert "ResNet-D stem" in "\n".join(ckpt.summary())
    convs = ckpt.plan.targets["online"]
    assert convs["base_model/conv2d_6/kernel"] == ("params", ("encoder", "group1_block0", "sk", "mix_reduce", "kernel"))
    assert convs["base_model/batch_normalization_6/gamma"] == (
        "params",
        ("encoder", "group1_block0", "sk", "mix_bn", "scale"),
    )

    model, variables = tf1.load_classifier(ckpt, ft_proj_selector=1)
    assert_stages_match(stage_outputs(model, variables, IMAGES, a), online, "SK R50 online (TF reference)")
    model, variables = tf1.load(ckpt, "ema")
    assert_stages_match(stage_outputs(model, variables, IMAGES, a), ema, "SK R50 ema (TF reference)")
    # The supervised head's input is ambiguous (features and hidden layers are all 256-d): no logits unasked.
    assert set(tf1.features(ckpt, IMAGES)) == {"encoder", "projection"}


def test_sk_ratio_is_fitted_to_the_unit_widths():
    """Widths above SK's minimum of 32 pin the ratio down (here 1.0: 32, 32, 32, 64 at width 0.125)."""
    store = official_resnet.Store(seed=3)
    official_resnet.run(store, IMAGES[:1], head=None, depth=50, width_multiplier=0.125, sk_ratio=1.0)
    plan = tf1_names.plan({n: v.shape for n, v in store.created.items()})
    assert plan.architecture.sk_ratio == 1.0 and plan.architecture.proj_layers == 0


def test_simclr_v1_layout_with_the_cifar_stem(tmp_path):
    """No projection head (the SimCLR v1 releases) and a supervised head on the pooled features."""
    store = official_resnet.Store(seed=2)
    official = official_resnet.run(
        store, IMAGES, head=None, num_classes=10, depth=18, width_multiplier=0.25, cifar_stem=True
    )
    values = {
        **store.created,
        "head_supervised/linear_layer/dense/kernel/LARSOptimizer": np.zeros((128, 10), np.float32),
    }
    ckpt = tf1.read(write(values, tmp_path, "v1"))
    a = ckpt.architecture
    assert (a.depth, a.width_multiplier, a.cifar_stem, a.proj_layers, a.projection_scope) == (18, 0.25, True, 0, None)
    assert a.model_config()["stem"] == "cifar" and a.classifier_selectors() == [0] and ckpt.global_step is None
    assert ckpt.plan.networks == ("online",) and ckpt.plan.ignored == {
        "optimizer slots": ["head_supervised/linear_layer/dense/kernel/LARSOptimizer"]
    }
    model, variables = tf1.load_classifier(ckpt)
    assert_stages_match(stage_outputs(model, variables, IMAGES, a), official, "CIFAR-stem R18, v1 heads (TF reference)")
    out = tf1.features(ckpt, IMAGES)
    assert set(out) == {"encoder", "logits"}  # no projection head: no projection
    np.testing.assert_allclose(
        out["logits"], official["logits_sup"], rtol=0, atol=TOLERANCE * np.abs(official["logits_sup"]).max()
    )
    with pytest.raises(ValueError, match=r"network='ema' but .* holds no ema_model/ network: allowed is 'online'"):
        tf1.load(ckpt, "ema")


def simclr_v2_renamed(name: str, input_dim: int, rng) -> tuple[dict, np.ndarray, np.ndarray]:
    """The official checkpoint as SimCLR v2 names it, plus a supervised head of known values."""
    values = {
        n.replace("head_contrastive_instance/", "head_contrastive/"): v
        for n, v in all_tensors(prefix_of(name)).items()
        if n != "memory/memory"
    }
    kernel = rng.standard_normal((input_dim, 10)).astype(np.float32)
    bias = rng.standard_normal(10).astype(np.float32)
    values |= {
        "head_supervised/linear_layer/dense/kernel": kernel,
        "head_supervised/linear_layer/dense/bias": bias,
        "head_supervised/linear_layer/dense/kernel/Momentum": np.zeros_like(kernel),
    }
    return values, kernel, bias


def test_simclr_v2_names_and_a_supervised_head(golden, tmp_path):
    ckpt_fnc, expected = golden["resnet18_w0.125"]
    fnc = tf1.features(ckpt_fnc, IMAGES)
    rng = np.random.default_rng(0)

    values, kernel, bias = simclr_v2_renamed("resnet18_w0.125", 64, rng)
    ckpt = tf1.read(write(values, tmp_path, "v2_64"))
    assert ckpt.architecture.projection_scope == "head_contrastive"
    assert ckpt.architecture.classifier_selectors() == [0, 1, 2]  # 64-d: features and both hidden layers
    assert "ft_proj_selector one of [0, 1, 2]: pass it to get logits" in "\n".join(ckpt.summary())
    out = tf1.features(ckpt, IMAGES)
    assert set(out) == {"encoder", "projection"}
    for key in out:
        np.testing.assert_array_equal(out[key], fnc[key])
    out = tf1.features(ckpt, IMAGES, ft_proj_selector=1)
    official = expected["proj_hidden_1"].astype(np.float64) @ kernel + bias  # from the official hidden layer
    assert deviation(out["logits"], official)[1] <= TOLERANCE
    np.testing.assert_array_equal(
        tf1.features(ckpt, IMAGES, network="ema")["encoder"], tf1.features(ckpt_fnc, IMAGES, network="ema")["encoder"]
    )
    with pytest.raises(ValueError, match=r"ft_proj_selector=3 is invalid: .* 64-d input; allowed are \[0, 1, 2\]"):
        tf1.features(ckpt, IMAGES, ft_proj_selector=3)

    values, kernel, bias = simclr_v2_renamed("resnet18_w0.125", 128, rng)
    ckpt = tf1.read(write(values, tmp_path, "v2_128"))
    assert ckpt.architecture.classifier_selectors() == [3]  # only the projection is 128-d
    out = tf1.features(ckpt, IMAGES)
    assert deviation(out["logits"], expected["proj_out"].astype(np.float64) @ kernel + bias)[1] <= TOLERANCE


@pytest.mark.parametrize(
    "change, message",
    [
        (
            {"drop": "base_model/batch_normalization_7/moving_variance"},
            r"missing base_model/batch_normalization_7/moving_variance",
        ),
        ({"drop": "ema_model/base_model/conv2d_12/kernel"}, r"missing ema_model/base_model/conv2d_12/kernel"),
        (
            {"drop": "head_contrastive_instance/nl_1/batch_normalization/beta"},
            r"missing head_contrastive_instance/nl_1/batch_normalization/beta",
        ),
        (
            {"add": "base_model/dense/kernel"},
            r"1 variables that are no part of the inferred network: base_model/dense/kernel",
        ),
        (
            {"add": "head_contrastive_instance/nl_2/batch_normalization/beta"},
            r"no part of the inferred network: head_contrastive_instance/nl_2/batch_normalization/beta",
        ),
        (
            {"add": "base_model/conv2d_3/bias"},
            r"base_model/conv2d_3/bias: convolutions with a bias \(squeeze-excitation",
        ),
        ({"add": "head_contrastive/nl_0/dense/kernel"}, r"two projection heads"),
    ],
)
def test_a_checkpoint_that_does_not_map_completely_is_refused(tmp_path, change, message):
    values = all_tensors(prefix_of("resnet18_w0.125"))
    if "drop" in change:
        del values[change["drop"]]
    else:
        values[change["add"]] = np.ones((64,), np.float32)
    path = write(values, tmp_path, "broken")
    with pytest.raises(UnmappableCheckpoint, match=message):
        tf1.read(path)


def test_bad_arguments_name_the_field(golden, tmp_path):
    ckpt, _ = golden["resnet18_w0.125"]
    with pytest.raises(ValueError, match=r"network='both' is invalid: allowed values are online, ema"):
        tf1.load(ckpt, "both")
    with pytest.raises(ValueError, match=r"images of shape \(32, 32, 3\) are invalid"):
        tf1.features(ckpt, IMAGES[0])
    with pytest.raises(ValueError, match=r"ft_proj_selector=0 is invalid: the checkpoint has no head_supervised"):
        tf1.features(ckpt, IMAGES, ft_proj_selector=0)
    with pytest.raises(FileNotFoundError, match=r"no TF checkpoint at .*nothing.*allowed are a checkpoint prefix"):
        tf1.read(str(tmp_path / "nothing"))
