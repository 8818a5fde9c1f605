"""The small-scale study (issue 14): `python -m fnc_jax.study --grid=NAME --seeds=0,1,2 --out=DIR`.

`grids` (the named grids as data), `runner` (one training process per method and seed, resumable),
`report` and `plots` (results.md, study.json and the PNGs from what has finished).
"""
