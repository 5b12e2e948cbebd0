"""The one base class for user-facing errors: the CLI prints these without a traceback."""


class PLTError(Exception):
    """Bad input, bad checkpoint, unavailable backend: anything the user can fix."""
