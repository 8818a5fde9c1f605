#!/usr/bin/env bash
# The embedded-dataset study (python -m fnc_jax.study), grid by grid in priority order, paired seeds.
# Rerun the same command to resume: finished runs are skipped, half-finished ones resume from their
# checkpoints. Results: $OUT/results.md, $OUT/study.json and the PNGs (rewritten after every grid), and
# the README's study tables (the last line).
# On the quiet 2-core development VM a run takes about 1.5 minutes (the long recipe about 4), on a
# busy one up to 5 (15). The sweeps run seed 0 of every method first, so a study cut short has each
# method once (the report says how many seeds each method has).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-experiments/study}
PY=${PYTHON:-.venv/bin/python}
study() { "$PY" -m fnc_jax.study --out="$OUT" --seeds=0,1,2 "$@" || echo "study: a run of $* failed (recorded; going on)"; }
study --grid=all --methods=multiview,simclr_2view,fnc_attraction,fnc_elimination,attraction_oracle,elimination_oracle
study --grid=precision
study --grid=schedule
study --grid=threshold --seeds=0
study --grid=long --seeds=0
study --grid=debiased --seeds=0
study --grid=fnc --seeds=0
study --grid=long
study --grid=threshold
study --grid=debiased
study --grid=fnc
"$PY" -m fnc_jax.study --grid=all --out="$OUT" --report-only --readme=README.md
# The FN analysis mode on the best long-recipe checkpoint of the baseline and of FNC (by kNN@20; the README
# explains the selection with it). The checkpoints stay in the run dirs (not in git).
for run in long_multiview/seed2 long_fnc_attraction/seed0; do
  "$PY" -m fnc_jax.main --config=configs/default_fn_analysis.py --workdir="$OUT/fn_analysis/${run/\//_}" \
    --config.pretrained.workdir="$OUT/runs/$run" || echo "fn analysis of $run failed"
done
