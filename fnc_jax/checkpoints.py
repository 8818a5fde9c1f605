"""Checkpoints (orbax) and the workdir's config record.

- Saves are asynchronous and atomic: orbax writes into a temporary directory and renames it when
  complete, so a kill at any moment leaves the previous checkpoints intact and `latest_step` only
  ever sees complete ones (leftover temporaries are cleaned on the next start).
- The resolved config is written to `config.json`; a run restarted in the same workdir with a
  config that changes the model, batch, views or objective is refused (`configuration.RESUMABLE_CHANGES`
  lists what may change), unless the user asks to start over, which moves the old run aside.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

import jax
import orbax.checkpoint as ocp
from etils import epath

from fnc_jax import configuration, errors

CONFIG_FILE = "config.json"


class Checkpoints:
    """Thin wrapper over `ocp.CheckpointManager` for one pytree (the train state)."""

    def __init__(self, directory: str | os.PathLike, *, keep: int):
        self.manager = ocp.CheckpointManager(
            epath.Path(directory),
            options=ocp.CheckpointManagerOptions(
                max_to_keep=keep, create=True, enable_async_checkpointing=True, cleanup_tmp_directories=True
            ),
        )

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: Any) -> None:
        self.manager.save(step, args=ocp.args.StandardSave(state), force=True)

    def restore(self, like: Any, step: int | None = None) -> Any:
        """Restores `step` (default: the latest) with the shapes, dtypes and shardings of `like`."""
        step = self.latest_step() if step is None else step
        abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), like)
        return self.manager.restore(step, args=ocp.args.StandardRestore(abstract))

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()


def record_config(
    workdir: str | os.PathLike, config_dict: dict, *, start_over: bool, defaults: dict | None = None
) -> None:
    """Writes `config.json`, refusing an incompatible config for an existing run (process 0 only).

    With `start_over`, an existing run (checkpoints, logs, config) is moved to
    `workdir/previous-<time>/` rather than deleted, so nothing already written is lost. `defaults` (the
    base config) lets a run written before a field existed resume while that field is at its default.
    """
    workdir = epath.Path(workdir)
    try:
        workdir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise _unusable_workdir(workdir, error) from None
    path = workdir / CONFIG_FILE
    if path.exists():
        old = json.loads(path.read_text())
        changes = configuration.incompatible_changes(old, config_dict, defaults)
        if changes and not start_over:
            raise errors.ConfigError(
                f"The workdir {workdir} holds a run with a different config ({', '.join(changes)} changed). "
                "Use another --workdir, restore those values, or pass --start_over to move the old run to "
                "workdir/previous-<time>/ and start again."
            )
        if start_over:
            backup = workdir / f"previous-{time.strftime('%Y%m%d-%H%M%S')}"
            backup.mkdir()
            for entry in workdir.iterdir():
                if entry.name != backup.name and not entry.name.startswith("previous-"):
                    entry.rename(backup / entry.name)
    try:
        write_json_atomic(path, config_dict)  # a kill never leaves a half-written config.json
    except OSError as error:
        raise _unusable_workdir(workdir, error) from None


def _unusable_workdir(workdir: epath.Path, error: OSError) -> errors.ConfigError:
    return errors.ConfigError(
        f"--workdir={str(workdir)!r} is invalid ({error.strerror or error}): allowed are writable directories, "
        "or paths where one can be created."
    )


def write_json_atomic(path: str | os.PathLike, payload: dict) -> None:
    path = epath.Path(path)
    tmp = path.parent / (path.name + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2, sort_keys=True, default=float))
    tmp.replace(path)  # atomic overwrite (epath's rename refuses an existing destination)
