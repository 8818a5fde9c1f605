"""An official TF1 checkpoint written as an fnc_jax workdir (`config.json` + `checkpoints/<step>/`).

The workdir holds the chosen network as a pretraining `TrainState`'s `params` / `batch_stats`; the optimiser
state, the EMA slots, the queue and the step key are left empty (None): evaluations read only the network
(`evaluation.restore`), so it is a starting point for evaluation, fine-tuning and transfer, not a run to resume.
The command line is `python -m fnc_jax.import_checkpoint`.
"""

from __future__ import annotations

import numpy as np
from etils import epath

from fnc_jax import checkpoints, errors
from fnc_jax.interop import tf1
from fnc_jax.step import TrainState


def import_to_workdir(tf_checkpoint: str, workdir: str, network: str = "online") -> tf1.Checkpoint:
    """Reads `tf_checkpoint`, writes the workdir and returns the read checkpoint (for its summary)."""
    ckpt = tf1.read(tf_checkpoint)
    _, variables = tf1.load(ckpt, network)
    workdir_path = epath.Path(workdir)
    store_dir = workdir_path / "checkpoints"
    if store_dir.exists() and any(store_dir.iterdir()):
        raise errors.ConfigError(
            f"--workdir={workdir} already holds checkpoints in {store_dir}: allowed is a new directory."
        )
    step = ckpt.global_step or 0
    record = {
        "model": ckpt.architecture.model_config(),
        "imported_from": {"tf_checkpoint": ckpt.path, "network": network, "global_step": ckpt.global_step},
    }
    checkpoints.record_config(workdir_path, record, start_over=False)
    state = TrainState(
        step=np.asarray(step, np.int32),
        params=variables["params"],
        batch_stats=variables["batch_stats"],
        opt_state=None,
        ema_params=None,
        ema_batch_stats=None,
        memory=None,
        memory_labels=None,
        rng=None,
    )
    store = checkpoints.Checkpoints(store_dir, keep=1)
    store.save(step, state)
    store.wait()
    store.close()
    return ckpt
