"""Errors in what the user asked for (a config value, a workdir, the data), as opposed to bugs.

The commands (`fnc_jax.main`, `fnc_jax.study`) turn a `UserError` into one line on stderr and exit
status 2 (`exit_on_user_error`); any other exception is a bug and keeps its traceback. Both concrete
classes keep their builtin base, so callers may still catch `ValueError` / `FileNotFoundError`.
"""

import sys
from collections.abc import Callable


class UserError(Exception):
    """Something the user can fix; the message names the field, the value and what is allowed."""


class ConfigError(UserError, ValueError):
    """An invalid or inconsistent setting (a config field, a flag, a workdir that holds another run)."""


class InputNotFoundError(UserError, FileNotFoundError):
    """A checkpoint, data directory or dataset that the config points to does not exist."""


def exit_on_user_error(run: Callable[[list[str]], None], argv: list[str]) -> None:
    """Runs a command's `run(argv)`: a UserError prints one line on stderr and exits with status 2."""
    try:
        run(argv)
    except UserError as error:
        print(f"fnc_jax: error: {error}", file=sys.stderr, flush=True)
        sys.exit(2)
