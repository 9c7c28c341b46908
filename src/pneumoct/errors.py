"""Errors the command line turns into a one-line message and exit code 2."""
from __future__ import annotations


class PneumoctInputError(ValueError):
    """The input cannot be used (refused with a clear reason). ``code`` is machine-readable."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message

    def __reduce__(self):  # pickled with both arguments (a forked child's error comes back pickled)
        return (type(self), (self.code, self.message))

    def __str__(self) -> str:  # one line, always
        return " ".join(self.message.split())
