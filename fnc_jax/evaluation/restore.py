"""Starting an evaluation from a pretraining checkpoint: find it, read it, and apply the restore rules.

A pretraining checkpoint is the orbax save of `step.TrainState` (`checkpoints.Checkpoints`):
`<workdir>/checkpoints/<step>/default/` holding `step`, `params`, `batch_stats`, `opt_state`,
`ema_params`, `ema_batch_stats`, `memory`, `memory_labels` and `rng`. Evaluations read the saved tree
directly (orbax partial restore of the chosen network's `params` / `batch_stats` only), so they never
need the pretraining optimiser, queue or config. A workdir written by `python -m fnc_jax.import_checkpoint`
(an official TF1 checkpoint) is the same save with only `step`, `params` and `batch_stats` filled.

Restore rules (training recipe §5, §6, §9.1 bug 7), per top-level module of the evaluation network:

| mode | from the checkpoint | initialised here | never read |
|---|---|---|---|
| linear_eval | `encoder` (+ `projection_head` when `ft_proj_selector` != 0) | `head` (zero) | step, optimiser slots, `probe`, queue, rng, the other network |
| finetune, transfer | `encoder`, `projection_head` | `head` (zero) | same |
| knn, fn_analysis | `encoder`, `projection_head` | — | same |

With `ft_proj_selector = 0` (the linear-evaluation protocol) the classifier network has no projection
head, so linear evaluation restores exactly the encoder; fine-tuning (`ft_proj_selector = 1`) restores
the projection head as well. The official linear-eval regex (`(?!global_step|LARSOptimizer|head)`)
would leave a projection head re-initialised; fnc_jax restores it when a non-zero selector asks for
it, since a frozen random projection would be meaningless. Parameters *and* BatchNorm moving
statistics of the restored modules come from the checkpoint; a restored module must match the
network exactly (same leaves, same shapes), otherwise the error names the first mismatch.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from flax import traverse_util

from fnc_jax import errors

NETWORKS = ("online", "ema")  # a memory-mode checkpoint holds both; `ema_` prefixes the EMA one
ITEM = "default"  # the item directory a CheckpointManager gives a single StandardSave item
COLLECTIONS = ("params", "batch_stats")
# Every mode restores these (those the evaluation network has: no projection head at ft_proj_selector 0).
RESTORED_MODULES = ("encoder", "projection_head")
STATE_FIELDS_NEVER_READ = ("step", "opt_state", "memory", "memory_labels", "rng")
MODEL_FIELDS = ("depth", "width_multiplier", "sk_ratio", "se_ratio", "proj_layers", "proj_out_dim", "proj_hidden_dim")


@dataclasses.dataclass(frozen=True)
class PretrainedSource:
    """Where the weights come from: a checkpoint step directory, or None for a random initialisation."""

    step_dir: epath.Path | None
    step: int | None
    run_config: dict | None  # the pretraining run's config.json, when found next to its checkpoints

    def describe(self) -> str:
        return "random initialisation" if self.step_dir is None else f"{self.step_dir} (step {self.step})"


def _absolute(path: str) -> epath.Path:
    """Local paths made absolute: through a relative one, orbax's metadata reads silently return None."""
    return epath.Path(path if "://" in path else os.path.abspath(path))


