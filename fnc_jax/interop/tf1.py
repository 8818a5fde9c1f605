"""Official TF1 checkpoints (FNC, SimCLR v1 and v2) as fnc_jax networks.

    ckpt = tf1.read("gs://fnc_checkpoints/ResNet-50/pretrained_linear_eval")  # or a local path
    print("\\n".join(ckpt.summary()))
    model, variables = tf1.load(ckpt, network="online")  # a ContrastiveModel and its variables
    out = tf1.features(ckpt, images)  # {"encoder": (N, F), "projection": (N, d)[, "logits"]}

A path is whatever `tf.train.load_checkpoint` takes (a checkpoint prefix such as `.../model.ckpt-3`, or a
directory with a `checkpoint` file; `gs://` through TensorFlow's file systems). `tf1_names` infers the
architecture and maps every variable; the imported network reproduces the official inference outputs
(the tests check every stage of two checkpoints written by the official code). Images are NHWC float32
in [0, 1] with no normalisation, as the official input pipeline feeds them.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import numpy as np
import tensorflow as tf
from flax import traverse_util

from fnc_jax import errors
from fnc_jax.interop import tf1_names
from fnc_jax.interop.tf1_names import NETWORKS, Architecture, Plan, UnmappableCheckpoint
from fnc_jax.models import ClassifierModel, ContrastiveModel

__all__ = ["Checkpoint", "UnmappableCheckpoint", "features", "load", "load_classifier", "read"]


@dataclasses.dataclass(frozen=True)
class Checkpoint:
    """An official checkpoint whose every variable is accounted for (`read`); tensors are read on demand."""

    path: str
    plan: Plan
    global_step: int | None
    reader: Any  # tf.train.load_checkpoint's CheckpointReader

    @property
    def architecture(self) -> Architecture:
        return self.plan.architecture

    def tensors(self, network: str, modules: tuple[str, ...]) -> dict:
        """{'params': ..., 'batch_stats': ...} of `modules` of one network, as float32 numpy arrays."""
        _check_network(self, network)
        flat = {
            (collection, *path): np.asarray(self.reader.get_tensor(name), np.float32)
            for name, (collection, path) in self.plan.targets[network].items()
            if path[0] in modules
        }
        tree = traverse_util.unflatten_dict(flat)
        return {"params": tree.get("params", {}), "batch_stats": tree.get("batch_stats", {})}

    def summary(self) -> list[str]:
        """What was found, what is read and what is set aside, one fact per line."""
        arch, plan = self.architecture, self.plan
        kind = (
            f"{tf1_names.PROJECTION_SCOPES[arch.projection_scope]} ({arch.projection_scope})"
            if arch.projection_scope
            else "no projection head (SimCLR v1 release)"
        )
        step = "no global_step" if self.global_step is None else f"global_step {self.global_step}"
        lines = [f"TF1 checkpoint {self.path}: {kind}, {step}", *arch.describe()]
        for network in plan.networks:
            scope = tf1_names.EMA_PREFIX if network == "ema" else ""
            lines.append(
                f"{network} network ({scope}{tf1_names.ENCODER_SCOPE}...): "
                f"{len(plan.targets[network])} variables mapped"
            )
        for why, names in plan.ignored.items():
            if why == "optimizer slots":
                kinds = sorted({"*/" + name.rsplit("/", 1)[-1] for name in names})
                lines.append(f"not read, {why}: {len(names)} ({', '.join(kinds)})")
            else:
                lines.append(f"not read, {why}: {', '.join(names)}")
        return lines


def read(checkpoint_path: str) -> Checkpoint:
    """Lists the checkpoint, infers its architecture and maps every variable (raises `UnmappableCheckpoint`)."""
    try:
        reader = tf.train.load_checkpoint(checkpoint_path)
    except (tf.errors.OpError, ValueError) as error:
        first_line = str(error).strip().splitlines()[0]
        raise errors.InputNotFoundError(
            f"no TF checkpoint at {checkpoint_path!r} ({first_line}): allowed are a checkpoint prefix "
            "(.../model.ckpt-N) or a directory with a `checkpoint` file, local or gs://."
        ) from error
    shapes = {name: tuple(shape) for name, shape in reader.get_variable_to_shape_map().items()}
    plan = tf1_names.plan(shapes)
    step = int(reader.get_tensor("global_step")) if "global_step" in shapes else None
    return Checkpoint(str(checkpoint_path), plan, step, reader)


def _check_network(ckpt: Checkpoint, network: str) -> None:
    if network not in NETWORKS:
        raise errors.ConfigError(f"network={network!r} is invalid: allowed values are {', '.join(NETWORKS)}.")
    if network not in ckpt.plan.networks:
        raise errors.ConfigError(
            f"network={network!r} but {ckpt.path} holds no {tf1_names.EMA_PREFIX} network: "
            f"allowed is {', '.join(repr(n) for n in ckpt.plan.networks)}."
        )


def _as_checkpoint(checkpoint: Checkpoint | str) -> Checkpoint:
    return checkpoint if isinstance(checkpoint, Checkpoint) else read(checkpoint)


def load(checkpoint: Checkpoint | str, network: str = "online") -> tuple[ContrastiveModel, dict]:
    """The encoder + projection head of the online network or of the momentum encoder (`network='ema'`)."""
    ckpt = _as_checkpoint(checkpoint)
    return ckpt.architecture.network(), ckpt.tensors(network, ("encoder", "projection_head"))


def resolve_selector(arch: Architecture, ft_proj_selector: int | None) -> int | None:
    """Which hidden the supervised head reads: the caller's `ft_proj_selector`, else the only one of its width.

    Returns None when the checkpoint has no supervised head, or when several hiddens have its input
    width (the official fine-tuned checkpoints: features and projection layers are all 2048-d) and
    the caller did not say.
    """
    selectors = arch.classifier_selectors()
    if ft_proj_selector is None:
        return selectors[0] if len(selectors) == 1 else None
    if not arch.num_classes:
        raise ValueError(
            f"ft_proj_selector={ft_proj_selector} is invalid: the checkpoint has no "
            f"{tf1_names.SUPERVISED_SCOPE} head; allowed is None."
        )
    if ft_proj_selector not in selectors:
        raise ValueError(
            f"ft_proj_selector={ft_proj_selector} is invalid: the supervised head reads a "
            f"{arch.classifier_input_dim}-d input; allowed are {selectors} (hidden widths "
            f"{arch.hidden_dims()})."
        )
    return ft_proj_selector


def load_classifier(checkpoint: Checkpoint | str, ft_proj_selector: int | None = None) -> tuple[ClassifierModel, dict]:
    """The online network with its supervised head `head_supervised` on hidden `ft_proj_selector`."""
    ckpt = _as_checkpoint(checkpoint)
    arch = ckpt.architecture
    selector = resolve_selector(arch, ft_proj_selector)
    if selector is None:
        raise ValueError(
            f"ft_proj_selector={ft_proj_selector} is invalid for {ckpt.path}: "
            + (
                f"allowed are {arch.classifier_selectors()}."
                if arch.num_classes
                else "the checkpoint has no supervised head."
            )
        )
    model = arch.classifier(selector)
    modules = ("encoder", "head") + (("projection_head",) if selector else ())
    return model, ckpt.tensors("online", modules)


@functools.cache
def _forward(model):
    return jax.jit(functools.partial(model.apply, train=False))


def _apply(model, variables, images: np.ndarray):
    # The parity entry point computes in full float32 (GPUs would otherwise use TF32 matmuls and convs).
    with jax.default_matmul_precision("highest"):
        return jax.tree.map(np.asarray, _forward(model)(variables, images))


def features(
    checkpoint: Checkpoint | str, images, network: str = "online", ft_proj_selector: int | None = None
) -> dict[str, np.ndarray]:
    """The imported network's outputs for `images` (N, H, W, 3) float32 in [0, 1], BatchNorm in inference mode.

    `encoder`: pooled features (N, F); `projection`: the head's output (N, d), not l2-normalised, absent
    without a projection head; `logits`: the supervised head's (online network only), when the
    checkpoint has one and its input is known (`resolve_selector`).
    """
    images = np.asarray(images, np.float32)
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"images of shape {images.shape} are invalid: allowed are (N, H, W, 3) float32 in [0, 1].")
    ckpt = _as_checkpoint(checkpoint)
    model, variables = load(ckpt, network)
    out = _apply(model, variables, images)
    result = {"encoder": out["features"]}
    if ckpt.architecture.proj_layers:
        result["projection"] = out["projection"]
    if network == "online" and resolve_selector(ckpt.architecture, ft_proj_selector) is not None:
        classifier, classifier_variables = load_classifier(ckpt, ft_proj_selector)
        result["logits"] = _apply(classifier, classifier_variables, images)
    return result
