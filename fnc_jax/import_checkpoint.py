"""An official TF1 checkpoint (FNC, SimCLR v1/v2) as an fnc_jax workdir that every evaluation mode starts from.

    python -m fnc_jax.import_checkpoint --tf_checkpoint=PATH --workdir=DIR [--network=online|ema]

Writes `DIR/config.json` (the inferred `model` section and where the weights came from) and
`DIR/checkpoints/<global_step>/` (`interop.workdir` says what they hold). Prints what it found; a checkpoint
that does not map completely is refused with one line naming what did not fit, and exit status 2.
"""

from __future__ import annotations

import sys

from absl import app, flags, logging

from fnc_jax import errors
from fnc_jax.interop.tf1_names import NETWORKS
from fnc_jax.interop.workdir import import_to_workdir

FLAGS = flags.FLAGS


def define_flags() -> None:
    """Defined only when run as the command (not on import), so that it can share a process with `fnc_jax.main`."""
    flags.DEFINE_string(
        "tf_checkpoint", None, "Official TF1 checkpoint: a prefix (.../model.ckpt-N) or a directory; gs:// works."
    )
    flags.DEFINE_string("workdir", None, "New fnc_jax workdir to write (config.json + checkpoints/).")
    flags.DEFINE_enum("network", "online", NETWORKS, "online: base_model/; ema: the momentum encoder ema_model/.")
    flags.mark_flags_as_required(["tf_checkpoint", "workdir"])


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)  # orbax logs every save step at INFO
    try:
        ckpt = import_to_workdir(FLAGS.tf_checkpoint, FLAGS.workdir, FLAGS.network)
    except errors.UserError as error:  # UnmappableCheckpoint, no such checkpoint or EMA network, an existing workdir
        print(f"import_checkpoint: {FLAGS.tf_checkpoint}: {error}", file=sys.stderr)
        sys.exit(2)
    print("\n".join(ckpt.summary()))
    print(
        f"wrote {FLAGS.workdir}: the {FLAGS.network} network at step {ckpt.global_step or 0}; evaluate it with "
        f"--config.pretrained.workdir={FLAGS.workdir} and config.model = {ckpt.architecture.model_config()}"
    )


if __name__ == "__main__":
    define_flags()
    app.run(main)
