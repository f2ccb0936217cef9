"""User-facing errors. The CLI turns `UserError` into one message and exit code 2; anything else
is a bug or a failed run (exit 1)."""
from __future__ import annotations


class UserError(Exception):
    """Bad input: a recipe, an argument, missing data. The message says what and what to do."""


class RunFailed(Exception):
    """A run could not finish (NaN loss, crash in a method); the sweep records it and goes on."""


class DiskFull(Exception):
    """Writing a run's files failed for lack of space: the sweep stops (exit 1), the run resumes
    from its last good checkpoint once there is room."""

    def __init__(self, path: object) -> None:
        self.path = str(path)
        super().__init__(f"disk full at {self.path}; free space and re-run (the run resumes from its last good checkpoint)")
