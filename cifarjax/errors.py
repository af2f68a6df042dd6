"""User-facing errors: one clear message, a non-zero exit, no traceback."""
from __future__ import annotations

import functools
import sys


class UserError(Exception):
    """A problem with the user's input (a path, a file, a flag), with a message saying how to fix it."""


def exit_on_user_error(main):
    """Decorate a command's `main` so a UserError prints `error: ...` to stderr and exits with status 2."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except UserError as error:
            print(f"error: {error}", file=sys.stderr)
            raise SystemExit(2) from None

    return wrapper
