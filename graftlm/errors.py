"""One exception type for everything a user can get wrong.

The CLI catches `GraftError` and prints its message as one line with a non-zero exit,
instead of a traceback. Raise it with a message that names the file, line or field.
"""


class GraftError(Exception):
    """An error caused by the user's input (files, config, data), shown as one line."""


class ConfigError(GraftError):
    """A config field is missing, unknown, of the wrong type or out of range."""
