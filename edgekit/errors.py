"""The one exception type the CLI turns into a one-line message and a non-zero exit."""


class EdgekitError(Exception):
    """A problem the user can fix: bad input, a missing model, a failed check.

    The message is shown as-is, on one line, without a traceback.
    """

    exit_code = 1
