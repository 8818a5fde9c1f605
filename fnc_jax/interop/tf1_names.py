"""Official TF1 checkpoint names (FNC, SimCLR v1/v2): the architecture they imply and where each goes.

The official `resnet.py` builds its layers with `tf.layers`, which names them by creation order inside a
variable scope: `base_model/conv2d`, `conv2d_1`, … and `batch_normalization`, `batch_normalization_1`, ….
A checkpoint lists them sorted as strings (`conv2d_10` before `conv2d_2`), and in selective-kernel blocks
the two counters drift apart (one SK unit creates three convs but two BNs), so the mapping parses the
numeric suffixes and walks the official creation order of the inferred network. Everything is inferred
from the variables' names and shapes, never from a file name, and every shape is checked against the
fnc_jax network itself (`jax.eval_shape`), so a checkpoint either maps completely or is refused with the
names of what did not fit. The name parsing, the creation-order walk and the inference of the
architecture are one algorithm over the same counters, kept together in this one module (~430 lines).
"""

from __future__ import annotations

import dataclasses
import functools
import re
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import ml_collections
from flax import traverse_util

from fnc_jax import errors
from fnc_jax.evaluation.restore import NETWORKS
from fnc_jax.models import ClassifierModel, ContrastiveModel, factory, resnet_feature_dim
from fnc_jax.models.resnet import DEPTHS, resnet_layout

Shape = tuple[int, ...]
Target = tuple[str, tuple[str, ...]]  # (collection, path in the fnc_jax variables)

EMA_PREFIX = "ema_model/"  # the momentum encoder: an exact mirror of the online scopes
ENCODER_SCOPE = "base_model/"
PROJECTION_SCOPES = {"head_contrastive_instance": "FNC", "head_contrastive": "SimCLR v2"}
SUPERVISED_SCOPE = "head_supervised/linear_layer/dense/"
OPTIMIZER_SLOT_SUFFIXES = ("/Momentum", "/LARSOptimizer")  # LARS / momentum slots (v2 and FNC; v1)
TRAINING_STATE = ("global_step", "memory/memory")  # FNC's memory bank of EMA projections
BN_LEAVES = {
    "gamma": ("params", "scale"),
    "beta": ("params", "bias"),
    "moving_mean": ("batch_stats", "mean"),
    "moving_variance": ("batch_stats", "var"),
}
# SimCLR v2's ratio for its SK networks. Every ratio up to 32 / (512 w) gives the same SK widths (they
# are at least 32), so the checkpoint cannot tell them apart and this one is tried first.
SK_RATIO = 0.0625
_NUMBERED = re.compile(r"(conv2d|batch_normalization)(?:_(\d+))?/([^/]+)$")
_HEAD_LAYER = re.compile(r"nl_(\d+)/dense/kernel$")


class UnmappableCheckpoint(errors.ConfigError):
    """The checkpoint is not an official network that fnc_jax can reproduce exactly."""


def layer_name(kind: str, index: int) -> str:
    """`conv2d` for index 0, else `conv2d_{index}` (likewise `batch_normalization`)."""
    return kind if index == 0 else f"{kind}_{index}"


def _listing(names, limit: int = 8) -> str:
    names = sorted(names)
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


