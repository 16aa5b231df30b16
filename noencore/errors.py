"""Errors that the CLI reports as one clear line (exit code 1), without a traceback."""
from __future__ import annotations


class NoencoreError(Exception):
    """A failure of the job with a message that names the file or item and what to do."""


class UsageError(NoencoreError):
    """Bad usage: contradictory flags or arguments (CLI exit code 2)."""


class RequestConflict(NoencoreError):
    """An opt-out request that contradicts one the model has already served (its forget
    set was forgotten before, or its remain set holds items forgotten before)."""


class UntrustedFileError(NoencoreError):
    """A file that only the full unpickler reads (it could run code): refused unless the
    user opts in (``trust_pickle=True``, ``--trust-pickle``)."""
