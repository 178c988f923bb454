"""The one exception type for mistakes a user can make (bad flag, bad value, missing data).

Entry points catch it and print a single line with exit status 2; everything else is a bug and raises.
"""

EXIT_USAGE = 2


class UsageError(Exception):
    """A problem the user can fix: the message names the bad value and what is allowed."""
