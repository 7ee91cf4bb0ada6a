"""User-facing errors: one line that names the bad value and the fix, no traceback."""


class UserError(Exception):
    """A problem with the user's input or environment that they can fix; printed as one line."""
