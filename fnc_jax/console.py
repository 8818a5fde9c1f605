"""What a run tells the person watching it: one line, logged on every process, printed by process 0."""

from __future__ import annotations

import logging

import jax


def say(line: str) -> None:
    logging.info(line)
    if jax.process_index() == 0:
        print(line, flush=True)
