"""Command-line entry point: `python -m fnc_jax.main --config=configs/<name>.py --workdir=DIR`.

Any config field can be overridden as `--config.<field>=<value>`. On several hosts, JAX's
distributed runtime is initialised first (automatically on Cloud TPU pods and under SLURM, or with
--coordinator_address/--num_processes/--process_id); only process 0 writes logs and results.
`config.mode` picks the run: `pretrain` (`fnc_jax.pretrain`) or an evaluation (`fnc_jax.evaluate`).
An error in what was asked for (`errors.UserError`: a config value, the workdir, the data) prints one
line and exits with status 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import json
import logging

from absl import app, flags
from ml_collections import config_flags

from fnc_jax import distributed, errors

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file (configs/*.py).", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and results.json.")
_START_OVER = flags.DEFINE_bool(
    "start_over", False, "Move an existing run in --workdir to workdir/previous-<time>/ and start again."
)
distributed.define_flags()
flags.mark_flags_as_required(["config", "workdir"])


def run(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    distributed.initialize_from_flags()  # before any other JAX call
    import jax  # noqa: PLC0415 (imported after the distributed runtime is set up)

    from fnc_jax import config_base  # noqa: PLC0415 (after the distributed runtime is set up)

    config = _CONFIG.value
    logging.info(
        "JAX %s: %d processes, %d devices (%s)",
        jax.__version__,
        jax.process_count(),
        jax.device_count(),
        jax.devices()[0].device_kind,
    )
    if config.get("mode") == config_base.PRETRAIN:
        from fnc_jax import pretrain  # noqa: PLC0415

        results = pretrain.run(config, _WORKDIR.value, start_over=_START_OVER.value)
    else:
        from fnc_jax import evaluate  # noqa: PLC0415

        results = evaluate.run(config, _WORKDIR.value, start_over=_START_OVER.value)
    if jax.process_index() == 0:
        summary = {k: v for k, v in results.items() if k != "config"}
        print(json.dumps(summary, indent=2, default=float))


def main(argv: list[str]) -> None:
    errors.exit_on_user_error(run, argv)


if __name__ == "__main__":
    app.run(main)
