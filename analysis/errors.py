"""The one exception type for errors a person can cause.

Pages show its message with `st.error` and keep running; the command line prints it and exits with status 2.
The message always says what to do about it.
"""
from __future__ import annotations


class WorkbenchError(Exception):
    """An error caused by input (a model id, a prompt, a spec, a file), with a message that says what to do."""

    def __init__(self, message: str, *, hint: str | None = None):
        self.hint = hint
        super().__init__(message if hint is None else f"{message} {hint}")


class RunCancelled(WorkbenchError):
    """A run stopped by whoever asked for it (its progress callback raises it): nothing is stored, the model's
    session is closed and its state put back as for any failure."""
