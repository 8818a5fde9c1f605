#!/usr/bin/env bash
# The embedded-dataset study (python -m fnc_jax.study), grid by grid in priority order, 3 paired seeds.
# Rerun the same command to resume: finished runs are skipped, half-finished ones resume from their
# checkpoints. Results: $OUT/results.md, $OUT/study.json and the PNGs (rewritten after every grid).
# On the 2-core development VM a run takes 3-6 minutes (the long recipe 3x that); all of it about 5-6 hours.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-experiments/study}
PY=${PYTHON:-.venv/bin/python}
study() { "$PY" -m fnc_jax.study --out="$OUT" --seeds=0,1,2 "$@" || echo "study: a run of $* failed (recorded; going on)"; }
study --grid=all --methods=multiview,simclr_2view,fnc_attraction,fnc_elimination,attraction_oracle,elimination_oracle
study --grid=precision
study --grid=schedule
study --grid=debiased
study --grid=threshold
study --grid=fnc
study --grid=long
"$PY" -m fnc_jax.study --grid=all --out="$OUT" --report-only
