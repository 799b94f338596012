"""One base for every error a user can cause and fix: config, data, checkpoint, weights, storage, setup.

A `UserError` says what is wrong, where (file, key, record) and what to do. The training entry point
(`largefr/train/run.py`) and the tools print it on one line and exit non-zero, without a traceback
(`LARGEFR_DEBUG=1` shows one). Any other exception is a programming error and keeps its traceback.
Each error class also keeps the built-in base it always had (`ValueError`, `RuntimeError`, `OSError`,
`FileExistsError`), so code that catches those still catches it.
"""
from __future__ import annotations


class UserError(Exception):
    """A problem the user can fix; its message is the whole report."""


class UsageError(UserError, ValueError):
    """A tool's flags or arguments that cannot work together; the message names the flag."""


class MissingExtraError(UserError, ImportError):
    """An optional dependency is not installed; the message names the extra to install."""


EXPECTED_ERRORS: tuple[type[BaseException], ...] = (UserError, OSError)
"""What the training entry point and the tools report on one line, without a traceback: the user's errors and
the operating system's refusals (a missing file, a full disk, a permission), whose message names the path."""
