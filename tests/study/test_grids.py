import pytest

from fnc_jax import config_base, errors
from fnc_jax.study import grids


def test_every_grid_names_existing_fields():
    base = config_base.pretrain_config()
    for name in grids.GRIDS:
        grids.validate(grids.grid(name), base)


def test_unknown_field_and_grid_are_refused():
    bad = (grids.Method("multiview", {"fn.no_such_field": 1}),)
    with pytest.raises(errors.ConfigError, match="config.fn.no_such_field"):
        grids.validate(bad, config_base.pretrain_config())
    with pytest.raises(errors.ConfigError, match="allowed grids"):
        grids.grid("nope")