@dataclasses.dataclass(frozen=True)
class Architecture:
    """What a checkpoint holds, in fnc_jax's terms (`config.model`), plus its heads' official scopes."""

    depth: int
    width_multiplier: float
    cifar_stem: bool
    sk_ratio: float
    proj_layers: int  # 0: no projection head (SimCLR v1 releases)
    proj_out_dim: int  # the projection's width; without a head, the pooled features'
    proj_hidden_dim: int  # 0 = the encoder width (always so in the official head)
    projection_scope: str | None  # head_contrastive_instance (FNC) or head_contrastive (SimCLR v2)
    num_classes: int  # of the supervised head `head_supervised`, 0 = none
    classifier_input_dim: int  # the supervised head's input width, 0 = none

    @property
    def stem(self) -> str:
        return "cifar" if self.cifar_stem else "imagenet"

    @property
    def feature_dim(self) -> int:
        return resnet_feature_dim(self.depth, self.width_multiplier)

    def model_config(self) -> dict:
        """The `config.model` fields an evaluation of this network must use."""
        return {
            "depth": self.depth,
            "width_multiplier": self.width_multiplier,
            "stem": self.stem,
            "sk_ratio": self.sk_ratio,
            "se_ratio": 0.0,
            "proj_layers": self.proj_layers,
            "proj_out_dim": self.proj_out_dim,
            "proj_hidden_dim": self.proj_hidden_dim,
        }

    def _network_kwargs(self) -> dict:
        # From the `model` section, as the evaluations build their network from an imported workdir.
        return factory.network_kwargs(ml_collections.ConfigDict({"model": self.model_config(), "dtype": "float32"}))

    def network(self) -> ContrastiveModel:
        """The fnc_jax network (encoder + projection head) that reproduces the official one."""
        return ContrastiveModel(**self._network_kwargs())

    def classifier(self, ft_proj_selector: int) -> ClassifierModel:
        """The network with the supervised head on hidden `ft_proj_selector` (its values from the checkpoint)."""
        return ClassifierModel(
            **self._network_kwargs(),
            num_classes=self.num_classes,
            ft_proj_selector=ft_proj_selector,
            zero_init_head=False,
        )

    def hidden_dims(self) -> list[int]:
        """Widths of the projection head's hiddens: [features, layer 0, …, last layer] (`ft_proj_selector` order)."""
        hidden = self.proj_hidden_dim or self.feature_dim
        return (
            [self.feature_dim] + [hidden] * max(self.proj_layers - 1, 0) + [self.proj_out_dim] * (self.proj_layers > 0)
        )

    def classifier_selectors(self) -> list[int]:
        """The `ft_proj_selector` values whose hidden has the supervised head's input width."""
        return [k for k, dim in enumerate(self.hidden_dims()) if self.num_classes and dim == self.classifier_input_dim]

    def describe(self) -> list[str]:
        if self.cifar_stem:
            stem = "CIFAR stem (3x3/1 conv, no max pool)"
        elif self.sk_ratio:
            stem = "ResNet-D stem (three 3x3 convs, the first stride 2, + 3x3/2 max pool)"
        else:
            stem = "ImageNet stem (7x7/2 conv + 3x3/2 max pool)"
        sk = (
            f"selective kernels (sk_ratio {self.sk_ratio:g}), average-pooled shortcuts"
            if self.sk_ratio
            else "no selective kernels"
        )
        lines = [
            f"encoder: ResNet-{self.depth}, width {self.width_multiplier:g}, {stem}, {sk}; pooled features {self.feature_dim}-d"
        ]
        if self.projection_scope:
            dims = " -> ".join(map(str, self.hidden_dims()))
            lines.append(
                f"projection head: {self.projection_scope} ({PROJECTION_SCOPES[self.projection_scope]}), "
                f"{self.proj_layers} layers, {dims}"
            )
        else:
            lines.append("projection head: none (as in the SimCLR v1 releases)")
        if self.num_classes:
            selectors = self.classifier_selectors()
            which = (
                f"ft_proj_selector {selectors[0]}"
                if len(selectors) == 1
                else f"ft_proj_selector one of {selectors}: pass it to get logits"
            )
            lines.append(
                f"supervised head: head_supervised, {self.num_classes} classes on a "
                f"{self.classifier_input_dim}-d input ({which})"
            )
        return lines


@dataclasses.dataclass(frozen=True)
class Plan:
    """Where every variable of a checkpoint goes, or why it is not read."""

    architecture: Architecture
    networks: tuple[str, ...]  # 'online', and 'ema' when the checkpoint has ema_model/
    targets: dict[str, dict[str, Target]]  # network -> checkpoint name -> fnc_jax variable
    ignored: dict[str, list[str]]  # why -> checkpoint names