def find_checkpoint(pretrained: ml_collections.ConfigDict) -> PretrainedSource:
    """Resolves `config.pretrained` to a complete checkpoint step directory; errors name the field."""
    if pretrained.checkpoint:
        step_dir = _absolute(pretrained.checkpoint)
        if not (step_dir / ITEM).is_dir():
            raise errors.InputNotFoundError(
                f"config.pretrained.checkpoint={pretrained.checkpoint!r} is not a checkpoint step directory "
                f"(no {ITEM}/ inside): allowed are directories such as <pretraining workdir>/checkpoints/<step>."
            )
        step = int(step_dir.name) if step_dir.name.isdigit() else None
        return PretrainedSource(step_dir, step, _read_run_config(step_dir.parent.parent))
    if pretrained.workdir:
        workdir = _absolute(pretrained.workdir)
        directory = workdir / "checkpoints"
        steps = []
        if directory.is_dir():
            manager = ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(read_only=True))
            steps = sorted(manager.all_steps())
            manager.close()
        if not steps:
            raise errors.InputNotFoundError(
                f"config.pretrained.workdir={pretrained.workdir!r} holds no complete checkpoint in {directory}: "
                "allowed are workdirs of a pretraining run (python -m fnc_jax.main --config=configs/<pretrain>.py)."
            )
        step = steps[-1] if pretrained.step == -1 else pretrained.step
        if step not in steps:
            raise errors.ConfigError(
                f"config.pretrained.step={pretrained.step} is not saved in {directory}: allowed are -1 (latest) "
                f"or one of {steps}."
            )
        return PretrainedSource(directory / str(step), step, _read_run_config(workdir))
    return PretrainedSource(None, None, None)


def _read_run_config(workdir: epath.Path) -> dict | None:
    path = workdir / "config.json"
    return json.loads(path.read_text()) if path.exists() else None


def check_model_matches(config: ml_collections.ConfigDict, source: PretrainedSource) -> None:
    """Compares `config.model` (and the CIFAR stem) with the pretraining run's config.json, if found."""
    run = source.run_config
    if not run or "model" not in run:
        return
    for field in MODEL_FIELDS:
        mine, theirs = config.model[field], run["model"].get(field)
        if theirs is not None and mine != theirs:
            raise errors.ConfigError(
                f"config.model.{field}={mine!r} does not match the pretraining run ({theirs!r} in "
                f"{source.step_dir.parent.parent / 'config.json'}): allowed is {theirs!r}."
            )
    stem, size = run["model"].get("stem", "auto"), run.get("data", {}).get("image_size")
    if size is None and stem == "auto":  # an imported checkpoint's config.json names its stem, with no image size
        return
    theirs = _cifar_stem(stem, size)
    if _cifar_stem(config.model.stem, config.data.image_size) != theirs:
        wanted = "cifar" if theirs else "imagenet"
        raise errors.ConfigError(
            f"config.model.stem={config.model.stem!r} with config.data.image_size={config.data.image_size} selects the "
            f"{'imagenet' if theirs else 'cifar'} ResNet stem but the pretraining run used the {wanted} stem "
            f"(model.stem={stem!r}{'' if size is None else f' at image_size={size}'}): allowed is "
            f"model.stem={wanted!r} (or 'auto' with image_size {'<=' if theirs else '>'} 32)."
        )


def _cifar_stem(stem: str, image_size: int) -> bool:
    """`models.factory.uses_cifar_stem` on plain values (a run's config.json)."""
    return stem == "cifar" or (stem == "auto" and image_size <= 32)


def read_tree_metadata(step_dir: epath.Path) -> dict:
    """The saved tree's structure, each leaf an orbax ArrayMetadata (shape, dtype)."""
    return ocp.PyTreeCheckpointer().metadata(step_dir / ITEM).item_metadata.tree


def replicate(tree: Any, sharding: jax.sharding.Sharding) -> Any:
    """Host or single-device arrays → global arrays with `sharding` (every process passes the same values).

    `make_array_from_callback` slices on the host, so nothing is compiled and it works on any number of
    processes."""

    def one(x):
        host = np.asarray(x)
        return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])

    return jax.tree.map(one, tree)


