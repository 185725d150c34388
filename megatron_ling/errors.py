"""Errors users see. One line, naming the field and the fix; every CLI reports them through
:func:`cli_main` (``error: ...`` on stderr once, exit status 2)."""
from __future__ import annotations

import functools
import sys
from typing import Callable, Optional

EXIT_USER_ERROR = 2


class LingConfigError(ValueError):
    """A user-supplied configuration is invalid. The message names the field and how to fix it."""


def error_line(e: BaseException) -> str:
    """The one line shown for a user error: OSError-class file failures name the file."""
    if isinstance(e, OSError) and e.strerror:
        return f"error: {e.filename + ': ' if e.filename else ''}{e.strerror}"
    return f"error: {e}"


def cli_main(fn: Optional[Callable] = None, *, errors: tuple = (), quiet: Callable[[], bool] = lambda: False):
    """Decorate a CLI's ``main(argv=None) -> int``: a LingConfigError, an OSError (missing or
    unreadable file, full disk, ...) or one of ``errors`` becomes one ``error: ...`` line on stderr
    (not printed where ``quiet()``, e.g. on non-zero ranks of a multi-process job) and exit status 2.
    Anything else is a bug and keeps its traceback."""

    def wrap(main):
        @functools.wraps(main)
        def run(*args, **kwargs) -> int:
            try:
                return main(*args, **kwargs)
            except (LingConfigError, OSError, *errors) as e:
                if not quiet():
                    print(error_line(e), file=sys.stderr)
                return EXIT_USER_ERROR

        return run

    return wrap(fn) if fn is not None else wrap