def encoder_layers(depth: int, *, sk: bool, cifar_stem: bool) -> tuple[list[tuple[str, ...]], list[tuple[str, ...]]]:
    """fnc_jax paths (under `encoder`) of the official convs and of its BNs, each in creation order.

    The official ResNet creates: the stem (one conv + BN; the ResNet-D stem three), then per block the
    projection shortcut first (first block of every group), then the residual branch. An SK unit
    creates its 3x3 conv (2f) + BN, its 1x1 reduce conv + BN, then its 1x1 expand conv without BN.
    """
    bottleneck, layout = resnet_layout(depth)
    convs: list[tuple[str, ...]] = []
    bns: list[tuple[str, ...]] = []
    if sk and not cifar_stem:
        for i in range(3):
            convs.append((f"stem_conv{i}",))
            bns.append((f"stem_bn{i}",))
    else:
        convs.append(("stem_conv",))
        bns.append(("stem_bn",))
    for g, num_blocks in enumerate(layout):
        for b in range(num_blocks):
            block = f"group{g + 1}_block{b}"
            if b == 0:
                convs.append((block, "shortcut", "conv"))
                bns.append((block, "shortcut", "bn"))
            convs.append((block, "conv1"))
            bns.append((block, "bn1"))
            if bottleneck and sk:
                convs += [(block, "sk", "conv"), (block, "sk", "mix_reduce"), (block, "sk", "mix_expand")]
                bns += [(block, "sk", "bn"), (block, "sk", "mix_bn")]
            else:
                convs.append((block, "conv2"))
                bns.append((block, "bn2"))
            if bottleneck:
                convs.append((block, "conv3"))
                bns.append((block, "bn3"))
    return convs, bns


def variable_map(arch: Architecture, network: str) -> dict[str, Target]:
    """Checkpoint name -> fnc_jax variable for one network (the supervised head belongs to the online one)."""
    prefix = EMA_PREFIX if network == "ema" else ""
    convs, bns = encoder_layers(arch.depth, sk=arch.sk_ratio > 0, cifar_stem=arch.cifar_stem)
    targets: dict[str, Target] = {}
    for i, path in enumerate(convs):
        targets[f"{prefix}{ENCODER_SCOPE}{layer_name('conv2d', i)}/kernel"] = ("params", ("encoder", *path, "kernel"))
    for i, path in enumerate(bns):
        for leaf, (collection, name) in BN_LEAVES.items():
            name_in_ckpt = f"{prefix}{ENCODER_SCOPE}{layer_name('batch_normalization', i)}/{leaf}"
            targets[name_in_ckpt] = (collection, ("encoder", *path, name))
    for j in range(arch.proj_layers):
        scope = f"{prefix}{arch.projection_scope}/nl_{j}/"
        targets[scope + "dense/kernel"] = ("params", ("projection_head", f"dense_{j}", "kernel"))
        for leaf, (collection, name) in BN_LEAVES.items():
            if leaf == "beta" and j == arch.proj_layers - 1:
                continue  # the last layer's BN has no beta (center=False): its output is l2-normalised
            targets[scope + "batch_normalization/" + leaf] = (collection, ("projection_head", f"bn_{j}", name))
    if arch.num_classes and network == "online":
        targets[SUPERVISED_SCOPE + "kernel"] = ("params", ("head", "dense", "kernel"))
        targets[SUPERVISED_SCOPE + "bias"] = ("params", ("head", "dense", "bias"))
    return targets


@functools.cache
def abstract_shapes(arch: Architecture) -> dict[Target, Shape]:
    """Every variable of the fnc_jax network (encoder, projection head) with its shape; nothing runs."""
    tree = jax.eval_shape(
        lambda key: arch.network().init(key, jnp.zeros((1, 32, 32, 3), jnp.float32), train=False),
        jax.random.PRNGKey(0),
    )
    return {
        (collection, path): tuple(leaf.shape)
        for collection in ("params", "batch_stats")
        for path, leaf in traverse_util.flatten_dict(tree.get(collection, {})).items()
    }


def _numbered(shapes: Mapping[str, Shape], scope: str, kind: str) -> dict[int, dict[str, Shape]]:
    """{index: {leaf: shape}} of the `kind` layers directly inside `scope` ('base_model/conv2d_7/kernel' -> 7)."""
    layers: dict[int, dict[str, Shape]] = {}
    for name, shape in shapes.items():
        match = _NUMBERED.fullmatch(name[len(scope) :]) if name.startswith(scope) else None
        if match and match[1] == kind:
            layers.setdefault(int(match[2] or 0), {})[match[3]] = shape
    return layers


