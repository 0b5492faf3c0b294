"""The one exception type that reaches users as a one-line message and a non-zero exit."""


class UserError(Exception):
    """Bad input: the CLI prints ``error: <message>`` and exits with status 2, having changed nothing on disk."""