def load_network(source: PretrainedSource, *, network: str, modules: tuple[str, ...], sharding) -> dict:
    """{'params': {module: ...}, 'batch_stats': {module: ...}} of `modules` from the checkpoint.

    `network` is 'online' (`params`, `batch_stats`) or 'ema' (`ema_params`, `ema_batch_stats`, only
    saved in memory mode). Only these arrays are read (as host arrays, whatever the device layout of the
    pretraining run), then placed with `sharding`.
    """
    tree = read_tree_metadata(source.step_dir)
    keys = {"params": "params", "batch_stats": "batch_stats"}
    if network == "ema":
        keys = {"params": "ema_params", "batch_stats": "ema_batch_stats"}
        if not tree.get("ema_params"):
            raise errors.ConfigError(
                f"config.pretrained.network='ema' but {source.step_dir} holds no EMA network (pretrained without "
                "memory): allowed is 'online'."
            )
    subset = {}
    for key in keys.values():
        saved = tree.get(key) or {}
        subset[key] = {m: saved[m] for m in modules if m in saved}
    abstract = jax.tree.map(lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype), subset)
    restored = ocp.PyTreeCheckpointer().restore(
        source.step_dir / ITEM,
        args=ocp.args.PyTreeRestore(
            item=abstract,
            restore_args=jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), abstract),
            partial_restore=True,
        ),
    )
    return replicate({collection: restored[key] for collection, key in keys.items()}, sharding)


def _path(parts: tuple[str, ...]) -> str:
    return "/".join(parts)


def merge_pretrained(
    abstract: dict, fresh: dict, pretrained: dict | None, *, restored_modules: tuple[str, ...]
) -> tuple[dict, dict]:
    """The evaluation network's variables: `restored_modules` from `pretrained`, the rest from `fresh`.

    `abstract` is the network's full variable structure (`jax.eval_shape` of its init); `fresh` holds
    initialised values of every module that is not restored (all of them when `pretrained` is None).
    Returns (variables, report) with report lists of `collection/module` names: `restored` (read from
    the checkpoint) and `initialised` (e.g. the zero-initialised `head`). Every leaf of a restored
    module must exist in the checkpoint with the same shape, and vice versa.
    """
    variables: dict = {}
    report: dict[str, list[str]] = {"restored": [], "initialised": []}
    for collection, modules in abstract.items():
        variables[collection] = {}
        for module, value in modules.items():
            name = f"{collection}/{module}"
            if pretrained is None or module not in restored_modules:
                variables[collection][module] = fresh[collection][module]
                report["initialised"].append(name)
                continue
            source = pretrained.get(collection, {}).get(module)
            if source is None:
                raise errors.ConfigError(
                    f"The checkpoint has no {name}, which the evaluation network needs: check config.model against "
                    "the pretraining config."
                )
            mine, saved = traverse_util.flatten_dict(value), traverse_util.flatten_dict(source)
            for key in sorted(set(mine) | set(saved)):
                a, b = mine.get(key), saved.get(key)
                if a is None or b is None or a.shape != b.shape:
                    raise errors.ConfigError(
                        f"{name}/{_path(key)}: the network has "
                        f"{'no such variable' if a is None else f'shape {a.shape}'}, the checkpoint "
                        f"{'has none' if b is None else f'shape {b.shape}'}; config.model (or data.image_size) "
                        "must match the pretraining run."
                    )
            variables[collection][module] = jax.tree.map(lambda x, y: x.astype(y.dtype), source, value)
            report["restored"].append(name)
    return variables, report


def fresh_modules(abstract: dict, pretrained: bool, restored_modules: tuple[str, ...]) -> tuple[tuple[str, str], ...]:
    """(collection, module) pairs that get initialised rather than restored."""
    return tuple(
        (collection, module)
        for collection, modules in abstract.items()
        for module in modules
        if not pretrained or module not in restored_modules
    )


def not_read(source: PretrainedSource, report: dict, network: str) -> list[str]:
    """Everything saved in the checkpoint that the evaluation does not read, by top-level name."""
    if source.step_dir is None:
        return []
    tree = read_tree_metadata(source.step_dir)
    prefix = "ema_" if network == "ema" else ""
    used = set(report["restored"])
    names = []
    for key, value in tree.items():
        if key in (prefix + "params", prefix + "batch_stats") and isinstance(value, dict):
            collection = key.removeprefix(prefix)
            names += [f"{key}/{m}" for m in value if f"{collection}/{m}" not in used]
        elif value is not None and not (isinstance(value, dict) and not value):
            names.append(key)
    return names