def infer_architecture(shapes: Mapping[str, Shape]) -> Architecture:
    """The online network's architecture from the checkpoint's names and shapes (optimizer slots excluded)."""
    kernels = {i: v["kernel"] for i, v in _numbered(shapes, ENCODER_SCOPE, "conv2d").items() if "kernel" in v}
    biased = [
        f"{ENCODER_SCOPE}{layer_name('conv2d', i)}/bias"
        for i, v in _numbered(shapes, ENCODER_SCOPE, "conv2d").items()
        if "bias" in v
    ]
    if biased:
        raise UnmappableCheckpoint(
            f"{_listing(biased)}: convolutions with a bias (squeeze-excitation layers, "
            "se_ratio > 0) are not supported; the official ResNet convs have none"
        )
    if 0 not in kernels:
        scopes = sorted({name.split("/")[0] for name in shapes})
        raise UnmappableCheckpoint(
            f"no {ENCODER_SCOPE}conv2d/kernel, so no official ResNet encoder (top-level scopes: {', '.join(scopes)})"
        )
    stem = kernels[0]
    if stem[:3] == (7, 7, 3):
        cifar_stem, three_conv = False, False
    elif stem[:3] == (3, 3, 3):
        three_conv = kernels.get(1, (1,))[:2] == (3, 3)
        cifar_stem = not three_conv
    else:
        raise UnmappableCheckpoint(
            f"{ENCODER_SCOPE}conv2d/kernel has shape {list(stem)}: an official ResNet stem is a "
            "7x7 or 3x3 conv of the 3 image channels"
        )
    stem_convs = 3 if three_conv else 1
    width_multiplier = kernels[stem_convs - 1][-1] / 64
    first = kernels.get(stem_convs + 1)  # the first block's first residual conv (its shortcut comes before)
    if first is None:
        raise UnmappableCheckpoint(
            f"{ENCODER_SCOPE}{layer_name('conv2d', stem_convs + 1)}/kernel is missing: "
            "it tells basic from bottleneck blocks"
        )
    bottleneck = first[0] == 1
    if bottleneck:
        unit = kernels.get(stem_convs + 2, ())
        sk = unit[:2] == (3, 3) and unit[-1] == 2 * first[-1]
        if three_conv and not sk:
            raise UnmappableCheckpoint(
                "the stem has three 3x3 convs (ResNet-D, sk_ratio > 0) but the first block has "
                "no selective-kernel unit: the official code builds both or neither"
            )
    else:
        if three_conv:
            raise UnmappableCheckpoint(
                "a ResNet-D stem (three 3x3 convs) with basic blocks: the official SK basic block "
                "pools its residual input and cannot be built at stride 2, so no official "
                "network has this layout"
            )
        sk = False
    count = max(kernels) + 1
    depths = [
        d
        for d in DEPTHS
        if resnet_layout(d)[0] == bottleneck and len(encoder_layers(d, sk=sk, cifar_stem=cifar_stem)[0]) == count
    ]
    if not depths:
        kind = "bottleneck" if bottleneck else "basic"
        raise UnmappableCheckpoint(
            f"the encoder has {count} conv layers ({ENCODER_SCOPE}conv2d ... "
            f"{layer_name('conv2d', count - 1)}) with {kind} blocks{' and selective kernels' * sk}: "
            f"no ResNet depth in {DEPTHS} has that many"
        )
    depth = depths[0]

    scopes = [s for s in PROJECTION_SCOPES if any(name.startswith(s + "/") for name in shapes)]
    if len(scopes) > 1:
        raise UnmappableCheckpoint(
            f"two projection heads ({' and '.join(scopes)}): which one is the network's is ambiguous"
        )
    scope = scopes[0] if scopes else None
    head = {}
    for name, shape in shapes.items():
        match = _HEAD_LAYER.fullmatch(name[len(scope) + 1 :]) if scope and name.startswith(scope + "/") else None
        if match:
            head[int(match[1])] = shape
    feature_dim = resnet_feature_dim(depth, width_multiplier)
    proj_layers = max(head) + 1 if head else 0
    hidden = head.get(0, (0, feature_dim))[-1] if proj_layers > 1 else feature_dim
    supervised = shapes.get(SUPERVISED_SCOPE + "kernel", (0, 0))
    arch = Architecture(
        depth=depth,
        width_multiplier=width_multiplier,
        cifar_stem=cifar_stem,
        sk_ratio=SK_RATIO if sk else 0.0,
        proj_layers=proj_layers,
        proj_out_dim=head.get(proj_layers - 1, (0, feature_dim))[-1],
        proj_hidden_dim=0 if hidden == feature_dim else hidden,
        projection_scope=scope if proj_layers else None,
        num_classes=supervised[-1],
        classifier_input_dim=supervised[0],
    )
    return _fit_sk_ratio(arch, kernels) if sk else arch


