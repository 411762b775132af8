"""User-facing errors: each message says what went wrong and what to do about it."""

from __future__ import annotations


class KdflowError(Exception):
    """An error the user can fix (input, config, environment); the CLI prints it without a traceback."""


class GateFailed(KdflowError):
    """The data-quality gate rejected the soft labels; training must not start."""


class TransientError(Exception):
    """A failure worth retrying as it is (a server hiccup, a lost worker); orchestration retries these."""


def is_transient(exc: BaseException) -> bool:
    """Retry I/O and infrastructure faults; never user errors, failed gates or programming errors."""
    if isinstance(exc, KdflowError):
        return False
    return isinstance(exc, (TransientError, OSError, TimeoutError, ConnectionError))
