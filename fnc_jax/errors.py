"""Errors in what the user asked for (a config value, a workdir, the data), as opposed to bugs.

The command line (`fnc_jax.main`) turns a `UserError` into one line on stderr and exit status 2;
any other exception is a bug and keeps its traceback. Both concrete classes keep their builtin base,
so callers may still catch `ValueError` / `FileNotFoundError`.
"""


class UserError(Exception):
    """Something the user can fix; the message names the field, the value and what is allowed."""


class ConfigError(UserError, ValueError):
    """An invalid or inconsistent setting (a config field, a flag, a workdir that holds another run)."""


class InputNotFoundError(UserError, FileNotFoundError):
    """A checkpoint, data directory or dataset that the config points to does not exist."""
