"""One exception type for every user-facing failure.

The CLI catches :class:`MscnError` and prints its message as a single line with a
non-zero exit, instead of a traceback wall (bad path, corrupt file, config typo...).
"""


class MscnError(Exception):
    """A problem the user can fix: the message names the file/key and the fix."""


class ConfigError(MscnError):
    """An invalid configuration value, unknown key or wrong type."""


class DataError(MscnError):
    """A missing, empty or unreadable dataset, or a bad image inside it."""
