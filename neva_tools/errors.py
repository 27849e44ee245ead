"""User-facing errors.

Every error a user can cause (bad file, bad flag, bad record) is raised as ``NevaError`` with a
message that names the file/record/key, the value found and what to do. The CLI prints the message
without a traceback and exits with status 2.
"""


class NevaError(Exception):
    """An error caused by the user's input; its message is shown as-is by the CLI."""
