"""The trainer's two ways to stop that are not user errors: a failed run and a clean stop by a signal."""

from __future__ import annotations


class TrainingError(RuntimeError):
    """A run that must stop (non-finite loss, bad checkpoint): the message names the step or file."""


class StoppedBySignal(Exception):
    """SIGTERM/SIGINT stopped the run after a checkpoint; `exit_code` is 143 or 130."""

    def __init__(self, exit_code: int):
        super().__init__(exit_code)
        self.exit_code = exit_code