def _fit_sk_ratio(arch: Architecture, kernels: Mapping[int, Shape]) -> Architecture:
    """The first SK ratio whose SK units have the checkpoint's widths (SimCLR v2's, then each unit's own)."""
    convs, _ = encoder_layers(arch.depth, sk=True, cifar_stem=arch.cifar_stem)
    units = [i for i, path in enumerate(convs) if path[-1] == "mix_reduce" and i in kernels]
    filters = {i: kernels[i - 2][-1] for i in units if i - 2 in kernels}  # conv1 of the same block
    candidates = [SK_RATIO] + [kernels[i][-1] / f for i, f in filters.items()]
    for ratio in candidates:
        candidate = dataclasses.replace(arch, sk_ratio=ratio)
        shapes = abstract_shapes(candidate)
        if all(shapes.get(("params", ("encoder", *convs[i], "kernel"))) == kernels[i] for i in units):
            return candidate
    widths = sorted({kernels[i][-1] for i in units})
    raise UnmappableCheckpoint(
        f"the selective-kernel units' reduce convs have widths {widths}, which no sk_ratio "
        "gives (width max(int(filters * sk_ratio), 32))"
    )


def plan(shapes: Mapping[str, Shape]) -> Plan:
    """Classifies every checkpoint variable; refuses a checkpoint that does not map completely.

    Optimizer slots, `global_step` and the memory bank are set aside; every other variable must be a
    variable of the inferred network with the shape fnc_jax's network has, and the network must have
    no variable the checkpoint lacks.
    """
    ignored: dict[str, list[str]] = {"optimizer slots": [], "training state": []}
    network_names: dict[str, dict[str, Shape]] = {n: {} for n in NETWORKS}
    for name, shape in shapes.items():
        if name.endswith(OPTIMIZER_SLOT_SUFFIXES):
            ignored["optimizer slots"].append(name)
        elif name in TRAINING_STATE:
            ignored["training state"].append(name)
        elif name.startswith(EMA_PREFIX):
            network_names["ema"][name] = shape
        else:
            network_names["online"][name] = shape
    arch = infer_architecture(network_names["online"])
    networks = tuple(n for n in NETWORKS if network_names[n])
    expected = abstract_shapes(arch)
    targets = {n: variable_map(arch, n) for n in networks}
    problems = []
    for network in networks:
        found, wanted = network_names[network], targets[network]
        if unknown := set(found) - set(wanted):
            problems.append(f"{len(unknown)} variables that are no part of the inferred network: {_listing(unknown)}")
        if missing := set(wanted) - set(found):
            problems.append(f"missing {_listing(missing)}")
        for name in sorted(set(found) & set(wanted)):
            collection, path = wanted[name]
            need = _classifier_shape(arch, path) if path[0] == "head" else expected.get((collection, path))
            if found[name] != need:
                problems.append(
                    f"{name} has shape {list(found[name])} but fnc_jax's {collection}/{'/'.join(path)} "
                    f"needs {list(need) if need else 'a width that fits no hidden layer'}"
                )
    if problems:
        raise UnmappableCheckpoint(
            f"the checkpoint does not map completely onto a ResNet-{arch.depth} "
            f"(width {arch.width_multiplier:g}): " + "; ".join(problems)
        )
    covered = {target for t in targets.values() for target in t.values() if target[1][0] != "head"}
    if uncovered := set(expected) - covered:
        raise RuntimeError(
            f"fnc_jax's network has variables no official layer maps to: {_listing(map(str, uncovered))}"
        )
    return Plan(arch, networks, targets, {k: sorted(v) for k, v in ignored.items() if v})


def _classifier_shape(arch: Architecture, path: tuple[str, ...]) -> Shape | None:
    """The supervised head's shape, if its input width is one of the network's hiddens."""
    if not arch.classifier_selectors():
        return None
    return (arch.classifier_input_dim, arch.num_classes) if path[-1] == "kernel" else (arch.num_classes,)
