"""The one exception type for mistakes a user can make (bad flag, bad value, missing data), and the one
rekd's signal handlers raise.

Entry points catch UsageError and print a single line with exit status 2; everything else is a bug and raises.
"""

EXIT_USAGE = 2


class UsageError(Exception):
    """A problem the user can fix: the message names the bad value and what is allowed."""


class Interrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM, as rekd's own signal handlers raise it; `except KeyboardInterrupt` catches it.

    A subclass, not KeyboardInterrupt itself: once a bare KeyboardInterrupt has passed through code that a C
    extension ran with PyRun_String, CPython (3.11) ends the process by SIGINT at exit whatever status the
    command returned. A `python -m rekd.final` stopped by SIGTERM then exited -2 instead of 143."""
