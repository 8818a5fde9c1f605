"""An official TF1 checkpoint (FNC, SimCLR v1/v2) as an fnc_jax workdir that every evaluation mode starts from.

    python -m fnc_jax.import_checkpoint --tf_checkpoint=PATH --workdir=DIR [--network=online|ema]

Writes `DIR/config.json` (the inferred `model` section and where the weights came from) and
`DIR/checkpoints/<global_step>/`, the orbax save of a pretraining `TrainState` holding the chosen network
as `params` / `batch_stats`. Evaluations read only those two (`evaluation.restore`); the optimiser state,
the EMA slots, the queue and the step key are left empty (None), so the workdir is a starting point for
evaluation, fine-tuning and transfer, not a pretraining run to resume. Prints what it found; a checkpoint
that does not map completely is refused with one line naming what did not fit, and exit status 2.
"""

from __future__ import annotations

import sys

import numpy as np
from absl import app, flags, logging
from etils import epath

from fnc_jax import checkpoints, errors
from fnc_jax.interop import tf1
from fnc_jax.interop.tf1_names import NETWORKS
from fnc_jax.step import TrainState

_TF_CHECKPOINT = flags.DEFINE_string(
    "tf_checkpoint", None, "Official TF1 checkpoint: a prefix (.../model.ckpt-N) or a directory; gs:// works."
)
_WORKDIR = flags.DEFINE_string("workdir", None, "New fnc_jax workdir to write (config.json + checkpoints/).")
_NETWORK = flags.DEFINE_enum("network", "online", NETWORKS, "online: base_model/; ema: the momentum encoder ema_model/.")


def import_to_workdir(tf_checkpoint: str, workdir: str, network: str = "online") -> tf1.Checkpoint:
    """Reads `tf_checkpoint`, writes the workdir and returns the read checkpoint (for its summary)."""
    ckpt = tf1.read(tf_checkpoint)
    _, variables = tf1.load(ckpt, network)
    workdir_path = epath.Path(workdir)
    store_dir = workdir_path / "checkpoints"
    if store_dir.exists() and any(store_dir.iterdir()):
        raise errors.ConfigError(f"--workdir={workdir} already holds checkpoints in {store_dir}: allowed is a new directory.")
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


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)  # orbax logs every save step at INFO
    try:
        ckpt = import_to_workdir(_TF_CHECKPOINT.value, _WORKDIR.value, _NETWORK.value)
    except errors.UserError as error:  # UnmappableCheckpoint, no such checkpoint or EMA network, an existing workdir
        print(f"import_checkpoint: {_TF_CHECKPOINT.value}: {error}", file=sys.stderr)
        sys.exit(2)
    print("\n".join(ckpt.summary()))
    print(f"wrote {_WORKDIR.value}: the {_NETWORK.value} network at step {ckpt.global_step or 0}; evaluate it with "
          f"--config.pretrained.workdir={_WORKDIR.value} and config.model = {ckpt.architecture.model_config()}")


if __name__ == "__main__":
    flags.mark_flags_as_required(["tf_checkpoint", "workdir"])
    app.run(main)
