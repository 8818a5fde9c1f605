"""The evaluation network's starting variables: the restored pretrained modules (`evaluation.restore`)
merged with freshly initialised ones, replicated over the mesh, and the report of what came from where.

On resume the evaluation's own checkpoint holds everything, so the pretraining checkpoint is not read
again (it may be gone by then) and the report is read back from the workdir's `restore.json`.
"""

from __future__ import annotations

import functools
import json
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from fnc_jax import checkpoints, console, parallel
from fnc_jax.evaluation import restore
from fnc_jax.models import factory

RESTORE_FILE = "restore.json"


@functools.cache
def _init_fn(model, image_size: int, selection: tuple[tuple[str, str], ...]):
    """Jitted init returning only the `selection` modules: XLA prunes the rest (cheap to compile), and
    it runs on one device (the caller replicates), which compiles far faster than a sharded init."""

    def init(key):
        variables = model.init(key, jnp.zeros((2, image_size, image_size, 3), jnp.float32), train=False)
        fresh: dict = {}
        for collection, module in selection:
            fresh.setdefault(collection, {})[module] = variables[collection][module]
        return fresh

    return jax.jit(init)


def _abstract_variables(config: ml_collections.ConfigDict, model) -> dict:
    """{'params', 'batch_stats'} of the network as shapes (`jax.eval_shape`: nothing runs)."""
    size = config.data.image_size
    abstract = jax.eval_shape(
        lambda k: model.init(k, jnp.zeros((2, size, size, 3), jnp.float32), train=False), jax.random.PRNGKey(0)
    )
    return {"params": abstract["params"], "batch_stats": abstract.get("batch_stats", {})}


def initial_variables(
    config: ml_collections.ConfigDict, model, source: restore.PretrainedSource, mesh: jax.sharding.Mesh
) -> tuple[dict, dict[str, Any]]:
    """The evaluation network's starting variables, replicated over the mesh, and the restore report.

    The modules that `restore.RESTORED_MODULES` lists come from the checkpoint; the others
    (the classifier `head`; everything for a random-init baseline without checkpoint) are initialised
    with `config.seed`.
    """
    replicated = parallel.replicated(mesh)
    abstract = _abstract_variables(config, model)
    modules = restore.RESTORED_MODULES
    network = config.pretrained.network
    pretrained = None
    if source.step_dir is not None:
        pretrained = restore.load_network(source, network=network, modules=modules, sharding=replicated)
    selection = restore.fresh_modules(abstract, pretrained is not None, modules)
    fresh = {}
    if selection:
        fresh = _init_fn(model, config.data.image_size, selection)(factory.init_key(config.seed))
        fresh = restore.replicate(fresh, replicated)
    variables, report = restore.merge_pretrained(abstract, fresh, pretrained, restored_modules=modules)
    info = {
        "checkpoint": None if source.step_dir is None else str(source.step_dir),
        "step": source.step,
        "network": network,
        **report,
        "not_read": restore.not_read(source, report, network),
    }
    return variables, info


def _has_checkpoint(directory: epath.Path) -> bool:
    if not directory.is_dir():
        return False
    manager = ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(read_only=True))
    latest = manager.latest_step()
    manager.close()
    return latest is not None


def _placeholder_variables(config, model, mesh) -> dict:
    """Zeros with the network's structure, replicated: a restore target (nothing compiled)."""
    abstract = _abstract_variables(config, model)
    return restore.replicate(jax.tree.map(lambda x: np.zeros(x.shape, x.dtype), abstract), parallel.replicated(mesh))


def starting_variables(config, model, source, mesh, workdir: epath.Path) -> tuple[dict, dict]:
    """`initial_variables`, except on resume: then the run's own checkpoint holds everything, so the
    pretraining checkpoint is not read again (it may be gone) and the report comes from restore.json."""
    report_path = workdir / RESTORE_FILE
    if _has_checkpoint(workdir / "checkpoints") and report_path.exists():
        return _placeholder_variables(config, model, mesh), json.loads(report_path.read_text())
    variables, report = initial_variables(config, model, source, mesh)
    if jax.process_index() == 0:
        checkpoints.write_json_atomic(report_path, report)
    return variables, report


def print_restore(report: dict) -> None:
    console.say(
        f"Pretrained weights: {report['checkpoint'] or 'none (random initialisation)'}"
        + (f" (step {report['step']}, {report['network']} network)" if report["checkpoint"] else "")
        + f"; restored {', '.join(report['restored']) or 'nothing'}"
        + f"; initialised {', '.join(report['initialised']) or 'nothing'}"
    )
